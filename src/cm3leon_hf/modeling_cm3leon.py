"""PyTorch CM3Leon: an OPT/metaseq-style decoder over one text+image vocabulary (arXiv 2309.02591, §2.3).

Read top to bottom: position embedding → attention → decoder layer → `Cm3LeonModel` → `Cm3LeonForCausalLM`.

The paper's changes to OPT are all here: no bias terms, no dropout, LayerNorm without learnable parameters, sequence
length 4096, truncated-normal init (std 0.006, ±3σ), zero-initialised output projections and learned absolute
positions initialised with std 0.0002. With those switches, transformers' `OPTForCausalLM` computes the same function
(`tests/test_modeling_cm3leon.py` maps the weights across and compares logits); two differences are ours on purpose:
position ids of a packed row restart per document and the mask keeps each document to itself, and padded positions
embed position 0 instead of OPT's spare row.
"""

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessorList
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_cm3leon import Cm3LeonConfig
from .layout import Cm3LeonLayout
from .logits_process import (
    IMAGE,
    STREAM_PROCESSORS,
    BatchedClassifierFreeGuidanceLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    ImageTokenConstraintLogitsProcessor,
    InstructClassifierFreeGuidanceLogitsProcessor,
    next_token_modality,
)


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
        if input_ids is not None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)  # (batch, q_len, hidden)

        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        query_length = inputs_embeds.shape[1]
        if past_seen_tokens + query_length > self.config.max_position_embeddings:
            raise ValueError(
                f"The sequence is {past_seen_tokens + query_length} tokens long ({past_seen_tokens} cached + "
                f"{query_length} new), longer than max_position_embeddings={self.config.max_position_embeddings}."
            )

        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Count real tokens only: left padding does not shift the positions of a prompt. Pads get position 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
            else:
                position_ids = torch.arange(
                    past_seen_tokens, past_seen_tokens + query_length, device=inputs_embeds.device
                ).unsqueeze(0)
        elif not torch.compiler.is_compiling() and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position_ids contains {int(position_ids.max())}, but max_position_embeddings is "
                f"{self.config.max_position_embeddings}."
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


@dataclass
class Cm3LeonDecodingPlan:
    """State of one guided/constrained `generate` call, carried in its model kwargs.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(num_streams * batch_size, prompt_length)`): the prompts of all streams,
            stream-major (conditional, unconditional, image-conditional), left-padded; `None` with one stream.
        attention_mask (`torch.LongTensor` of shape `(num_streams * batch_size, prompt_length + steps)`): grows by one
            column of ones per decoding step.
        num_streams (`int`): 1, 2 (CFG, CD-K) or 3 (instruct-CFG).
        generate_image (`bool`, *optional*): the modality constraint's mode (`None`: the layout decides).
    """

    input_ids: torch.LongTensor | None
    attention_mask: torch.LongTensor | None
    num_streams: int
    generate_image: bool | None


