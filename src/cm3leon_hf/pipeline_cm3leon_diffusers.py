"""CM3Leon as a diffusers `DiffusionPipeline`: text → image with diffusers' habits, on the same model, processor and
generation code as the transformers `"text-to-image"` pipeline (`pipelines.Cm3LeonTextToImagePipeline`).

CM3Leon is no diffusion model: an image is `image_seq_length` VQ codes written one token at a time by a decoder-only
transformer and decoded to pixels by the processor's VQ. What a diffusers user expects works:

- `DiffusionPipeline.from_pretrained(saved_dir, trust_remote_code=True)` (the directory holds a two-line
  `pipeline_cm3leon.py` that imports this class, as diffusers' custom pipelines do) or
  `Cm3LeonDiffusionPipeline.from_pretrained(saved_dir)`; `save_pretrained` writes `model/`, `processor/` and
  `model_index.json`. `Cm3LeonDiffusionPipeline.from_transformers(path)` builds one from a saved CM3Leon directory
  (the bundled tiny model: `TINY_PATH`).
- `pipe(prompt).images[0]`, `return_dict=False` (a tuple), diffusers' `ImagePipelineOutput`.
- `generator` (one, or one per image), `num_images_per_prompt`, `guidance_scale`, `negative_prompt`,
  `output_type` `"pil"`, `"np"` (float32 `(N, H, W, 3)` in [0, 1]), `"pt"` (float32 `(N, 3, H, W)` in [0, 1]) or
  `"latent"` (the image token ids, `(N, image_seq_length)`: a token model's latents).
- `callback_on_step_end(pipe, step, timestep, callback_kwargs)` after every generated image token, with
  `callback_kwargs["image_ids"]`, the tokens written so far (`(batch, step + 1)`); `timestep` is the step too (there
  is no noise schedule). Its return value is not read back: the tokens are sampled, not latents to edit.
- `.to(device)`, `set_progress_bar_config(...)` (one bar over image tokens), `enable_model_cpu_offload()` (needs
  `accelerate`; the model is the one large module, so it only moves it to the accelerator for the call).
- CM3Leon's own arguments pass through: `decoding` (`"top-p"`, `"temperature"`, `"cd-k"`, `"pooled"`), `top_p`,
  `temperature`, `contrastive_k`…, `num_candidates` + `reranker` (a CLIP `SentenceTransformer`), `retriever` +
  `num_retrieved_docs`.

diffusers arguments that mean nothing to a token model are refused by name: `num_inference_steps` (an image is always
`image_seq_length` tokens), `height`/`width` other than the image tokenizer's resolution, `latents`, `prompt_embeds`,
`timesteps`, `sigmas`, `eta`, `guidance_rescale`…

Example:

```python
>>> import torch
>>> from cm3leon_hf.pipeline_cm3leon_diffusers import Cm3LeonDiffusionPipeline
>>> from cm3leon_hf.pretrained import TINY_PATH
>>> pipe = Cm3LeonDiffusionPipeline.from_transformers(TINY_PATH)
>>> pipe.set_progress_bar_config(disable=True)
>>> image = pipe("a large red circle at the top left on a white background",
...              generator=torch.Generator().manual_seed(0)).images[0]
>>> image.size
(64, 64)
>>> pipe("a red star", num_images_per_prompt=2, output_type="pt").images.shape
torch.Size([2, 3, 64, 64])

```
"""

import inspect
import json
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from transformers.generation.streamers import BaseStreamer

from .modeling_cm3leon import Cm3LeonForCausalLM
from .processing_cm3leon import Cm3LeonProcessor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# diffusers arguments with no meaning for a token model, and why (the error names them).
NOT_APPLICABLE = {
    "num_inference_steps": "an image is always `image_seq_length` tokens, one step each",
    "timesteps": "there is no noise schedule",
    "sigmas": "there is no noise schedule",
    "eta": "there is no noise schedule",
    "guidance_rescale": "there is no noise prediction to rescale",
    "latents": "the image is sampled token by token (pass a `generator` to fix it)",
    "prompt_embeds": "the prompt is read as token ids (pass `prompt`)",
    "negative_prompt_embeds": "the prompt is read as token ids (pass `negative_prompt`)",
    "cross_attention_kwargs": "the model has no cross-attention",
    "clip_skip": "the model has no CLIP text encoder",
    "strength": "this pipeline draws from text only",
    "image": "this pipeline draws from text only (use the 'image-text-to-image' transformers pipeline)",
}
CUSTOM_PIPELINE_FILE = "pipeline_cm3leon.py"
_SHIM = (
    '"""Loads `Cm3LeonDiffusionPipeline` from the installed cm3leon_hf package (pip install cm3leon-hf)."""\n\n'
    "from cm3leon_hf.pipeline_cm3leon_diffusers import Cm3LeonDiffusionPipeline  # noqa: F401\n"
)


