"""CM3Leon's decoding inside transformers' `generate()`: guided streams in one forward, the modality constraint, and the
decoding defaults a checkpoint's `generation_config.json` carries.

`Cm3LeonGenerationMixin` is the `GenerationMixin` of `Cm3LeonForCausalLM` (as transformers keeps generation code apart
from modeling code). It adds to `generate`:

- **Guided decoding** (CL §3.1, §4.1): classifier-free guidance (`guidance_scale`), instruct-CFG for editing
  (`image_guidance_scale`) and CD-K contrastive decoding (`contrastive_k`). Every stream of a prompt (conditional,
  unconditional, image-conditional) is a row of ONE forward pass per token, with one KV cache; every stream is fed the
  sampled token; a logits processor combines the rows (`logits_process.py`).
- **The modality constraint** (`image_token_constraint`, on by default): an image is exactly `image_seq_length` image
  codes and text never holds one, so every generated image decodes. Off, `generate` samples the model's own
  distribution over the whole vocabulary, as any transformers model does (perplexity studies, non-CM3 data).
- **One name per setting, from the command line to the logits**: `guidance_scale` (diffusers', MusicGen's and Janus'
  name; `--guidance-scale` on the command line), `image_guidance_scale`, `contrastive_k`, `contrastive_alpha`,
  `amateur_temperature`, `generate_image` and `image_token_constraint` are `generate`'s arguments, the generation
  config's fields and the logits processors' arguments alike, and each is checked once, by its processor. They are
  read from the `generation_config` (the argument, else the model's) when a call does not pass them, so a saved model
  decodes with its own defaults; `DECODING_DEFAULTS` (below) is the one table of their starting values. As MusicGen
  and Janus do, the guidance processor is ours (batched streams) and transformers' own, unbatched one is never added
  for `guidance_scale`. The guidance defaults apply to image generation only (captioning with the same model stays
  unguided), and only when the call passes no guidance argument of its own. `guidance_scale=1` is the conditional
  distribution exactly (`uncond + 1 * (cond - uncond)`): it runs one stream.
- **Decoding steps without host syncs**: after the first step, preparing the inputs, the forward pass and the stream
  processors read no tensor value on the host (the image phase is counted on the host from the prompt, ids fed back
  are not re-checked, the constraint's table stays on the device), so a step can be captured as a CUDA graph. Image
  generation on CUDA uses a static cache by default (the length is known); on CPU the dynamic one, which is faster
  there.

Example:

```python
>>> import torch
>>> from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM
>>> config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
>>> model = Cm3LeonForCausalLM(config).eval()
>>> model.generation_config.guidance_scale = 3.0  # saved with save_pretrained, in generation_config.json
>>> prompt = torch.tensor([[config.eos_token_id, 300, 301, config.break_token_id]])  # <eos> text <break>: an image
>>> image = model.generate(prompt, generator=torch.Generator().manual_seed(0))[0, prompt.shape[1]:]
>>> len(image) == config.image_seq_length, bool((image >= config.image_token_offset).all())
(True, True)

```
"""

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import GenerationMixin

from .layout import Cm3LeonLayout
from .logits_process import (
    IMAGE,
    STREAM_PROCESSORS,
    BatchedClassifierFreeGuidanceLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    GeneratorSamplingLogitsProcessor,
    ImageTokenConstraintLogitsProcessor,
    check_guidance_scale,
    check_top_p,
    InstructClassifierFreeGuidanceLogitsProcessor,
    next_token_modality,
    trailing_image_run,
)