class Cm3LeonForCausalLM(Cm3LeonPreTrainedModel, GenerationMixin):
    r"""
    CM3Leon with its LM head (tied to the token embeddings): next-token logits over text, special tokens and image
    codes.

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM

    >>> config = Cm3LeonConfig.from_pretrained("hub_configs/cm3leon-tiny")
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
        self.generation_config.update(
            do_sample=True, top_p=0.8, top_k=0, temperature=1.0, eos_token_id=[config.eos_token_id, config.eoss_token_id]
        )

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
            logits = nn.functional.linear(hidden_states, self.lm_head.weight[start:end])  # (batch, kept_len, end - start)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        *,
        cfg_scale: float | None = None,
        image_cfg_scale: float | None = None,
        contrastive_k: int | None = None,
        contrastive_alpha: float = 0.5,
        amateur_temperature: float = 0.5,
        uncond_input_ids: torch.LongTensor | None = None,
        uncond_attention_mask: torch.LongTensor | None = None,
        image_cond_input_ids: torch.LongTensor | None = None,
        image_cond_attention_mask: torch.LongTensor | None = None,
        generate_image: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        r"""
        `GenerationMixin.generate` with CM3Leon's decoding (CL §3.1, §4.1). Guided decoding runs every stream of a
        prompt as rows of ONE forward pass per token (one KV cache, left padding, positions from the masks) and feeds
        every stream the sampled token; a logits processor combines the rows before temperature/top-p.

        Generation runs in the model's dtype. We keep float32 as the CPU default (as transformers and diffusers do):
        on a CPU with AVX512-BF16 or AMX, loading with `dtype=torch.bfloat16` makes guided decoding 1.45x faster at
        125M dims, because bf16 matmuls cost the same for the 2 rows of the streams as for 1 while fp32 ones cost
        twice as much (`bench/RESULTS.md`); at the tiny size a step is overhead-bound and the dtype does not matter.

        Args:
            inputs (`torch.LongTensor` of shape `(batch_size, prompt_length)`):
                The conditional prompts (`input_ids=` works too), left-padded with `attention_mask`.
            cfg_scale (`float`, *optional*):
                Classifier-free guidance `uncond + cfg_scale * (cond - uncond)` (the paper's α_c). Named so on purpose:
                transformers' `guidance_scale` adds its own two-forward processor.
            image_cfg_scale (`float`, *optional*):
                Instruct-CFG for editing: image scale s_I, with `cfg_scale` as the text scale s_T; needs
                `image_cond_input_ids`.
            contrastive_k (`int`, *optional*):
                CD-K contrastive decoding with this k (see [`ContrastiveDecodingLogitsProcessor`]), instead of CFG.
            contrastive_alpha (`float`, defaults to 0.5), amateur_temperature (`float`, defaults to 0.5):
                CD-K's plausibility threshold and the unconditional stream's temperature.
            uncond_input_ids (`torch.LongTensor` of shape `(batch_size, uncond_length)`, *optional*):
                The unconditional stream (text replaced by `<mask>`, retrieved documents kept). Defaults to
                `<eos> <mask:0> <break>` for every prompt.
            uncond_attention_mask (`torch.LongTensor`, *optional*): its padding mask.
            image_cond_input_ids (`torch.LongTensor` of shape `(batch_size, length)`, *optional*):
                For editing: the prompt with the source image but without the instruction. Its mask:
                `image_cond_attention_mask`.
            generate_image (`bool`, *optional*):
                The modality constraint, always on: an image is exactly `image_seq_length` image codes followed by
                `<break>`/`<eos>`, and text contains no image code. `True`: the continuation is an image, and
                `max_new_tokens` defaults to `image_seq_length`. `False`: the continuation is text. `None` (default):
                the document layout decides — a `<break>` after text starts an image, anything else continues text
                (see [`next_token_modality`]). While every row must write image codes the LM head computes only
                their columns.
            generator (`torch.Generator`, *optional*):
                Makes sampling reproducible without touching the global RNG: a seed drawn from it seeds a forked RNG
                for this call (the generator advances, so successive calls differ, as in diffusers).
            kwargs:
                Everything `GenerationMixin.generate` takes (`attention_mask`, `max_new_tokens`, `do_sample`,
                `temperature`, `top_p`, `num_return_sequences`, ...).

        Returns:
            What `GenerationMixin.generate` returns; `sequences` are the conditional stream's.

        Example:

        ```python
        >>> import torch
        >>> from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM
        >>> config = Cm3LeonConfig.from_pretrained("hub_configs/cm3leon-tiny")
        >>> model = Cm3LeonForCausalLM(config).eval()
        >>> prompt = torch.tensor([[config.eos_token_id, 300, 301, config.break_token_id]])  # <eos> text <break>
        >>> out = model.generate(prompt, cfg_scale=3.0, generate_image=True, do_sample=True, top_p=0.8,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> image = out[0, prompt.shape[1]:]
        >>> len(image) == config.image_seq_length, bool((image >= config.image_token_offset).all())
        (True, True)

        ```
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        guided = cfg_scale is not None or image_cfg_scale is not None or contrastive_k is not None
        extra_prompts = (uncond_input_ids, uncond_attention_mask, image_cond_input_ids, image_cond_attention_mask)
        if not guided and any(x is not None for x in extra_prompts):
            raise ValueError("Unconditional or image-conditional prompts need `cfg_scale` or `contrastive_k`.")
        if input_ids is None:
            if guided or generate_image is not None:
                raise ValueError("Guided or image-constrained generation needs the prompt `input_ids`.")
        else:
            kwargs, logits_processor = self._prepare_cm3leon_decoding(
                input_ids,
                kwargs,
                logits_processor,
                cfg_scale=cfg_scale,
                image_cfg_scale=image_cfg_scale,
                contrastive_k=contrastive_k,
                contrastive_alpha=contrastive_alpha,
                amateur_temperature=amateur_temperature,
                uncond=(uncond_input_ids, uncond_attention_mask),
                image_cond=(image_cond_input_ids, image_cond_attention_mask),
                generate_image=generate_image,
                generation_config=generation_config,
            )
            input_ids = kwargs.pop("input_ids")
        if generator is None:
            return super().generate(input_ids, generation_config, logits_processor, **kwargs)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return super().generate(input_ids, generation_config, logits_processor, **kwargs)

    def _prepare_cm3leon_decoding(
        self,
        input_ids,
        kwargs,
        logits_processor,
        *,
        cfg_scale,
        image_cfg_scale,
        contrastive_k,
        contrastive_alpha,
        amateur_temperature,
        uncond,
        image_cond,
        generate_image,
        generation_config,
    ) -> tuple[dict, LogitsProcessorList]:
        """Validate the decoding arguments, build the modality constraint and the guidance processor, and stack the
        streams of guided decoding."""
        config = self.config
        guided = cfg_scale is not None or image_cfg_scale is not None or contrastive_k is not None
        if contrastive_k is not None and (cfg_scale is not None or image_cfg_scale is not None):
            raise ValueError("Choose one of CD-K (`contrastive_k`) and CFG (`cfg_scale`/`image_cfg_scale`).")
        if image_cfg_scale is not None and cfg_scale is None:
            raise ValueError("Instruct-CFG needs both `image_cfg_scale` and `cfg_scale` (the text scale).")
        if image_cfg_scale is not None and image_cond[0] is None:
            raise ValueError(
                "An editing call (`image_cfg_scale`) needs `image_cond_input_ids`: the prompt with the source image "
                "and without the instruction."
            )
        if image_cfg_scale is None and image_cond[0] is not None:
            raise ValueError("`image_cond_input_ids` is only used by instruct-CFG (`image_cfg_scale`).")
        if guided:
            for name in ("guidance_scale", "assistant_model", "negative_prompt_ids"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"`{name}` cannot be combined with CM3Leon's guided decoding.")
            num_beams = kwargs.get("num_beams", getattr(generation_config, "num_beams", 1))
            if num_beams not in (None, 1):
                raise ValueError("Guided decoding samples or decodes greedily; beam search is not supported.")

        processors = [
            ImageTokenConstraintLogitsProcessor(
                image_token_offset=config.image_token_offset,
                image_vocab_size=config.image_vocab_size,
                image_seq_length=config.image_seq_length,
                end_of_image_token_ids=[config.break_token_id, config.eos_token_id],
                vocab_size=config.vocab_size,
                generate_image=generate_image,
            )
        ]
        if contrastive_k is not None:
            candidates = config.image_vocab_size if generate_image else config.vocab_size
            processors.append(
                ContrastiveDecodingLogitsProcessor(contrastive_alpha, contrastive_k, amateur_temperature, candidates)
            )
        elif image_cfg_scale is not None:
            processors.append(InstructClassifierFreeGuidanceLogitsProcessor(image_cfg_scale, cfg_scale))
        elif cfg_scale is not None:
            processors.append(BatchedClassifierFreeGuidanceLogitsProcessor(cfg_scale))

        max_new_tokens = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        if generate_image and max_new_tokens is None:
            max_new_tokens = kwargs["max_new_tokens"] = config.image_seq_length

        batch_size = input_ids.shape[0]
        streams = [(input_ids, kwargs.pop("attention_mask", None))]
        if guided:
            uncond_ids, uncond_mask = uncond
            if uncond_ids is None:  # <eos> <mask:0> <break>
                default = Cm3LeonLayout.of(config).unconditional_prompt()
                uncond_ids = torch.tensor([default], device=input_ids.device).expand(batch_size, -1)
            streams.append((uncond_ids, uncond_mask))
            if image_cfg_scale is not None:
                streams.append(image_cond)
            for i, (ids, mask) in enumerate(streams):
                if ids.shape[0] != batch_size:
                    raise ValueError(f"Stream {i} has {ids.shape[0]} prompts, the conditional stream {batch_size}.")
                streams[i] = (ids, torch.ones_like(ids) if mask is None else mask)
            # Expanded here rather than by transformers, which does not know the extra streams.
            num_return_sequences = (
                kwargs.pop("num_return_sequences", None)
                or getattr(generation_config or self.generation_config, "num_return_sequences", None)
                or 1
            )
            streams = [(i.repeat_interleave(num_return_sequences, 0), m.repeat_interleave(num_return_sequences, 0)) for i, m in streams]

        prompt_length = max(ids.shape[1] for ids, _ in streams)
        if max_new_tokens is not None and prompt_length + max_new_tokens > config.max_position_embeddings:
            raise ValueError(
                f"The prompt ({prompt_length} tokens, the longest of its {len(streams)} stream(s)) plus {max_new_tokens} "
                f"new tokens exceeds the context of {config.max_position_embeddings} tokens."
            )

        cond_ids, cond_mask = streams[0]
        if guided:
            pad = config.pad_token_id
            padded = [
                (
                    nn.functional.pad(ids, (prompt_length - ids.shape[1], 0), value=pad),
                    nn.functional.pad(mask, (prompt_length - mask.shape[1], 0), value=0),
                )
                for ids, mask in streams
            ]
            plan = Cm3LeonDecodingPlan(
                input_ids=torch.cat([ids for ids, _ in padded]),
                attention_mask=torch.cat([mask for _, mask in padded]),
                num_streams=len(streams),
                generate_image=generate_image,
            )
        else:
            plan = Cm3LeonDecodingPlan(None, None, 1, generate_image)
        kwargs.update(input_ids=cond_ids, decoding_plan=plan)
        if cond_mask is not None:
            kwargs["attention_mask"] = cond_mask
        return kwargs, LogitsProcessorList([*(logits_processor or []), *processors])

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        decoding_plan: "Cm3LeonDecodingPlan | None" = None,
        **kwargs,
    ) -> dict:
        """Expand each prompt into its streams: the stacked prompts on the first step, then the last sampled token of
        every prompt repeated for each stream, with the streams' own growing attention mask. In image mode, ask for
        the image columns of the LM head only when every row must emit an image code."""
        if decoding_plan is not None and decoding_plan.num_streams > 1:
            kwargs.pop("position_ids", None)  # transformers' are the conditional stream's; ours come from the mask
            if is_first_iteration:
                stream_ids = decoding_plan.input_ids
            else:
                stream_ids = input_ids[:, -1:].repeat(decoding_plan.num_streams, 1)  # (streams * batch, 1)
                decoding_plan.attention_mask = nn.functional.pad(decoding_plan.attention_mask, (0, 1), value=1)
            model_inputs = super().prepare_inputs_for_generation(
                stream_ids,
                cache=cache,
                attention_mask=decoding_plan.attention_mask,
                is_first_iteration=is_first_iteration,
                **kwargs,
            )
        else:
            model_inputs = super().prepare_inputs_for_generation(
                input_ids, next_sequence_length, cache, attention_mask, inputs_embeds, is_first_iteration, **kwargs
            )
        if decoding_plan is not None and decoding_plan.generate_image is not False:
            config = self.config
            state = next_token_modality(
                input_ids,
                config.image_token_offset,
                config.image_vocab_size,
                config.image_seq_length,
                config.break_token_id,
                decoding_plan.generate_image,
            )
            if bool((state == IMAGE).all()):
                model_inputs["logits_vocab_range"] = (
                    config.image_token_offset,
                    config.image_token_offset + config.image_vocab_size,
                )
        return model_inputs

    def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
        # The stream processors must see the stacked streams first (constraint, then guidance): every other processor
        # expects one row per prompt. transformers appends custom processors after its own, hence this reordering.
        processors = super()._get_logits_processor(*args, **kwargs)
        rank = {cls: i for i, cls in enumerate(STREAM_PROCESSORS)}
        first = sorted((p for p in processors if type(p) in rank), key=lambda p: rank[type(p)])
        return LogitsProcessorList([*first, *(p for p in processors if type(p) not in rank)])

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        *args,
        model_card_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        """`PreTrainedModel.save_pretrained` (config, safetensors weights, and this code with `auto_map` for
        `trust_remote_code`) plus a `README.md` model card rendered from the package's `model_card.md`.

        Args:
            model_card_kwargs (`dict`, *optional*):
                Passed to `cm3leon_hf.modelcard.build_model_card` (e.g. `training_data`, `repo_id`, `license`).
        """
        if self._auto_class is not None:  # the saved code also serves `AutoModel` and image-text-to-text
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_cm3leon.Cm3LeonModel",
                "AutoModelForImageTextToText": "modeling_cm3leon.Cm3LeonForCausalLM",
            }
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if not is_main_process:
            return
        try:  # the template ships with the package; this file loaded as remote code without it saves no card
            from cm3leon_hf.modelcard import build_model_card, save_model_card
        except ImportError:
            return
        save_model_card(build_model_card(self, **(model_card_kwargs or {})), save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card_kwargs: dict | None = None,
    ) -> str:
        """Upload the model with `save_pretrained`'s files to the Hub in one commit. Unlike
        `PreTrainedModel.push_to_hub`, the README is this model's card (`model_card.md`), not transformers' generic
        one; `tags` are added to the card's metadata."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        card_kwargs["tags"] = [*card_kwargs.get("tags", []), *(tags or [])]
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size, model_card_kwargs=card_kwargs)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=work_dir,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        return commit


__all__ = ["Cm3LeonDecodingPlan", "Cm3LeonForCausalLM", "Cm3LeonModel", "Cm3LeonPreTrainedModel"]
