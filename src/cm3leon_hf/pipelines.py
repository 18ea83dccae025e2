"""CM3Leon pipelines, registered with transformers' `PIPELINE_REGISTRY` when `cm3leon_hf` is imported:

- `"text-to-image"` [`Cm3LeonTextToImagePipeline`]: prompt → images (CFG, CD-K, or the paper's pooled "½ top-p + ½
  CD-K" candidates), optional retrieved documents in the prompt and CLIP re-ranking of N candidates.
- `"image-text-to-image"` [`Cm3LeonImageTextToImagePipeline`]: image + instruction → image (editing with instruct-CFG,
  or structure-guided generation with plain CFG). transformers 5 has removed `"image-to-image"` (it points users to
  diffusers), hence the name, symmetric with its `"image-text-to-text"`.
- Image → text (captioning, VQA) needs no pipeline of ours: the model is registered for
  `AutoModelForImageTextToText`, the processor's chat template writes the CM3 infill prompt, and transformers'
  own `pipeline("image-text-to-text")` runs it.

Arguments follow diffusers (`prompt`, `negative_prompt`, `guidance_scale`, `image_guidance_scale`,
`num_images_per_prompt`, `generator`, `output_type`) and are `Cm3LeonForCausalLM.generate`'s names too; every argument
is checked in `check_inputs` before any work (as diffusers' pipelines do), and the prompt's streams come from
`Cm3LeonProcessor.encode_prompt`. Defaults the call leaves out come from the model's generation config (its saved
`guidance_scale`, `top_p`, CD-K settings). Prompts of different lengths are batched together with `batch_size=`. A
pipeline saved with `save_pretrained` carries its code and loads elsewhere with `pipeline(task, model=path,
trust_remote_code=True)`.
"""

import math
import string

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Pipeline
from transformers.generation.streamers import BaseStreamer
from transformers.pipelines import PIPELINE_REGISTRY

from .generation_cm3leon import CONTRASTIVE_K, DECODING_DEFAULTS
from .layout import EDIT_TEMPLATE, EDIT_TEMPLATES, INFILL_TEMPLATES, STRUCTURE_TEMPLATES
from .logits_process import check_guidance_scale, check_top_p

DECODING_STRATEGIES = ("top-p", "temperature", "cd-k", "pooled")
OUTPUT_TYPES = ("pil", "np", "ids")
# The paper's scales where a model saved none: its text-to-image demo (CL §3.1) and its editing (CL §4.1: text 7.5,
# image 1.5). A saved model's `generation_config.guidance_scale` wins for text-to-image.
PAPER_GUIDANCE_SCALE = 3.0
PAPER_EDIT_GUIDANCE_SCALES = {"guidance_scale": 7.5, "image_guidance_scale": 1.5}


def _image_tasks() -> dict[str, dict]:
    """The image-conditioned tasks of CL §4.1 as `Cm3LeonImageTextToImagePipeline(task=...)` presets: the prompt part of
    the instruction-tuning template (`layout`'s first form of each, which the world's SFT rows use, with its
    text field as `{prompt}`) and the paper's guidance: instruct-CFG text 7.5 / image 1.5 for editing, CFG 3 for
    structure-guided generation; infilling (our choice: the paper gives no scale for it) takes CFG 3 too, with the
    region as the prompt, written as the world writes boxes: `"(x1, y1) -> (x2, y2)"` on a 0–255 scale."""

    def prompt_part(template: str, field: str) -> str:  # "... {field} <break> <image>" -> "... {prompt} <break>"
        return template.replace(f"{{{field}}}", "{prompt}").rsplit(" <image>", 1)[0]

    structure = {"guidance_scale": 3.0, "image_guidance_scale": None}
    return {
        "edit": {"template": prompt_part(EDIT_TEMPLATES[0], "instruction"), **PAPER_EDIT_GUIDANCE_SCALES},
        "edge": {"template": prompt_part(STRUCTURE_TEMPLATES["edge"][0], "caption"), **structure},
        "segmentation": {"template": prompt_part(STRUCTURE_TEMPLATES["segmentation"][0], "caption"), **structure},
        "infill": {"template": prompt_part(INFILL_TEMPLATES[0], "region"), **structure},
    }