# The decoding defaults, written once. A new model's generation config starts from SAMPLING_DEFAULTS (CM3Leon samples
# with top-p 0.8, its demo's, never with transformers' global top-k 50); the settings of ours that a generation config
# may carry take DECODING_DEFAULTS when it does not; CONTRASTIVE_K is CD-K's k when a caller asks for CD-K by name
# (the pipelines' `decoding="cd-k"`) without one. The pipelines and the command line read the model's generation
# config, so a saved model's own values win over all three.
SAMPLING_DEFAULTS = {"do_sample": True, "top_p": 0.8, "top_k": 0, "temperature": 1.0}
DECODING_DEFAULTS = {
    "guidance_scale": None,
    "image_guidance_scale": None,
    "contrastive_k": None,
    "contrastive_alpha": 0.5,  # CM3Leon's evaluation script
    "amateur_temperature": 0.5,  # CM3Leon's evaluation script
    "generate_image": None,
    "image_token_constraint": True,
}
CONTRASTIVE_K = 5  # ours, not tuned: the paper does not report k (bench/RESULTS.md has CD-K at this k)
GUIDANCE_SETTINGS = ("guidance_scale", "image_guidance_scale", "contrastive_k")
RENAMED = {"cfg_scale": "guidance_scale", "image_cfg_scale": "image_guidance_scale"}


def _guidance_in_use(settings: dict) -> dict:
    return {name: settings[name] for name in GUIDANCE_SETTINGS if settings[name] is not None}


@dataclass
class Cm3LeonDecodingPlan:
    """State of one guided/constrained `generate` call, carried in its model kwargs.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(num_streams * batch_size, prompt_length)`): the prompts of all streams,
            stream-major (conditional, unconditional, image-conditional), left-padded; `None` with one stream.
        attention_mask (`torch.LongTensor` of shape `(num_streams * batch_size, prompt_length + room)`): the
            prompts' masks followed by ones for the tokens to come, allocated once; step `t` uses a view of its first
            `prompt_length + t` columns.
        num_streams (`int`): 1, 2 (CFG, CD-K) or 3 (instruct-CFG).
        generate_image (`bool`, *optional*): the modality constraint's mode (`None`: the layout decides).
        constrained (`bool`): whether the modality constraint is on.
        image_steps (`int`, *optional*): for how many new tokens every row writes image codes, read once from the
            prompts on the first step (so the LM head computes only the image columns then, without a host sync per
            step); `None` before the first step.
        steps (`int`): decoding steps taken so far (a host counter).
        prompt_length (`int`): columns of the stacked prompts.
        real_lengths (`torch.LongTensor` of shape `(num_streams * batch_size,)`): real (unpadded) prompt tokens per
            row, so that a step's position is `real_lengths + steps - 1` without reading the mask.
    """

    input_ids: torch.LongTensor | None
    attention_mask: torch.LongTensor | None
    num_streams: int
    generate_image: bool | None
    constrained: bool = True
    image_steps: int | None = None
    steps: int = 0
    prompt_length: int = 0
    real_lengths: torch.LongTensor | None = None

    def step_mask(self) -> torch.LongTensor:
        """The mask of the current step: a view of the first `prompt_length + steps` columns (grown if too short)."""
        needed = self.prompt_length + self.steps
        if needed > self.attention_mask.shape[1]:
            grow = max(needed - self.attention_mask.shape[1], self.attention_mask.shape[1])
            self.attention_mask = nn.functional.pad(self.attention_mask, (0, grow), value=1)
        return self.attention_mask[:, :needed]


def image_steps_ahead(input_ids: torch.LongTensor, config, generate_image: bool | None) -> int:
    """For how many next tokens every row must write an image code: 0 unless all rows are at or inside an image,
    else the fewest codes any row has left to write."""
    state = next_token_modality(input_ids, config.image_token_offset, config.image_vocab_size,
                                config.image_seq_length, config.break_token_id, generate_image)
    run = trailing_image_run(input_ids, config.image_token_offset, config.image_vocab_size)
    left = torch.where(state == IMAGE, config.image_seq_length - run % config.image_seq_length, 0)
    return int(left.min())


