"""PyTorch CM3Leon: an OPT/metaseq-style decoder over one text+image vocabulary (arXiv 2309.02591, §2.3).

Read top to bottom: position embedding → attention → decoder layer → `Cm3LeonModel` → `Cm3LeonForCausalLM`.

The paper's changes to OPT are all here: no bias terms, no dropout, LayerNorm without learnable parameters, sequence
length 4096, truncated-normal init (std 0.006, ±3σ), zero-initialised output projections and learned absolute
positions initialised with std 0.0002. With those switches, transformers' `OPTForCausalLM` computes the same function
(`convert_opt.to_opt` maps the weights across; `tests/test_modeling_cm3leon.py` compares logits); two differences are
ours on purpose:
position ids of a packed row restart per document and the mask keeps each document to itself, and padded positions
embed position 0 instead of OPT's spare row.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_cm3leon import Cm3LeonConfig
from .generation_cm3leon import SAMPLING_DEFAULTS, Cm3LeonDecodingPlan, Cm3LeonGenerationMixin
from .hub import Cm3LeonHubMixin


class Cm3LeonLearnedPositionalEmbedding(nn.Embedding):
    """Learned absolute positions `0 … max_position_embeddings - 1` (no OPT offset of 2)."""

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        # (batch_size, sequence_length) -> (batch_size, sequence_length, hidden_size)
        return super().forward(position_ids)


class Cm3LeonResidualProjection(nn.Linear):
    """A bias-free linear layer that writes into the residual stream (attention `out_proj`, feed-forward `fc2`): the
    "output layers" that CL §2.3 initialises to zero (see `Cm3LeonConfig.zero_init_output_projections`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention (needed for `output_attentions=True`). `query`: (batch, heads, q_len, head_dim)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, q_len, kv_len)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value)  # (batch, heads, q_len, head_dim)
    attn_output = attn_output.transpose(1, 2).contiguous()  # (batch, q_len, heads, head_dim)
    return attn_output, attn_weights


class Cm3LeonAttention(nn.Module):
    """Multi-head causal self-attention without biases. The backend (SDPA by default, eager, flash, flex) comes from
    `config._attn_implementation` through transformers' attention interface."""

    def __init__(self, config: Cm3LeonConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.out_proj = Cm3LeonResidualProjection(config.hidden_size, config.hidden_size)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers' old name, as in Llama
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (batch, q_len)
        hidden_shape = (*input_shape, self.num_heads, self.head_dim)

        # (batch, q_len, hidden) -> (batch, heads, q_len, head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if cache is not None:
            # (batch, heads, kv_len, head_dim) with kv_len = cached + q_len
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (batch, q_len, hidden)
        return self.out_proj(attn_output), attn_weights


class Cm3LeonDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN block: `x + Attn(LN(x))`, then `x + fc2(relu(fc1(LN(x))))`. LayerNorms have no parameters."""

    def __init__(self, config: Cm3LeonConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Cm3LeonAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False, bias=False
        )
        self.final_layer_norm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False, bias=False
        )
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = Cm3LeonResidualProjection(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers' old name, as in Llama
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # hidden_states: (batch, q_len, hidden)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
        return residual + hidden_states


class Cm3LeonPreTrainedModel(PreTrainedModel):
    config: Cm3LeonConfig
    config_class = Cm3LeonConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Cm3LeonDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # input validation syncs with the host; skipped while compiling
    _can_record_outputs = {"hidden_states": Cm3LeonDecoderLayer, "attentions": Cm3LeonAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """CL §2.3: truncated normal (std `initializer_range`, cut at `±initializer_truncation` std) for every matrix
        and the token embeddings; positions the same with std `position_initializer_range`; the residual output
        projections (`out_proj`, `fc2`) zero."""
        config = self.config
        if isinstance(module, Cm3LeonResidualProjection) and config.zero_init_output_projections:
            init.zeros_(module.weight)
        elif isinstance(module, Cm3LeonLearnedPositionalEmbedding):
            cut = config.initializer_truncation * config.position_initializer_range
            init.trunc_normal_(module.weight, std=config.position_initializer_range, a=-cut, b=cut)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            cut = config.initializer_truncation * config.initializer_range
            init.trunc_normal_(module.weight, std=config.initializer_range, a=-cut, b=cut)


def _check_shapes(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, hidden_size: int) -> None:
    """Integer ids of shape (batch, length) with length >= 1, or embeddings (batch, length, hidden_size)."""
    if input_ids is not None:
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}.")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}; "
                             f"for one sequence, add a batch dimension: ids[None].")
        length = input_ids.shape[1]
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch_size, sequence_length, hidden_size={hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}.")
        length = inputs_embeds.shape[1]
    if length == 0:
        raise ValueError("The input is empty (sequence_length 0): give at least one token, e.g. the <eos> that starts a "
                         "document.")


def _check_attention_mask(mask: torch.Tensor, batch_size: int, length: int, *, static: bool, values: bool) -> None:
    """A 2D padding mask covers the batch and every position (cached + new), with 1 for tokens and 0 for padding:
    positions are counted from it, so any other length or value would shift them silently. A static cache's mask
    may be longer (it covers the cache's whole length). `values`: also read the values (a host sync)."""
    if mask.shape[0] != batch_size or (mask.shape[1] != length and not (static and mask.shape[1] >= length)):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the input needs ({batch_size}, {length}) "
                         f"(batch, cached + new tokens).")
    if values and not mask.dtype == torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens).")