IMAGE_TASKS = _image_tasks()


class TokenProgressBar(BaseStreamer):
    """A tqdm bar over generated tokens, fed by `generate`'s streamer hook (the first call carries the prompt)."""

    def __init__(self, total: int, desc: str, disable: bool = False):
        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=disable)
        self.prompt_seen = False
        self.steps = 0

    def put(self, value):
        if self.prompt_seen:
            self.steps += 1
            self.bar.update(1)
        self.prompt_seen = True

    def end(self):
        self.bar.close()


class _StreamerPair(BaseStreamer):
    """Feeds `generate`'s streamer hook to the pipeline's progress bar and to the caller's own streamer."""

    def __init__(self, *streamers):
        self.streamers = [s for s in streamers if s is not None]

    def put(self, value):
        for streamer in self.streamers:
            streamer.put(value)

    def end(self):
        for streamer in self.streamers:
            streamer.end()


def _check_generate_kwargs(config, generate_kwargs: dict | None) -> None:
    """The caller's `generate` keywords may not change an image's length: exactly `image_seq_length` tokens."""
    for name in ("max_new_tokens", "min_new_tokens"):
        value = (generate_kwargs or {}).get(name)
        if value is not None and value != config.image_seq_length:
            raise ValueError(f"An image is exactly {config.image_seq_length} tokens; got {name}={value}.")
    if (generate_kwargs or {}).get("max_length") is not None:
        raise ValueError(f"`max_length` does not apply: an image is exactly {config.image_seq_length} tokens.")


def _image_generate_kwargs(generate_kwargs: dict | None) -> tuple[dict, object]:
    """The caller's `generate` keywords without those the pipeline owns (the image's length), and its `streamer`,
    which is fed alongside the progress bar."""
    kwargs = {k: v for k, v in (generate_kwargs or {}).items() if k not in ("max_new_tokens", "min_new_tokens", "max_length")}
    return kwargs, kwargs.pop("streamer", None)


def _check_generator(generator, count: int) -> None:
    """One generator, none, or a list of `count` (one per image; diffusers' convention)."""
    if isinstance(generator, (list, tuple)) and (
        len(generator) != count or not all(isinstance(g, torch.Generator) for g in generator)
    ):
        raise ValueError(f"`generator` must be one torch.Generator or a list of {count} (one per image), got "
                         f"{len(generator)} items.")


def _check_common(config, params: dict, num_images: int) -> None:
    """What both pipelines take: guidance scales, the output type, generators, `generate` keywords."""
    for name in ("guidance_scale", "image_guidance_scale"):
        if params.get(name) is not None:
            check_guidance_scale(params[name], name)
    if params.get("output_type", "pil") not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {params['output_type']!r}.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images!r}.")
    _check_generate_kwargs(config, params.get("generate_kwargs"))


def _merged(pipe: Pipeline, *stages: dict) -> dict:
    """This call's parameters over those given at construction (as transformers merges them after
    `_sanitize_parameters`), so that `check_inputs` sees what will run."""
    merged = {}
    for name in ("_preprocess_params", "_forward_params", "_postprocess_params"):
        merged.update(getattr(pipe, name, None) or {})
    for stage in stages:
        merged.update(stage)
    return merged


def _rerank(reranker, images: list, prompt: str) -> np.ndarray:
    """CLIP scores (cosine of image and prompt embeddings) with a sentence-transformers CLIP model."""
    image_embeddings = reranker.encode(images, convert_to_numpy=True, normalize_embeddings=True)
    text_embedding = reranker.encode([prompt], convert_to_numpy=True, normalize_embeddings=True)
    return image_embeddings @ text_embedding[0]


def _image_outputs(pipe: Pipeline, image_ids: torch.Tensor, prompt: str, output_type: str, reranker, keep: int) -> list:
    """(candidates, image_seq_length) image ids → the `keep` best images as dicts, CLIP-ranked when a reranker is
    given (best first)."""
    scores = None
    order = list(range(keep))
    if reranker is not None:
        images = pipe.processor.decode_image_tokens(image_ids)
        scores = _rerank(reranker, images, prompt)
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:keep]]
    elif output_type != "ids":
        images = pipe.processor.decode_image_tokens(image_ids[:keep])
    outputs = []
    for i in order:
        if output_type == "ids":
            image = image_ids[i]
        else:
            image = images[i] if output_type == "pil" else np.asarray(images[i])
        outputs.append({"image": image, "score": None if scores is None else float(scores[i])})
    return outputs