class Cm3LeonGenerationMixin(GenerationMixin):
    """`GenerationMixin` with CM3Leon's decoding (see the module docstring)."""

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        *,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        contrastive_k: int | None = None,
        contrastive_alpha: float | None = None,
        amateur_temperature: float | None = None,
        uncond_input_ids: torch.LongTensor | None = None,
        uncond_attention_mask: torch.LongTensor | None = None,
        image_cond_input_ids: torch.LongTensor | None = None,
        image_cond_attention_mask: torch.LongTensor | None = None,
        generate_image: bool | None = None,
        image_token_constraint: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        r"""
        `GenerationMixin.generate` with CM3Leon's decoding (CL §3.1, §4.1). Guided decoding runs every stream of a
        prompt as rows of ONE forward pass per token (one KV cache, left padding, positions from the masks) and feeds
        every stream the sampled token; a logits processor combines the rows before temperature/top-p.

        Every setting below that a call leaves at `None` comes from the generation config (`generation_config`, else
        the model's `generation_config.json`), then from `DECODING_DEFAULTS`; the guidance settings only for image
        generation and only when the call sets none of `guidance_scale`, `image_guidance_scale` and `contrastive_k`.

        Generation runs in the model's dtype. We keep float32 as the CPU default (as transformers and diffusers do):
        on a CPU with AVX512-BF16 or AMX, loading with `dtype=torch.bfloat16` makes guided decoding 1.45x faster at
        125M dims, because bf16 matmuls cost the same for the 2 rows of the streams as for 1 while fp32 ones cost
        twice as much (`bench/RESULTS.md`); at the tiny size a step is overhead-bound and the dtype does not matter.

        Args:
            inputs (`torch.LongTensor` of shape `(batch_size, prompt_length)`):
                The conditional prompts (`input_ids=` works too), left-padded with `attention_mask`.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, prompt_length, hidden_size)`, *optional*):
                transformers' embeddings input. The modality constraint and guidance read the prompt's ids (where an
                image starts; the unconditional stream), so: with `input_ids` too, the ids steer the constraint and
                the embeddings feed the model (the ids' own embeddings give the ids' tokens); alone, decoding is a
                plain causal LM's, without constraint or saved guidance (a warning says so); with guidance, a
                `ValueError` (the streams are stacked as ids; pass `guidance_scale=1.0` to decode embeddings).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance `uncond + guidance_scale * (cond - uncond)` (the paper's α_c), with the
                streams as rows of one forward pass (transformers' own `guidance_scale` processor, which runs a second
                forward, is not used). 1 is the conditional distribution: one stream, the unconditional prompt unused.
            image_guidance_scale (`float`, *optional*):
                Instruct-CFG for editing: image scale s_I, with `guidance_scale` as the text scale s_T; needs
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
                The constraint's mode. `True`: the continuation is an image, and `max_new_tokens` defaults to
                `image_seq_length`. `False`: the continuation is text. `None` (default): the document layout decides —
                a `<break>` after text starts an image, anything else continues text (see [`next_token_modality`]);
                when every prompt starts an image, `max_new_tokens` defaults to `image_seq_length` too.
                While every row must write image codes the LM head computes only their columns.
            image_token_constraint (`bool`, *optional*, defaults to `True`):
                The modality constraint: an image is exactly `image_seq_length` image codes followed by
                `<break>`/`<eos>`, and text contains no image code. `False` samples the model's own distribution over
                the whole vocabulary (then `generate_image` must stay `None`).
            generation_mode (`str`, *optional*):
                transformers' name for the output modality (its `any-to-any` pipeline passes it): `"text"` changes
                nothing; `"image"` writes one image after the prompt: a `<break>` is appended to prompts that do not
                end in one (the text-to-image layout `<eos> text <break>`), `generate_image=True`, and exactly
                `image_seq_length` new tokens (a `max_new_tokens`/`max_length` given, such as the pipeline's default
                256, is replaced). The unconditional stream and the guidance scale default as for any image.
            generator (`torch.Generator`, *optional*):
                Makes sampling reproducible without touching the global RNG: every token is drawn from it
                ([`GeneratorSamplingLogitsProcessor`]), so threads sampling at once each get their own seed's tokens
                (the generator advances, so successive calls differ, as in diffusers). Beam sampling seeds a forked
                global RNG from it instead.
            kwargs:
                Everything `GenerationMixin.generate` takes (`attention_mask`, `max_new_tokens`, `do_sample`,
                `temperature`, `top_p`, `num_return_sequences`, ...).

        Returns:
            What `GenerationMixin.generate` returns; `sequences` are the conditional stream's.

        Example:

        ```python
        >>> import torch
        >>> from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM
        >>> config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
        >>> model = Cm3LeonForCausalLM(config).eval()
        >>> prompt = torch.tensor([[config.eos_token_id, 300, 301, config.break_token_id]])  # <eos> text <break>
        >>> out = model.generate(prompt, guidance_scale=3.0, generate_image=True, do_sample=True, top_p=0.8,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> image = out[0, prompt.shape[1]:]
        >>> len(image) == config.image_seq_length, bool((image >= config.image_token_offset).all())
        (True, True)

        ```
        """
        for old, new in RENAMED.items():
            if old in kwargs:
                raise ValueError(f"`{old}` is now `{new}` (one name from the command line to the logits processor).")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        self._check_call(input_ids, kwargs, generation_config)
        generation_mode = kwargs.pop("generation_mode", None)
        if generation_mode is not None:
            input_ids, generate_image = self._apply_generation_mode(generation_mode, input_ids, generate_image, kwargs)
        settings = self._decoding_settings(
            generation_config,
            input_ids,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            contrastive_k=contrastive_k,
            contrastive_alpha=contrastive_alpha,
            amateur_temperature=amateur_temperature,
            generate_image=generate_image,
            image_token_constraint=image_token_constraint,
        )
        streams = {"uncond": (uncond_input_ids, uncond_attention_mask),
                   "image_cond": (image_cond_input_ids, image_cond_attention_mask)}
        guided = self._resolve_guidance(settings, streams)
        if (settings["writes_image"] and self.device.type == "cuda" and kwargs.get("cache_implementation") is None
                and getattr(generation_config or self.generation_config, "cache_implementation", None) is None):
            # An image's length is known, so its cache can be allocated once: on an H200 (350M, bf16, CFG) 4.35 ms per
            # token against 13.0 with the growing dynamic cache. On CPU the dynamic cache is ~7% faster (tiny).
            kwargs["cache_implementation"] = "static"
        if guided and kwargs.get("inputs_embeds") is not None:
            raise ValueError("Guided decoding (guidance_scale, image_guidance_scale or contrastive_k, here "
                             f"{_guidance_in_use(settings)}, possibly from the generation config) stacks its streams "
                             "from ids: it cannot use `inputs_embeds`. Pass `input_ids` alone, or guidance_scale=1.0 to "
                             "decode the embeddings without guidance.")
        if input_ids is None:
            if guided or settings["generate_image"] is not None:
                raise ValueError("Guided or image-constrained generation needs the prompt `input_ids`.")
            if kwargs.get("inputs_embeds") is not None:
                warnings.warn(
                    "generate(inputs_embeds=...) without input_ids decodes as a plain causal LM: the modality constraint "
                    "and the saved guidance read the prompt's ids (where an image starts, the unconditional stream). "
                    "Pass input_ids as well for them.", stacklevel=2)
        elif guided or settings["image_token_constraint"]:
            kwargs, logits_processor = self._prepare_cm3leon_decoding(
                input_ids, kwargs, logits_processor, settings, streams, generation_config
            )
            input_ids = kwargs.pop("input_ids")
        return self._sample_from(generator, input_ids, generation_config, logits_processor, kwargs)

    def _check_call(self, input_ids, kwargs, generation_config) -> None:
        """What transformers' `generate` would run with anyway, or fail on deep inside: prompt ids that are not one
        row per prompt (1-D, or empty), an attention mask of another shape than the ids (or the embeddings), a
        `top_p` outside (0, 1] passed or saved in the generation config."""
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise ValueError(f"`input_ids` must be a tensor of token ids, got {type(input_ids).__name__}.")
            if input_ids.ndim != 2:
                hint = " (one prompt: `input_ids[None]`)" if input_ids.ndim == 1 else ""
                raise ValueError(f"`input_ids` has shape {tuple(input_ids.shape)}; it needs (batch_size, length){hint}.")
            if input_ids.shape[1] == 0 and embeds is None:
                raise ValueError("The prompt is empty (`input_ids` of length 0): give at least one token; a CM3Leon "
                                 "document starts with <eos> (the processor writes it).")
        mask = kwargs.get("attention_mask")
        reference = embeds.shape[:2] if embeds is not None else (input_ids.shape if input_ids is not None else None)
        if mask is not None and reference is not None and tuple(mask.shape) != tuple(reference):
            what = "inputs_embeds" if embeds is not None else "input_ids"  # the words of the guided check
            raise ValueError(f"The attention mask of `{what}` has shape {tuple(mask.shape)}, its ids "
                             f"{tuple(reference)}: a mask of another length would drop or invent tokens.")
        if kwargs.get("top_p") is not None:
            check_top_p(kwargs["top_p"])
        else:
            saved = getattr(generation_config if generation_config is not None else self.generation_config, "top_p", None)
            if saved is not None:
                check_top_p(saved, "top_p of the generation config (generation_config.json)")

    def _sample_from(self, generator, input_ids, generation_config, logits_processor, kwargs):
        """`GenerationMixin.generate`, every sampled token drawn from `generator` when one is given."""
        source = generation_config if generation_config is not None else self.generation_config
        sampling = kwargs.get("do_sample", source.do_sample)
        if generator is None or not sampling:  # greedy decoding draws nothing
            return super().generate(input_ids, generation_config, logits_processor, **kwargs)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        if (kwargs.get("num_beams") or source.num_beams or 1) == 1:
            processors = LogitsProcessorList([*(logits_processor or []), GeneratorSamplingLogitsProcessor(generator)])
            with torch.random.fork_rng(devices=devices):  # transformers' multinomial still draws (a one-hot choice)
                return super().generate(input_ids, generation_config, processors, **kwargs)
        # Beam sampling draws several candidates per beam: seed a forked global RNG from the generator instead (the
        # same images for a seed, but not safe against other threads using the global RNG at the same time).
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return super().generate(input_ids, generation_config, logits_processor, **kwargs)

    @staticmethod
    def _resolve_guidance(settings: dict, streams: dict) -> bool:
        """Whether this call is guided. A scale of 1 without instruct-CFG or CD-K is the conditional stream exactly:
        it is dropped, with the unconditional prompt, and decoding runs one stream."""
        for name in ("guidance_scale", "image_guidance_scale"):  # before the shortcut below: True == 1.0 in Python
            if settings[name] is not None:
                check_guidance_scale(settings[name], name)
        guided = any(settings[name] is not None for name in GUIDANCE_SETTINGS)
        extra_prompts = (*streams["uncond"], *streams["image_cond"])
        if not guided and any(x is not None for x in extra_prompts):
            raise ValueError("Unconditional or image-conditional prompts need `guidance_scale` or `contrastive_k`.")
        if settings["guidance_scale"] == 1.0 and settings["image_guidance_scale"] is None and settings["contrastive_k"] is None:
            settings["guidance_scale"] = None
            streams["uncond"] = (None, None)
            return False
        return guided

    def _apply_generation_mode(self, generation_mode, input_ids, generate_image, kwargs: dict):
        """`generation_mode="image"`/`"text"` (transformers' any-to-any convention) → `generate`'s own arguments
        (see `generate`'s docstring); `kwargs` is updated in place."""
        if generation_mode == "text":
            return input_ids, generate_image
        if generation_mode != "image":
            raise ValueError(f"CM3Leon writes text or images: generation_mode must be 'text' or 'image', got "
                             f"{generation_mode!r}.")
        if generate_image is False:
            raise ValueError("generation_mode='image' contradicts generate_image=False.")
        if input_ids is None:
            raise ValueError("generation_mode='image' needs the prompt `input_ids`.")
        config = self.config
        ends_in_break = input_ids[:, -1] == config.break_token_id
        if not bool(ends_in_break.all()):
            if bool(ends_in_break.any()):
                raise ValueError("Some prompts end in <break> and others do not: write it at the end of all or none.")
            column = torch.full_like(input_ids[:, :1], config.break_token_id)
            input_ids = torch.cat([input_ids, column], dim=1)
            if kwargs.get("attention_mask") is not None:
                mask = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        kwargs.pop("max_length", None)
        kwargs["max_new_tokens"] = config.image_seq_length
        kwargs.pop("min_new_tokens", None)
        return input_ids, True

    def _decoding_settings(self, generation_config, input_ids, **passed) -> dict:
        """This call's decoding settings: what it passed, else the generation config's, else `DECODING_DEFAULTS`."""
        source = generation_config if generation_config is not None else self.generation_config
        settings = {}
        for name, default in DECODING_DEFAULTS.items():
            value = passed[name]
            if value is None and name not in GUIDANCE_SETTINGS:
                value = getattr(source, name, None)
            settings[name] = default if value is None else value
        if not isinstance(settings["image_token_constraint"], bool):
            raise ValueError(f"`image_token_constraint` must be True or False, got {settings['image_token_constraint']!r}.")
        if not settings["image_token_constraint"] and settings["generate_image"] is not None:
            raise ValueError("`generate_image` needs the modality constraint (`image_token_constraint=True`).")
        settings["writes_image"] = self._writes_image(input_ids, settings)
        if all(passed[name] is None for name in GUIDANCE_SETTINGS) and settings["writes_image"]:
            for name in GUIDANCE_SETTINGS:  # the saved guidance applies to images only
                settings[name] = getattr(source, name, None)
        return settings

    def _writes_image(self, input_ids, settings) -> bool:
        """Whether every prompt's continuation starts with an image code (one host read, once per call)."""
        if input_ids is None or not settings["image_token_constraint"] or settings["generate_image"] is False:
            return False
        return bool(settings["generate_image"]) or image_steps_ahead(input_ids, self.config, None) > 0

    def _prepare_cm3leon_decoding(
        self, input_ids, kwargs, logits_processor, settings, streams, generation_config
    ) -> tuple[dict, LogitsProcessorList]:
        """Check the decoding arguments, build the modality constraint and the guidance processor, and stack the
        streams of guided decoding into a `Cm3LeonDecodingPlan`."""
        guided = any(settings[name] is not None for name in GUIDANCE_SETTINGS)
        self._check_guidance(settings, streams["image_cond"][0], kwargs, generation_config, guided)
        processors = self._stream_processors(settings)
        max_new_tokens = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        if settings["writes_image"] and max_new_tokens is None and kwargs.get("max_length") is None:
            # an image is image_seq_length codes, whatever transformers' default max_length (20) says
            max_new_tokens = kwargs["max_new_tokens"] = self.config.image_seq_length
        rows = [(input_ids, kwargs.pop("attention_mask", None))]
        if guided:
            num_return_sequences = kwargs.pop("num_return_sequences", None)
            if num_return_sequences is None:
                num_return_sequences = getattr(generation_config or self.generation_config, "num_return_sequences", None) or 1
            rows = self._stream_rows(rows[0], streams, settings["image_guidance_scale"] is not None, num_return_sequences)
        prompt_length = max(ids.shape[1] for ids, _ in rows)
        if max_new_tokens is not None and prompt_length + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"The prompt ({prompt_length} tokens, the longest of its {len(rows)} stream(s)) plus {max_new_tokens} "
                f"new tokens exceeds the context of {self.config.max_position_embeddings} tokens."
            )
        cond_ids, cond_mask = rows[0]
        if guided:
            plan = self._stacked_plan(rows, prompt_length, max_new_tokens, settings)
        else:
            plan = Cm3LeonDecodingPlan(None, None, 1, settings["generate_image"], settings["image_token_constraint"])
        kwargs.update(input_ids=cond_ids, decoding_plan=plan)
        if cond_mask is not None:
            kwargs["attention_mask"] = cond_mask
        return kwargs, LogitsProcessorList([*(logits_processor or []), *processors])

    @staticmethod
    def _check_guidance(settings, image_cond_ids, kwargs, generation_config, guided) -> None:
        """Combinations of guidance arguments that cannot run (each value is checked by its processor)."""
        guidance_scale, image_guidance_scale, contrastive_k = (settings[name] for name in GUIDANCE_SETTINGS)
        if contrastive_k is not None and (guidance_scale is not None or image_guidance_scale is not None):
            raise ValueError("Choose one of CD-K (`contrastive_k`) and CFG (`guidance_scale`/`image_guidance_scale`).")
        if image_guidance_scale is not None and guidance_scale is None:
            raise ValueError("Instruct-CFG needs both `image_guidance_scale` and `guidance_scale` (the text scale).")
        if image_guidance_scale is not None and image_cond_ids is None:
            raise ValueError(
                "An editing call (`image_guidance_scale`) needs `image_cond_input_ids`: the prompt with the source "
                "image and without the instruction."
            )
        if image_guidance_scale is None and image_cond_ids is not None:
            raise ValueError("`image_cond_input_ids` is only used by instruct-CFG (`image_guidance_scale`).")
        if guided:
            for name in ("assistant_model", "negative_prompt_ids"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"`{name}` cannot be combined with CM3Leon's guided decoding.")
            num_beams = kwargs.get("num_beams", getattr(generation_config, "num_beams", 1))
            if num_beams not in (None, 1):
                raise ValueError("Guided decoding samples or decodes greedily; beam search is not supported.")

    def _stream_processors(self, settings) -> list[LogitsProcessor]:
        """The modality constraint and the guidance processor of this call; each checks its own arguments, which
        carry `generate`'s names."""
        config = self.config
        processors = []
        if settings["image_token_constraint"]:
            processors.append(
                ImageTokenConstraintLogitsProcessor(
                    image_token_offset=config.image_token_offset,
                    image_vocab_size=config.image_vocab_size,
                    image_seq_length=config.image_seq_length,
                    end_of_image_token_ids=[t for t in (config.break_token_id, config.eos_token_id) if t is not None],
                    vocab_size=config.vocab_size,
                    generate_image=settings["generate_image"],
                )
            )
        if settings["contrastive_k"] is not None:
            processors.append(
                ContrastiveDecodingLogitsProcessor(
                    contrastive_alpha=settings["contrastive_alpha"],
                    contrastive_k=settings["contrastive_k"],
                    amateur_temperature=settings["amateur_temperature"],
                    vocab_size=config.image_vocab_size if settings["generate_image"] else config.vocab_size,
                )
            )
        elif settings["image_guidance_scale"] is not None:
            processors.append(
                InstructClassifierFreeGuidanceLogitsProcessor(settings["image_guidance_scale"], settings["guidance_scale"])
            )
        elif settings["guidance_scale"] is not None:
            processors.append(BatchedClassifierFreeGuidanceLogitsProcessor(settings["guidance_scale"]))
        return processors

    def _stream_rows(self, cond, streams, instruct: bool, num_return_sequences) -> list[tuple]:
        """The (ids, mask) of every stream, checked against the conditional prompts and repeated for
        `num_return_sequences` (here rather than by transformers, which does not know the extra streams)."""
        input_ids = cond[0]
        batch_size = input_ids.shape[0]
        uncond_ids, uncond_mask = streams["uncond"]
        if uncond_ids is None:  # <eos> <mask:0> <break> (without <eos> for a config that has none)
            default = [t for t in Cm3LeonLayout.of(self.config).unconditional_prompt() if t is not None]
            uncond_ids = torch.tensor([default], device=input_ids.device).expand(batch_size, -1)
        rows = [cond, (uncond_ids, uncond_mask), *([streams["image_cond"]] if instruct else [])]
        names = ("input_ids", "uncond_input_ids", "image_cond_input_ids")
        for i, (ids, mask) in enumerate(rows):
            if ids.ndim != 2 or ids.shape[0] != batch_size:
                raise ValueError(f"`{names[i]}` has shape {tuple(ids.shape)}; it needs ({batch_size}, length): one "
                                 f"prompt per conditional prompt.")
            if mask is not None and mask.shape != ids.shape:
                raise ValueError(f"The attention mask of `{names[i]}` has shape {tuple(mask.shape)}, its ids "
                                 f"{tuple(ids.shape)}: a mask of another length would drop or invent tokens.")
            rows[i] = (ids, torch.ones_like(ids) if mask is None else mask)
        n = num_return_sequences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`num_return_sequences` must be a positive integer, got {n!r}.")
        return [(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)) for ids, mask in rows]

    def _stacked_plan(self, rows, prompt_length, max_new_tokens, settings) -> Cm3LeonDecodingPlan:
        """The streams left-padded to one length and stacked stream-major, with room in the mask for the new tokens."""
        pad = self.config.pad_token_id
        padded = [
            (
                nn.functional.pad(ids, (prompt_length - ids.shape[1], 0), value=pad),
                nn.functional.pad(mask, (prompt_length - mask.shape[1], 0), value=0),
            )
            for ids, mask in rows
        ]
        mask = torch.cat([mask for _, mask in padded])
        room = max_new_tokens if max_new_tokens is not None else self.config.max_position_embeddings - prompt_length
        return Cm3LeonDecodingPlan(
            input_ids=torch.cat([ids for ids, _ in padded]),
            attention_mask=nn.functional.pad(mask, (0, max(room, 1)), value=1),
            num_streams=len(rows),
            generate_image=settings["generate_image"],
            constrained=settings["image_token_constraint"],
            prompt_length=prompt_length,
            real_lengths=mask.long().sum(-1),
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache=None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        decoding_plan: Cm3LeonDecodingPlan | None = None,
        **kwargs,
    ) -> dict:
        """Expand each prompt into its streams: the stacked prompts on the first step, then the last sampled token of
        every prompt repeated for each stream, with the streams' own growing attention mask. In image mode, ask for
        the image columns of the LM head only when every row must emit an image code."""
        if decoding_plan is not None and not is_first_iteration:
            decoding_plan.steps += 1
        if decoding_plan is not None and decoding_plan.num_streams > 1:
            kwargs.pop("position_ids", None)  # transformers' are the conditional stream's; ours come from the mask
            mask = decoding_plan.step_mask()
            if is_first_iteration:
                stream_ids = decoding_plan.input_ids
                # Positions count each stream's real tokens (left padding does not shift them). The forward pass
                # would read them off a 2D mask, but transformers turns the mask 4D for a static cache.
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                stream_ids = input_ids[:, -1:].repeat(decoding_plan.num_streams, 1)  # (streams * batch, 1)
                positions = (decoding_plan.real_lengths + (decoding_plan.steps - 1)).unsqueeze(-1)
            model_inputs = super().prepare_inputs_for_generation(
                stream_ids,
                cache=cache,
                attention_mask=mask,
                is_first_iteration=is_first_iteration,
                **kwargs,
            )
            model_inputs["position_ids"] = positions[:, -model_inputs["input_ids"].shape[1]:]
        else:
            model_inputs = super().prepare_inputs_for_generation(
                input_ids, next_sequence_length, cache, attention_mask, inputs_embeds, is_first_iteration, **kwargs
            )
        if decoding_plan is not None and decoding_plan.constrained and decoding_plan.generate_image is not False:
            config = self.config
            if decoding_plan.image_steps is None:  # the first step: one host read for the whole call
                decoding_plan.image_steps = image_steps_ahead(input_ids, config, decoding_plan.generate_image)
            if decoding_plan.steps < decoding_plan.image_steps:
                model_inputs["logits_vocab_range"] = (
                    config.image_token_offset,
                    config.image_token_offset + config.image_vocab_size,
                )
        return model_inputs

    def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
        # The stream processors must see the stacked streams first (constraint, then guidance): every other processor
        # expects one row per prompt. transformers appends custom processors after its own, hence this reordering.
        # The generator's draw comes last, after transformers' warpers (temperature, top-k, top-p), which it appends
        # after the custom processors.
        # `guidance_scale` is ours (a batched stream processor, built above): as MusicGen and Janus do, clear it so that
        # transformers does not add its own unbatched CFG processor, which would run a second forward per token.
        generation_config = kwargs.get("generation_config", args[0] if args else None)
        if generation_config is not None:
            generation_config.guidance_scale = None
        processors = super()._get_logits_processor(*args, **kwargs)
        rank = {cls: i for i, cls in enumerate(STREAM_PROCESSORS)}
        first = sorted((p for p in processors if type(p) in rank), key=lambda p: rank[type(p)])
        last = [p for p in processors if isinstance(p, GeneratorSamplingLogitsProcessor)]
        middle = [p for p in processors if type(p) not in rank and p not in last]
        return LogitsProcessorList([*first, *middle, *last])


__all__ = ["CONTRASTIVE_K", "DECODING_DEFAULTS", "SAMPLING_DEFAULTS", "Cm3LeonDecodingPlan", "Cm3LeonGenerationMixin"]
