"""CM3Leon model configuration."""

import math

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


class Cm3LeonConfig(PreTrainedConfig):
    r"""
    Configuration of a [`Cm3LeonForCausalLM`]: a decoder-only, OPT/metaseq-style transformer over ONE vocabulary of
    text BPE tokens, special tokens and VQ image codes (CM3Leon, arXiv 2309.02591, §2).

    The vocabulary is laid out as

    ```
    [0, text_vocab_size)                                   special tokens + text BPE tokens
    [image_token_offset, image_token_offset + image_vocab_size)   VQ image codes, code c -> id image_token_offset + c
    ids up to vocab_size                                   (optional) unused padding rows of the embedding

    ```

    Every special id lives in the text range. The paper's sizes use 56,320 text ids (the BPE of CL §2.1, the special
    tokens included) and 8,192 image codes: `vocab_size = 64,512`.

    Architecture (CL §2.3; paper choices are fixed, open ones are fields): pre-LayerNorm decoder, no bias terms, no
    dropout, LayerNorm without learnable parameters, learned absolute position embeddings, sequence length 4096.

    Args:
        text_vocab_size (`int`, defaults to 56320):
            Number of text ids (special tokens and BPE tokens), i.e. ids `[0, text_vocab_size)`.
        image_vocab_size (`int`, defaults to 8192):
            Number of VQ codes (the image tokenizer's codebook size).
        image_token_offset (`int`, *optional*):
            Id of VQ code 0. Defaults to `text_vocab_size` (image codes right after the text ids).
        vocab_size (`int`, *optional*):
            Rows of the embedding matrix and of the LM head. Defaults to `image_token_offset + image_vocab_size`; may
            be larger (e.g. padded to a multiple of 128), never smaller.
        image_seq_length (`int`, defaults to 1024):
            Number of VQ codes per image (1024 for a 256x256 image at stride 8, the paper's tokenizer).
        pad_token_id (`int`, defaults to 0):
            `<pad>`: padding, never attended to and never a target.
        eos_token_id (`int`, defaults to 1):
            `<eos>`: delimits a whole example (metaseq's `</s>`, CL Fig. 9: `<eos> docs query <eos>`).
        bos_token_id (`int`, defaults to 1):
            First token of a generation prompt. CM3Leon starts every document with `<eos>`, so it equals
            `eos_token_id` by default.
        break_token_id (`int`, defaults to 2):
            `<break>`: the modality switch between a text and an image segment (CL §2.1).
        eoss_token_id (`int`, defaults to 3):
            `<eoss>`: end of an infilled span in the CM3 objective (CM3 §2).
        sentinel_token_start_id (`int`, defaults to 4):
            Id of `<mask:0>`; the `num_sentinel_tokens` sentinels `<mask:0..n-1>` have consecutive ids.
            `<mask:0>` doubles as the paper's `<mask>` of the unconditional CFG stream (CL §2.2, §3.1).
        num_sentinel_tokens (`int`, defaults to 16):
            Number of CM3 sentinels, i.e. the largest number of masked spans per document (CM3 clamps the span count
            to 16).
        hidden_size (`int`, defaults to 1024):
            Width of the residual stream.
        num_hidden_layers (`int`, defaults to 24):
            Number of decoder layers.
        num_attention_heads (`int`, defaults to 16):
            Number of attention heads; must divide `hidden_size`. Not given in the paper: `hub_configs/` uses GPT-3's
            choices for the same widths (16 heads at 1024 and 1536, 32 at 4096).
        intermediate_size (`int`, defaults to 4096):
            Width of the feed-forward layer. Not given in the paper: OPT's `4 * hidden_size`.
        hidden_act (`str`, defaults to `"relu"`):
            Feed-forward activation. Not given in the paper: OPT's ReLU.
        max_position_embeddings (`int`, defaults to 4096):
            Number of learned absolute positions, the longest sequence the model accepts (CL §2.3: 4096).
        layer_norm_eps (`float`, defaults to 1e-5):
            LayerNorm epsilon (PyTorch and metaseq default).
        initializer_range (`float`, defaults to 0.006):
            Standard deviation of the truncated-normal initialisation of every weight matrix and of the token
            embeddings (CL §2.3).
        initializer_truncation (`float`, defaults to 3.0):
            The truncated normal is cut at `±initializer_truncation * initializer_range` (CL §2.3: 3 standard
            deviations).
        position_initializer_range (`float`, defaults to 0.0002):
            Standard deviation of the (truncated) normal initialisation of the learned position embeddings
            (CL §2.3: "near zero with a standard deviation of 0.0002").
        zero_init_output_projections (`bool`, defaults to `True`):
            CL §2.3 "output layers are initialized as 0". The paper does not say which layers; we read it as the
            projections that write into the residual stream (attention `out_proj` and feed-forward `fc2` of every
            layer), metaseq/Megatron's "output layers". It cannot mean the LM head, which is tied to the embeddings.
        tie_word_embeddings (`bool`, defaults to `True`):
            Share the LM head with the token embeddings, as OPT and CM3 do. Not given in CM3Leon; with it the three
            paper sizes count within 7% of their nominal 350M / 760M / 7B parameters (untied, 350M would be 24% over).
        use_cache (`bool`, defaults to `True`):
            Return a key/value cache in evaluation mode (never built while training, where it would only cost
            memory and hide packed sequences from the attention mask).

    Example:

    ```python
    >>> from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM

    >>> config = Cm3LeonConfig(text_vocab_size=256, image_vocab_size=64, image_seq_length=16, hidden_size=64,
    ...                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    ...                        max_position_embeddings=128)
    >>> config.vocab_size, config.image_token_offset, config.mask_token_id
    (320, 256, 4)
    >>> model = Cm3LeonForCausalLM(config)

    ```
    """

    model_type = "cm3leon"
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.out_proj": "rowwise",
        "layers.*.fc1": "colwise",
        "layers.*.fc2": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # vocabulary layout
    text_vocab_size: int = 56320
    image_vocab_size: int = 8192
    image_token_offset: int | None = None
    vocab_size: int | None = None
    image_seq_length: int = 1024
    # special ids (all inside the text range)
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 1
    break_token_id: int = 2
    eoss_token_id: int = 3
    sentinel_token_start_id: int = 4
    num_sentinel_tokens: int = 16
    # sizes
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "relu"
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    # initialisation (CL §2.3)
    initializer_range: float = 0.006
    initializer_truncation: float = 3.0
    position_initializer_range: float = 0.0002
    zero_init_output_projections: bool = True
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.image_token_offset is None:
            self.image_token_offset = self.text_vocab_size
        if self.vocab_size is None:
            self.vocab_size = self.image_token_offset + self.image_vocab_size
        super().__post_init__(**kwargs)
        self._validate_layout()

    def _validate_layout(self) -> None:
        """Raise a `ValueError` naming the field for every invalid size or overlapping id range."""
        self._check_field_types()
        self._check_sizes()
        self._check_special_ids()

    def _check_field_types(self) -> None:
        """Sizes are positive integers, offsets integers, initialisation scales finite positive numbers, and the
        activation one transformers knows."""
        positive = (
            "text_vocab_size",
            "image_vocab_size",
            "image_seq_length",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
        # The offsets first: `vocab_size` is computed from them, and the value to name is the one given.
        for name in ("image_token_offset", "num_sentinel_tokens", "sentinel_token_start_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        for name in (*positive, "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("initializer_range", "position_initializer_range", "initializer_truncation", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a finite positive number, got {value!r}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is not an activation transformers knows (e.g. 'relu', "
                             f"'gelu', 'silu').")

    def _check_sizes(self) -> None:
        """The heads divide the width, the image ids follow the text ids inside the vocabulary, a prompt and an image
        fit the context, and there is at least one sentinel."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size})."
            )
        if self.image_token_offset < self.text_vocab_size:
            raise ValueError(
                f"`image_token_offset` ({self.image_token_offset}) overlaps the text ids [0, {self.text_vocab_size}): "
                f"image codes must start at or after `text_vocab_size`."
            )
        image_end = self.image_token_offset + self.image_vocab_size
        if self.vocab_size < image_end:
            raise ValueError(
                f"`vocab_size` ({self.vocab_size}) is smaller than the end of the image ids "
                f"(image_token_offset + image_vocab_size = {image_end})."
            )
        if self.image_seq_length >= self.max_position_embeddings:
            raise ValueError(
                f"`image_seq_length` ({self.image_seq_length}) must be smaller than `max_position_embeddings` "
                f"({self.max_position_embeddings}) so that a prompt and one image fit the context."
            )
        if self.num_sentinel_tokens < 1:
            raise ValueError(
                f"`num_sentinel_tokens` must be at least 1 (`<mask:0>` is CFG's `<mask>`), got {self.num_sentinel_tokens}."
            )

    def _check_special_ids(self) -> None:
        """Every special id lies in the text range; `<pad>`, `<eos>`, `<break>`, `<eoss>` are distinct and outside the
        sentinels; `<bos>` is `<eos>` or an id of its own."""
        singles = {
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "break_token_id": self.break_token_id,
            "eoss_token_id": self.eoss_token_id,
        }
        for name, value in {**singles, "bos_token_id": self.bos_token_id}.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.text_vocab_size:
                raise ValueError(
                    f"`{name}` ({value!r}) must be an id inside the text range [0, {self.text_vocab_size})."
                )
        sentinel_end = self.sentinel_token_start_id + self.num_sentinel_tokens
        if not 0 <= self.sentinel_token_start_id or sentinel_end > self.text_vocab_size:
            raise ValueError(
                f"The sentinel ids [sentinel_token_start_id, +num_sentinel_tokens) = "
                f"[{self.sentinel_token_start_id}, {sentinel_end}) must lie inside the text range "
                f"[0, {self.text_vocab_size})."
            )
        seen: dict[int, str] = {}
        for name, value in singles.items():
            if value in seen:
                raise ValueError(f"`{name}` and `{seen[value]}` share the id {value}; special ids must be distinct.")
            if self.sentinel_token_start_id <= value < sentinel_end:
                raise ValueError(
                    f"`{name}` ({value}) falls inside the sentinel ids [{self.sentinel_token_start_id}, {sentinel_end})."
                )
            seen[value] = name
        if self.bos_token_id != self.eos_token_id and self.bos_token_id in seen:
            raise ValueError(f"`bos_token_id` ({self.bos_token_id}) collides with `{seen[self.bos_token_id]}`.")

    @property
    def mask_token_id(self) -> int:
        """Id of `<mask:0>`, the paper's `<mask>` (CFG's unconditional stream, CM3's first sentinel)."""
        return self.sentinel_token_start_id

    @property
    def sentinel_token_ids(self) -> list[int]:
        """Ids of `<mask:0>` … `<mask:{num_sentinel_tokens - 1}>`."""
        return list(range(self.sentinel_token_start_id, self.sentinel_token_start_id + self.num_sentinel_tokens))

    @property
    def image_token_ids(self) -> range:
        """The ids of the VQ codes: `range(image_token_offset, image_token_offset + image_vocab_size)`."""
        return range(self.image_token_offset, self.image_token_offset + self.image_vocab_size)


__all__ = ["Cm3LeonConfig"]