class Cm3LeonModel(Cm3LeonPreTrainedModel):
    """The decoder stack: token + position embeddings, `num_hidden_layers` pre-LN blocks, a final LayerNorm."""

    def __init__(self, config: Cm3LeonConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = Cm3LeonLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([Cm3LeonDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _check_input_ids(self, input_ids: torch.LongTensor) -> None:
        # One reduction per call; skipped under torch.compile, where it would break the graph.
        if torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids contains the id {bad}, outside the vocabulary [0, {self.config.vocab_size}) of this model "
                f"(text ids [0, {self.config.text_vocab_size}), image ids [{self.config.image_token_offset}, "
                f"{self.config.image_token_offset + self.config.image_vocab_size})). Was it made by a processor for "
                f"another model?"
            )

    def decode_image_tokens(self, sequences: torch.LongTensor) -> torch.LongTensor:
        """The image that ends each of `generate`'s sequences (`(batch, length)`), as image ids of the joint
        vocabulary `(batch, image_seq_length)`: what transformers' any-to-any pipeline calls with
        `generation_mode="image"` before `Cm3LeonProcessor.post_process_multimodal_output` decodes them to pixels
        (the VQ belongs to the processor). A `ValueError` if a sequence does not end in a whole image."""
        length = self.config.image_seq_length
        sequences = torch.as_tensor(sequences)
        sequences = sequences[None] if sequences.dim() == 1 else sequences
        image_ids = sequences[:, -length:]
        start, stop = self.config.image_token_offset, self.config.image_token_offset + self.config.image_vocab_size
        if sequences.shape[1] < length or not bool(((image_ids >= start) & (image_ids < stop)).all()):
            raise ValueError(f"The sequences do not end in an image ({length} image ids): generate with "
                             f"generation_mode='image' (or generate_image=True).")
        return image_ids

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Ids in the joint vocabulary (text, special tokens, image codes at `config.image_token_offset`).
            attention_mask (`torch.Tensor` of shape `(batch_size, cached_length + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (left padding for generation). When given and `position_ids` is not,
                positions are counted over real tokens only, so a left-padded prompt sees the positions it would see
                alone. A 4D mask is used as is.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Absolute positions. For packed rows (several documents in one row, no `attention_mask`, no cache),
                positions that restart at 0 mark document starts, and each document attends only to itself.
            cache (`Cache`, *optional*):
                Key/value cache of earlier steps. In evaluation mode with `use_cache=True` a `DynamicCache` is
                created when none is passed; in training mode none is created.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Token embeddings instead of `input_ids`.

        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` of shape `(batch_size, sequence_length, hidden_size)`.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        _check_shapes(input_ids, inputs_embeds, self.config.hidden_size)
        # A decoding step (one new token per row, after a cache) feeds back sampled ids: checking them would cost a
        # host sync per token, which also stops CUDA graphs. Prompts and any longer input are checked.
        decoding_step = cache is not None and (input_ids if input_ids is not None else inputs_embeds).shape[1] == 1
        if input_ids is not None:
            if not decoding_step:
                self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)  # (batch, q_len, hidden)

        # A padding-free packed row (position_ids restarting per example, no cache, no mask; TRL's packing): it gets
        # no cache (which would hide the packing from the mask below: attention would cross examples), and it may be
        # longer than the context: its positions are what must fit, and they are checked below.
        packed = position_ids is not None and cache is None and attention_mask is None
        if use_cache and cache is None and not self.training and not packed:
            cache = DynamicCache(config=self.config)
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        query_length = inputs_embeds.shape[1]
        if past_seen_tokens + query_length > self.config.max_position_embeddings and not packed:
            raise ValueError(
                f"The sequence is {past_seen_tokens + query_length} tokens long ({past_seen_tokens} cached + "
                f"{query_length} new), longer than max_position_embeddings={self.config.max_position_embeddings}."
            )

        if attention_mask is not None and attention_mask.ndim == 2:
            _check_attention_mask(attention_mask, inputs_embeds.shape[0], past_seen_tokens + query_length,
                                  static=getattr(cache, "is_compileable", False), values=not decoding_step)
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Count real tokens only: left padding does not shift the positions of a prompt. Pads get position 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
            else:
                position_ids = torch.arange(
                    past_seen_tokens, past_seen_tokens + query_length, device=inputs_embeds.device
                ).unsqueeze(0)
        elif not (torch.compiler.is_compiling() or decoding_step):
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position_ids contains {low if low < 0 else high}, outside [0, max_position_embeddings="
                    f"{self.config.max_position_embeddings})."
                )

        # Packed rows are detected from `position_ids` when there is no 2D mask and no cache (as in Llama).
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds + self.embed_positions(position_ids)  # (batch, q_len, hidden)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, attention_mask=causal_mask, cache=cache, position_ids=position_ids, **kwargs
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class Cm3LeonForCausalLM(Cm3LeonHubMixin, Cm3LeonPreTrainedModel, Cm3LeonGenerationMixin):
    r"""
    CM3Leon with its LM head (tied to the token embeddings): next-token logits over text, special tokens and image
    codes.

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM

    >>> config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
    >>> model = Cm3LeonForCausalLM(config).eval()
    >>> prompt = torch.tensor([[config.eos_token_id, 300, 301, config.break_token_id]])  # <eos> text <break>
    >>> out = model(prompt)
    >>> out.logits.shape == (1, 4, config.vocab_size)
    True
    >>> ids = model.generate(prompt, max_new_tokens=5, do_sample=False)
    >>> ids.shape
    torch.Size([1, 9])

    ```
    """

    # It writes images too, as tokens (transformers' any-to-any pipeline reads this, as for Janus). The input stays
    # "text" for transformers: images reach the model as ids, tokenized by the processor's VQ.
    output_modalities = ("text", "image")
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Cm3LeonConfig):
        super().__init__(config)
        self.model = Cm3LeonModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # CM3Leon samples (temperature or top-p, CL §3.1; p = 0.8 in its demo), never with transformers' global
        # default of top-k 50, and a generated span ends at <eos> or, when infilling (CM3), at <eoss>.
        # A checkpoint's generation_config.json replaces these.
        end_of_generation = [t for t in (config.eos_token_id, config.eoss_token_id) if t is not None]
        self.generation_config.update(**SAMPLING_DEFAULTS, eos_token_id=end_of_generation or None)
        # Ours, not the model config's: its decoding settings (`guidance_scale`, ... see `generation_cm3leon.py`) must load
        # back from generation_config.json, which transformers skips for a config marked as derived from the model's.
        self.generation_config._from_model_config = False

    def decode_image_tokens(self, sequences: torch.LongTensor) -> torch.LongTensor:
        """`Cm3LeonModel.decode_image_tokens` (the any-to-any pipeline calls it on the model it holds)."""
        return self.model.decode_image_tokens(sequences)

    def _check_labels(self, labels: torch.LongTensor) -> None:
        """Labels are ids of the vocabulary or -100 (ignored): anything else would be an index error inside the loss,
        or a silent wrong loss on a device that does not check. One reduction per call, skipped under compile."""
        if torch.compiler.is_compiling() or labels.numel() == 0:
            return
        kept = labels[labels != -100]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= self.config.vocab_size):
            bad = int(kept.min()) if int(kept.min()) < 0 else int(kept.max())
            raise ValueError(f"labels contains the id {bad}, neither -100 (ignored) nor inside the vocabulary [0, "
                             f"{self.config.vocab_size}) of this model.")

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_vocab_range: tuple[int, int] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache:
                As in [`Cm3LeonModel.forward`].
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the next-token cross-entropy, unshifted (the loss shifts them); -100 is ignored.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Compute logits for the last `logits_to_keep` positions only (0 = all), or for the given indices.
            logits_vocab_range (`tuple[int, int]`, *optional*):
                Compute logits for the token ids `[start, end)` only (column `j` is token `start + j`). Generation
                uses it for the image codes while an image is being written: 8,192 of the paper's 64,512 rows of the
                LM head.

        Returns:
            `CausalLMOutputWithPast` with `logits` of shape `(batch_size, kept_length, vocab_size)` (or
            `end - start` columns with `logits_vocab_range`) and `loss` when `labels` are given.
        """
        if logits_vocab_range is not None and labels is not None:
            raise ValueError("`logits_vocab_range` computes part of the vocabulary; it cannot be used with `labels`.")
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if logits_vocab_range is None:
            logits = self.lm_head(hidden_states)  # (batch, kept_len, vocab)
        else:
            start, end = logits_vocab_range
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= self.config.vocab_size):
                raise ValueError(f"`logits_vocab_range` must be (start, end) ids with 0 <= start < end <= vocab_size "
                                 f"({self.config.vocab_size}), got {logits_vocab_range!r}.")
            logits = nn.functional.linear(hidden_states, self.lm_head.weight[start:end])  # (batch, kept_len, end - start)

        loss = None
        if labels is not None:
            self._check_labels(labels)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["Cm3LeonDecodingPlan", "Cm3LeonForCausalLM", "Cm3LeonModel", "Cm3LeonPreTrainedModel"]