class _Cm3LeonPipeline(Pipeline):
    """What both CM3Leon pipelines share: they load the model's `Cm3LeonProcessor` (not a bare tokenizer or image
    processor), check it against the model, and save it with the model."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"{type(self).__name__} needs the model's Cm3LeonProcessor (`processor=`).")
        self.processor.validate_model_config(self.model.config)
        # `device=` moves the model; the VQ (encoding edited images, decoding every output) goes where it went.
        if self.processor.image_tokenizer.device != self.device:
            self.processor.image_tokenizer.to(self.device)
        self.tokenizer = self.processor.tokenizer  # transformers' batching pads with it, on the left
        self.tokenizer.padding_side = "left"

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """`Pipeline.save_pretrained` writes the model, this code and the tokenizer, but not a processor: add ours
        (its `processor_config.json` and the VQ in `image_tokenizer/`), so that the directory loads as a pipeline."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


class Cm3LeonTextToImagePipeline(_Cm3LeonPipeline):
    r"""
    Text-to-image with CM3Leon (CL §3): the prompt `<eos> [retrieved documents] text <break>` is continued by exactly
    `image_seq_length` image codes, decoded to pixels by the processor's VQ.

    Args (at construction or per call):
        negative_prompt (`str`, *optional*):
            Text of the unconditional stream instead of the paper's `<mask:0>`.
        guidance_scale (`float`, *optional*):
            CFG scale α_c (the paper's demo uses 3, its evaluation 4); 1 samples the conditional distribution alone.
            Defaults to the model's `generation_config.guidance_scale`, else 3.0. Ignored by `decoding="cd-k"`.
        decoding (`str`, defaults to `"top-p"`):
            `"top-p"` (CFG + nucleus sampling, `top_p`), `"temperature"` (CFG + temperature sampling), `"cd-k"` (CD-K
            contrastive decoding: `contrastive_k`, `contrastive_alpha`, `amateur_temperature`) or `"pooled"` (the
            paper's ½ top-p + ½ CD-K candidates).
        num_images_per_prompt (`int`, defaults to 1): images returned per prompt.
        num_candidates (`int`, *optional*):
            Images generated per prompt before re-ranking (the paper: 8). Defaults to `num_images_per_prompt`; more
            needs a `reranker`.
        reranker (`SentenceTransformer`, *optional*):
            A CLIP model (text and images in one space) that ranks the candidates by similarity to the prompt.
        retriever (`Cm3LeonRetriever`, *optional*), num_retrieved_docs (`int`, defaults to 0):
            Put that many retrieved documents in front of the prompt (CL Table 1: 0/1/2); the unconditional stream
            keeps them and replaces only the prompt text.
        generator (`torch.Generator` or a list of them, *optional*): makes the result reproducible; a list holds one
            generator per candidate image (`num_candidates`), so that image i depends on generator i alone (diffusers'
            convention), at the cost of one `generate` call per image.
        output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (uint8 `(H, W, 3)`) or `"ids"` (image ids).
        progress_bar (`bool`, defaults to `True`): a progress bar over generated tokens.
        Other keyword arguments go to `generate` (a `streamer` is fed alongside the progress bar; `max_new_tokens`, if
        given, must be `image_seq_length`).

    Returns:
        Per prompt, a list of `num_images_per_prompt` dicts `{"image": ..., "score": CLIP score or None}`, best first
        when re-ranked.

    Example:

    ```python
    >>> import torch
    >>> from transformers import pipeline
    >>> from cm3leon_hf.pretrained import TINY_PATH  # the bundled tiny model
    >>> pipe = pipeline("text-to-image", model=TINY_PATH)
    >>> image = pipe("a red star at the top left", generator=torch.Generator().manual_seed(0), progress_bar=False)[0]["image"]
    >>> image.size, image.mode
    ((64, 64), 'RGB')

    ```
    """

    def __call__(self, prompt: str | list[str] | None = None, **kwargs):
        """`prompt`: one prompt or a list (also as the keyword `prompt=`, as in diffusers, or `inputs=`)."""
        if prompt is None:
            prompt = kwargs.pop("inputs", None)
        if prompt is None:
            raise ValueError("Give a prompt: pipe('a red circle at the top left') or pipe(prompt=...).")
        return super().__call__(prompt, **kwargs)

    def _sanitize_parameters(
        self,
        negative_prompt=None,
        retriever=None,
        num_retrieved_docs=None,
        guidance_scale=None,
        decoding=None,
        num_images_per_prompt=None,
        num_candidates=None,
        top_p=None,
        temperature=None,
        contrastive_k=None,
        contrastive_alpha=None,
        amateur_temperature=None,
        generator=None,
        progress_bar=None,
        reranker=None,
        output_type=None,
        **generate_kwargs,
    ):
        preprocess = {k: v for k, v in dict(
            negative_prompt=negative_prompt, retriever=retriever, num_retrieved_docs=num_retrieved_docs
        ).items() if v is not None}
        forward = {k: v for k, v in dict(
            guidance_scale=guidance_scale, decoding=decoding, num_images_per_prompt=num_images_per_prompt,
            num_candidates=num_candidates, top_p=top_p, temperature=temperature, contrastive_k=contrastive_k,
            contrastive_alpha=contrastive_alpha, amateur_temperature=amateur_temperature, generator=generator,
            progress_bar=progress_bar, reranker=reranker,
        ).items() if v is not None}
        if generate_kwargs:
            forward["generate_kwargs"] = generate_kwargs
        postprocess = {k: v for k, v in dict(
            reranker=reranker, output_type=output_type, num_images_per_prompt=num_images_per_prompt
        ).items() if v is not None}
        self.check_inputs(_merged(self, preprocess, forward, postprocess))
        return preprocess, forward, postprocess

    def check_inputs(self, params: dict) -> None:
        """Every argument of a call, checked before any work (diffusers' `check_inputs`): a mistake is named before a
        generation, not after it. The guidance scale goes through the same check as `generate`'s."""
        num_images = params.get("num_images_per_prompt", 1)
        _check_common(self.model.config, params, num_images)
        if params.get("decoding", "top-p") not in DECODING_STRATEGIES:
            raise ValueError(f"`decoding` must be one of {DECODING_STRATEGIES}, got {params['decoding']!r}.")
        num_candidates = params.get("num_candidates", num_images)
        if num_candidates < num_images:
            raise ValueError(f"Need 1 <= num_images_per_prompt ({num_images}) <= num_candidates ({num_candidates}).")
        if num_candidates > num_images and params.get("reranker") is None:
            raise ValueError("Generating more candidates than images to return needs a `reranker` (a CLIP model).")
        if params.get("reranker") is not None and not callable(getattr(params["reranker"], "encode", None)):
            raise ValueError(f"`reranker` must be a sentence-transformers CLIP model (with `encode` for images and "
                             f"text), got {type(params['reranker']).__name__}.")
        _check_generator(params.get("generator"), num_candidates)
        num_retrieved_docs = params.get("num_retrieved_docs", 0)
        if num_retrieved_docs < 0:
            raise ValueError(f"`num_retrieved_docs` must be >= 0, got {num_retrieved_docs}.")
        if num_retrieved_docs and params.get("retriever") is None:
            raise ValueError("`num_retrieved_docs` > 0 needs a `retriever` (a Cm3LeonRetriever).")

    def preprocess(self, prompt: str, negative_prompt: str | None = None, retriever=None, num_retrieved_docs: int = 0):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"The prompt must be a non-empty string, got {prompt!r}.")
        documents = retriever.retrieve(texts=[prompt], k=num_retrieved_docs)[0] if num_retrieved_docs else ()
        streams = self.processor.encode_prompt(prompt, negative_prompt, retrieved_documents=documents)
        return {**streams, "prompt": prompt}

    def _sampling_runs(self, decoding: str, num_candidates: int, top_p, temperature: float, contrastive: dict) -> list:
        """(number of candidates, generate kwargs) per decoding strategy, with the model's saved top-p and CD-K
        settings where the call gives none. "pooled" is the paper's ½ top-p + ½ CD-K pool (CL Fig. 4): ceil(n/2)
        top-p candidates and floor(n/2) CD-K candidates, re-ranked together."""
        saved = self.model.generation_config
        if top_p is None:
            top_p = saved.top_p if saved.top_p is None else check_top_p(saved.top_p, "top_p of the model's generation config")
        else:
            top_p = check_top_p(top_p)
        for name, default in (("contrastive_k", CONTRASTIVE_K), ("contrastive_alpha", DECODING_DEFAULTS["contrastive_alpha"]),
                              ("amateur_temperature", DECODING_DEFAULTS["amateur_temperature"])):
            if contrastive.get(name) is None:
                contrastive[name] = getattr(saved, name, None) or default
        top_p_run = {"do_sample": True, "top_p": top_p, "top_k": 0, "temperature": 1.0}
        temperature_run = {"do_sample": True, "top_p": 1.0, "top_k": 0, "temperature": temperature}
        cd_run = {"do_sample": True, "top_p": 1.0, "top_k": 0, "temperature": 1.0, **contrastive}
        runs = {
            "top-p": [(num_candidates, top_p_run)],
            "temperature": [(num_candidates, temperature_run)],
            "cd-k": [(num_candidates, cd_run)],
            "pooled": [(math.ceil(num_candidates / 2), top_p_run), (num_candidates // 2, cd_run)],
        }[decoding]
        return [(n, kwargs) for n, kwargs in runs if n > 0]

    def _forward(
        self,
        model_inputs,
        guidance_scale: float | None = None,
        decoding: str = "top-p",
        num_images_per_prompt: int = 1,
        num_candidates: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        contrastive_k: int | None = None,
        contrastive_alpha: float | None = None,
        amateur_temperature: float | None = None,
        generator: torch.Generator | None = None,
        progress_bar: bool = True,
        reranker=None,
        generate_kwargs: dict | None = None,
    ):
        num_candidates = num_images_per_prompt if num_candidates is None else num_candidates
        if guidance_scale is None:
            guidance_scale = getattr(self.model.generation_config, "guidance_scale", None) or PAPER_GUIDANCE_SCALE
        contrastive = dict(contrastive_k=contrastive_k, contrastive_alpha=contrastive_alpha,
                           amateur_temperature=amateur_temperature)
        config = self.model.config
        generate_kwargs, streamer = _image_generate_kwargs(generate_kwargs)
        per_image = list(generator) if isinstance(generator, (list, tuple)) else None
        batch_size = model_inputs["input_ids"].shape[0]
        images, used = [], 0
        for count, sampling in self._sampling_runs(decoding, num_candidates, top_p, temperature, contrastive):
            guidance = {} if "contrastive_k" in sampling else {"guidance_scale": guidance_scale}
            # One call for all `count` images, or one per image when each has its own generator.
            calls = [(count, generator)] if per_image is None else [(1, g) for g in per_image[used : used + count]]
            used += count
            for n, call_generator in calls:
                bar = TokenProgressBar(config.image_seq_length, f"{decoding} image tokens", disable=not progress_bar)
                out = self.model.generate(
                    input_ids=model_inputs["input_ids"],
                    attention_mask=model_inputs["attention_mask"],
                    uncond_input_ids=model_inputs["uncond_input_ids"],
                    uncond_attention_mask=model_inputs["uncond_attention_mask"],
                    generate_image=True,
                    max_new_tokens=config.image_seq_length,
                    num_return_sequences=n,
                    generator=call_generator,
                    streamer=_StreamerPair(bar, streamer),
                    **guidance,
                    **{**sampling, **generate_kwargs},
                )
                images.append(out[:, -config.image_seq_length :].view(batch_size, n, -1))
        return {"image_ids": torch.cat(images, dim=1), "prompt": model_inputs["prompt"]}  # (batch, candidates, L)

    def postprocess(self, model_outputs, reranker=None, output_type: str = "pil", num_images_per_prompt: int = 1):
        prompt = model_outputs["prompt"]
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        image_ids = model_outputs["image_ids"]
        image_ids = image_ids[0] if image_ids.dim() == 3 else image_ids  # (candidates, L)
        return _image_outputs(self, image_ids, prompt, output_type, reranker, num_images_per_prompt)


class Cm3LeonImageTextToImagePipeline(_Cm3LeonPipeline):
    r"""
    Image + instruction → image with CM3Leon (CL §4.1). With `image_guidance_scale` (editing, the paper: image 1.5,
    text 7.5) three streams are decoded: the full prompt, the prompt without the instruction (`<mask:0>` instead),
    and the unconditional `<eos> <mask:0> <break>`; without it (structure-guided generation, the paper: 3) plain CFG.

    Args:
        prompt (`str`): the instruction (the caption for structure-guided generation, the region for infilling).
        task (`str`, defaults to `"edit"`): a preset of `template` and scales (`IMAGE_TASKS`), the prompts the model
            was instruction-tuned on (CL §4.1): `"edit"` (instruct-CFG, text 7.5, image 1.5), `"edge"` and
            `"segmentation"` (`"Make high quality image from canny edge features <break> <image> <break> {prompt}
            <break>"` / `"... from a segmentation map ..."`, CFG 3), `"infill"` (`"Fill in the missing region {prompt}
            of the image <break> <image> <break>"`, the region as `"(x1, y1) -> (x2, y2)"` on a 0–255 scale, CFG 3).
            Those are the paper's scales; a model that saved its own for a task
            (`generation_config.task_guidance_scales`, e.g. `{"edit": {"guidance_scale": 1.5,
            "image_guidance_scale": 1.25}, "edge": {"guidance_scale": 1.25}}`: the bundled tiny SFT model, whose
            images the paper's scales wash out) uses those. `template`, `guidance_scale` and `image_guidance_scale`
            given with it win.
        template (`str`, defaults to the editing template of CL §4.1):
            `"Edit the image following the text instruction <break> <image> <break> {prompt} <break>"`.
        guidance_scale (`float`, defaults to 7.5): text scale. image_guidance_scale (`float`, defaults to 1.5): image
        scale; `None` for plain CFG. num_images_per_prompt, generator, output_type, progress_bar: as in
        [`Cm3LeonTextToImagePipeline`]. Other keyword arguments go to `generate` (default: top-p 0.8 sampling).

    Returns:
        Per input, a list of `num_images_per_prompt` dicts `{"image": ..., "score": None}`.

    Example: `pipeline("image-text-to-image", model=path)(image, prompt="make the star blue")[0]["image"]`.
    """

    def __call__(self, images, prompt: str | list[str] | None = None, **kwargs):
        """`images`: one image or a list; `prompt`: the instruction (one, or one per image)."""
        if isinstance(images, (list, tuple)):
            prompts = prompt if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
            if len(prompts) != len(images):
                raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
            return super().__call__([{"image": i, "prompt": p} for i, p in zip(images, prompts)], **kwargs)
        return super().__call__({"image": images, "prompt": prompt}, **kwargs)

    def _sanitize_parameters(
        self, template=None, guidance_scale=None, image_guidance_scale="default", num_images_per_prompt=None,
        generator=None, progress_bar=None, output_type=None, task=None, **generate_kwargs,
    ):
        if task is not None:
            if task not in IMAGE_TASKS:
                raise ValueError(f"`task` must be one of {sorted(IMAGE_TASKS)}, got {task!r}.")
            # The model's own scales for the task (`generation_config.task_guidance_scales`, chosen on its validation
            # data) over the paper's, as its saved `guidance_scale` is for text-to-image.
            saved = getattr(self.model.generation_config, "task_guidance_scales", None) or {}
            preset = {**IMAGE_TASKS[task], **saved.get(task, {})}
            template = preset["template"] if template is None else template
            guidance_scale = preset["guidance_scale"] if guidance_scale is None else guidance_scale
            if image_guidance_scale == "default":
                image_guidance_scale = preset["image_guidance_scale"]
        preprocess = {"template": template} if template is not None else {}
        forward = {k: v for k, v in dict(
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
            progress_bar=progress_bar,
        ).items() if v is not None}
        if image_guidance_scale != "default":
            forward["image_guidance_scale"] = image_guidance_scale
        if generate_kwargs:
            forward["generate_kwargs"] = generate_kwargs
        postprocess = {k: v for k, v in dict(output_type=output_type, num_images_per_prompt=num_images_per_prompt).items() if v is not None}
        self.check_inputs(_merged(self, preprocess, forward, postprocess))
        return preprocess, forward, postprocess

    def check_inputs(self, params: dict) -> None:
        """Every argument of a call, checked before any work (diffusers' `check_inputs`)."""
        _check_common(self.model.config, params, params.get("num_images_per_prompt", 1))
        _check_generator(params.get("generator"), 1)
        template = params.get("template", EDIT_TEMPLATE)
        if not isinstance(template, str) or "{prompt}" not in template or template.count("<image>") != 1:
            raise ValueError("`template` needs exactly one `<image>` and a `{prompt}` field.")
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        except ValueError as error:
            raise ValueError(f"`template` {template!r} is not a format string: {error}.") from None
        if fields != {"prompt"}:
            raise ValueError(f"`template` may hold only the `{{prompt}}` field, got {sorted(fields - {'prompt'})}; "
                             "write a literal brace as `{{` or `}}`.")

    def preprocess(self, inputs, template: str = EDIT_TEMPLATE):
        if inputs.get("image") is None:
            raise ValueError("Image-to-image needs the source image (`images`).")
        if not isinstance(inputs.get("prompt"), str) or not inputs["prompt"].strip():
            raise ValueError(f"Image-to-image needs an instruction (`prompt`), got {inputs.get('prompt')!r}.")
        return self.processor.encode_prompt(inputs["prompt"], image=inputs["image"], template=template)

    def _forward(
        self,
        model_inputs,
        guidance_scale: float = PAPER_EDIT_GUIDANCE_SCALES["guidance_scale"],
        image_guidance_scale: float | None = PAPER_EDIT_GUIDANCE_SCALES["image_guidance_scale"],
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        progress_bar: bool = True,
        generate_kwargs: dict | None = None,
    ):
        config = self.model.config
        streams = {
            "uncond_input_ids": model_inputs["uncond_input_ids"],
            "uncond_attention_mask": model_inputs["uncond_attention_mask"],
        }
        if image_guidance_scale is not None:
            streams.update(
                image_guidance_scale=image_guidance_scale,
                image_cond_input_ids=model_inputs["image_cond_input_ids"],
                image_cond_attention_mask=model_inputs["image_cond_attention_mask"],
            )
        sampling = {"do_sample": True, "top_p": self.model.generation_config.top_p, "top_k": 0,
                    **_image_generate_kwargs(generate_kwargs)[0]}
        bar = TokenProgressBar(config.image_seq_length, "image tokens", disable=not progress_bar)
        out = self.model.generate(
            input_ids=model_inputs["input_ids"],
            attention_mask=model_inputs["attention_mask"],
            guidance_scale=guidance_scale,
            generate_image=True,
            max_new_tokens=config.image_seq_length,
            num_return_sequences=num_images_per_prompt,
            generator=generator,
            streamer=bar,
            **streams,
            **sampling,
        )
        batch_size = model_inputs["input_ids"].shape[0]
        return {"image_ids": out[:, -config.image_seq_length :].view(batch_size, num_images_per_prompt, -1)}

    def postprocess(self, model_outputs, output_type: str = "pil", num_images_per_prompt: int = 1):
        image_ids = model_outputs["image_ids"]
        image_ids = image_ids[0] if image_ids.dim() == 3 else image_ids
        return _image_outputs(self, image_ids, "", output_type, None, num_images_per_prompt)


PIPELINE_REGISTRY.register_pipeline(
    "text-to-image", pipeline_class=Cm3LeonTextToImagePipeline, pt_model=AutoModelForCausalLM, type="multimodal"
)
PIPELINE_REGISTRY.register_pipeline(
    "image-text-to-image",
    pipeline_class=Cm3LeonImageTextToImagePipeline,
    pt_model=AutoModelForCausalLM,
    type="multimodal",
)