class _StepCallbacks(BaseStreamer):
    """`generate`'s streamer hook → the diffusers progress bar and `callback_on_step_end`. Each `generate` call puts
    its prompt first, then one token per step, then ends."""

    def __init__(self, pipe, bar, callback, tensor_inputs):
        self.pipe, self.bar, self.callback, self.tensor_inputs = pipe, bar, callback, tensor_inputs
        self.prompt_next, self.tokens, self.step = True, [], 0

    def put(self, value):
        if self.prompt_next:
            self.prompt_next, self.tokens = False, []
            return
        self.tokens.append(value.reshape(-1))
        if self.callback is not None:
            tensors = {"image_ids": torch.stack(self.tokens, dim=-1)}
            self.callback(self.pipe, self.step, self.step, {k: tensors[k] for k in self.tensor_inputs})
        self.step += 1
        self.bar.update()

    def end(self):
        self.prompt_next = True


class Cm3LeonDiffusionPipeline(DiffusionPipeline):
    r"""
    Text-to-image with CM3Leon as a diffusers pipeline (see the module docstring).

    Args:
        model ([`Cm3LeonForCausalLM`]): the decoder-only model; its `generation_config` gives the default decoding
            (`guidance_scale`, `top_p`).
        processor ([`Cm3LeonProcessor`]): the text BPE and the VQ image tokenizer (a diffusers `VQModel`).
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["image_ids"]

    def __init__(self, model: Cm3LeonForCausalLM, processor: Cm3LeonProcessor):
        super().__init__()
        processor.validate_model_config(model.config)
        self.register_modules(model=model, processor=processor)

    @classmethod
    def from_transformers(cls, pretrained_model_name_or_path, **kwargs) -> "Cm3LeonDiffusionPipeline":
        """A pipeline from a saved CM3Leon directory (model and processor side by side, as `TINY_PATH`); keyword
        arguments go to `Cm3LeonForCausalLM.from_pretrained`."""
        model = Cm3LeonForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs).eval()
        processor = Cm3LeonProcessor.from_pretrained(pretrained_model_name_or_path, model_config=model.config)
        return cls(model=model, processor=processor)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' layout (`model_index.json`, `model/`, `processor/`) plus `pipeline_cm3leon.py`, named in
        `model_index.json`, so that `DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)` finds
        this class."""
        super().save_pretrained(save_directory, *args, **kwargs)
        with open(os.path.join(save_directory, CUSTOM_PIPELINE_FILE), "w") as f:
            f.write(_SHIM)
        index_path = os.path.join(save_directory, self.config_name)
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [CUSTOM_PIPELINE_FILE[: -len(".py")], type(self).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """`model_index.json`, read as naming this class itself when loaded through it
        (`Cm3LeonDiffusionPipeline.from_pretrained(path)`): then no code from the directory runs, and no
        `trust_remote_code` is needed. Through `DiffusionPipeline.from_pretrained` the saved name points diffusers to
        `pipeline_cm3leon.py`."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and name[-1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return loaded

    @property
    def resolution(self) -> int:
        """The side of every image, in pixels (the VQ's)."""
        return self.processor.image_tokenizer.resolution

    @staticmethod
    def _transformers_arguments() -> set:
        """CM3Leon's decoding arguments, those of the transformers `"text-to-image"` pipeline that runs the call."""
        from .pipelines import Cm3LeonTextToImagePipeline

        names = set(inspect.signature(Cm3LeonTextToImagePipeline._sanitize_parameters).parameters)
        return names - {"self", "generate_kwargs", "progress_bar", "output_type"}

    def check_inputs(self, prompt, negative_prompt, height, width, num_images_per_prompt, output_type,
                     callback_on_step_end, callback_on_step_end_tensor_inputs, kwargs: dict) -> None:
        """Everything diffusers-specific, before any work; CM3Leon's own arguments are checked by the transformers
        pipeline's `check_inputs` (guidance scale, generators, decoding) before generating."""
        refused = {name: NOT_APPLICABLE[name] for name in kwargs if name in NOT_APPLICABLE}
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != self.resolution:
                refused[name] = (f"the image tokenizer draws {self.resolution}x{self.resolution} images only "
                                 f"(got {name}={value})")
        if refused:
            raise ValueError("Arguments that do not apply to CM3Leon, a token model: "
                             + "; ".join(f"`{name}`: {why}" for name, why in refused.items()) + ".")
        unknown = sorted(set(kwargs) - set(NOT_APPLICABLE) - self._transformers_arguments() - {"streamer"})
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__ got unexpected arguments {unknown}.")
        if prompt is None or not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                                              and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        if isinstance(negative_prompt, (list, tuple)) and (
                isinstance(prompt, str) or len(negative_prompt) != len(prompt)):
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for "
                             f"{1 if isinstance(prompt, str) else len(prompt)} prompts.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("`callback_on_step_end` must be callable: (pipe, step, timestep, callback_kwargs).")
        wrong = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if wrong:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` can hold {self._callback_tensor_inputs}, got {wrong}.")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("image_ids",),
        height: int | None = None,
        width: int | None = None,
        **kwargs,
    ):
        r"""
        Draw `num_images_per_prompt` images for each prompt.

        Args:
            prompt (`str` or `list[str]`): what to draw.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional stream's text instead of the
                paper's `<mask:0>`.
            guidance_scale (`float`, *optional*): CFG scale; defaults to the model's saved `guidance_scale`.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or a list, *optional*): one for the call, or one per image
                (`len(prompt) * num_images_per_prompt`, or per candidate with `num_candidates`): image i then
                depends on generator i alone.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (image token ids).
            return_dict (`bool`, defaults to `True`): an `ImagePipelineOutput`, else the tuple `(images,)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after every image token as `callback(pipe, step, timestep, callback_kwargs)`.
            callback_on_step_end_tensor_inputs (`list[str]`): what `callback_kwargs` holds: `"image_ids"`.
            height, width (`int`, *optional*): only the image tokenizer's resolution (`pipe.resolution`).
            **kwargs: CM3Leon's decoding arguments (`decoding`, `top_p`, `temperature`, `contrastive_k`,
                `num_candidates`, `reranker`, `retriever`, `num_retrieved_docs`…) and `streamer`.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images, prompt by prompt.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, height, width, num_images_per_prompt, output_type,
                          callback_on_step_end, list(callback_on_step_end_tensor_inputs), kwargs)
        from .pipelines import Cm3LeonTextToImagePipeline, _StreamerPair

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        if isinstance(generator, (list, tuple)):
            if len(generator) % len(prompts):
                raise ValueError(f"`generator` has {len(generator)} generators for {len(prompts)} prompts: give one, or "
                                 f"the same number per prompt (one per image).")
            per_prompt = len(generator) // len(prompts)
            generators = [list(generator[i * per_prompt:(i + 1) * per_prompt]) for i in range(len(prompts))]
        else:
            generators = [generator] * len(prompts)
        text_to_image = Cm3LeonTextToImagePipeline(model=self.model, processor=self.processor,
                                                   device=self._execution_device)
        streamer = kwargs.pop("streamer", None)
        calls = len(generators[0]) if isinstance(generator, (list, tuple)) else (
            2 if kwargs.get("decoding") == "pooled" and kwargs.get("num_candidates", num_images_per_prompt) > 1 else 1)
        total = len(prompts) * calls * self.model.config.image_seq_length
        images = []
        with self.progress_bar(total=total) as bar:
            steps = _StepCallbacks(self, bar, callback_on_step_end, list(callback_on_step_end_tensor_inputs))
            for text, negative, prompt_generator in zip(prompts, negatives, generators):
                results = text_to_image(
                    text, negative_prompt=negative, guidance_scale=guidance_scale,
                    num_images_per_prompt=num_images_per_prompt, generator=prompt_generator,
                    output_type="ids" if output_type == "latent" else "pil", progress_bar=False,
                    streamer=_StreamerPair(steps, streamer), **kwargs,
                )
                images.extend(r["image"] for r in results)
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = torch.stack(images)
        elif output_type in ("np", "pt"):
            images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])  # diffusers' np
            if output_type == "pt":
                images = torch.from_numpy(images).permute(0, 3, 1, 2)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


__all__ = ["Cm3LeonDiffusionPipeline"]
