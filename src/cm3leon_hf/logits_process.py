"""Logits processors for CM3Leon decoding (CL §3.1, §4.1): batched classifier-free guidance, instruct-CFG for
editing, CD-K contrastive decoding, the image-token constraint, and sampling from a caller's `torch.Generator`.

Guided decoding runs several *streams* of the same prompt in one batch — conditional, unconditional (`<mask>` instead
of the text), and for editing image-conditional — and feeds every stream the same sampled token. The model stacks the
streams stream-major: with `batch_size` prompts, rows `[s * batch_size, (s + 1) * batch_size)` hold stream `s`
(0 = conditional, 1 = unconditional, 2 = image-conditional). `input_ids` handed to a processor are those of the
conditional stream, `(batch_size, length)`; scores have `num_streams * batch_size` rows until a guidance processor
combines them into `batch_size` rows. Processors never edit their input in place.
"""

import math

import torch
from transformers import LogitsProcessor

TEXT, IMAGE, END_OF_IMAGE = 0, 1, 2


def check_guidance_scale(value: float, name: str = "guidance_scale") -> float:
    """A guidance scale (`guidance_scale`, `image_guidance_scale`) as a float, or a `ValueError` naming it: the one
    check of a scale, from the command line to the processors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


def check_top_p(value, name: str = "top_p") -> float:
    """A nucleus-sampling `top_p` as a float in (0, 1], or a `ValueError` naming where it came from (`name`): 0 keeps
    no token and a value above 1 means nothing, yet transformers samples with either without a word."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1] (the share of probability mass sampled from; 1 keeps "
                         f"every token), got {value!r}.")
    return float(value)


def _split_streams(input_ids: torch.LongTensor, scores: torch.FloatTensor, num_streams: int) -> tuple:
    batch_size = input_ids.shape[0]
    if scores.shape[0] != num_streams * batch_size:
        raise ValueError(
            f"Expected scores for {num_streams} streams of {batch_size} prompts ({num_streams * batch_size} rows), got "
            f"{scores.shape[0]} rows. Guided decoding needs the stacked streams that `Cm3LeonForCausalLM.generate` "
            f"prepares."
        )
    return scores.split(batch_size, dim=0)


def trailing_image_run(input_ids: torch.LongTensor, image_token_offset: int, image_vocab_size: int) -> torch.LongTensor:
    """How many image codes end each row, `(batch_size,)`."""
    is_text = (input_ids < image_token_offset) | (input_ids >= image_token_offset + image_vocab_size)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return input_ids.shape[-1] - 1 - torch.where(is_text, positions, -1).amax(-1)


def next_token_modality(
    input_ids: torch.LongTensor,
    image_token_offset: int,
    image_vocab_size: int,
    image_seq_length: int,
    break_token_id: int,
    generate_image: bool | None = None,
) -> torch.LongTensor:
    """What each row must emit next: `IMAGE` (an image code), `END_OF_IMAGE` (`<break>` or `<eos>` after a complete
    image) or `TEXT` (anything but an image code).

    The state is read off the trailing run of image codes: inside an image (run not a multiple of `image_seq_length`)
    only codes are allowed; right after a complete image only `<break>`/`<eos>`. Outside an image, `generate_image`
    decides: `True` requires codes (the continuation is an image), `False` forbids them, and `None` follows the
    document layout (CL §2.1: `<break>` is the modality switch): a `<break>` that follows text starts an image,
    anything else continues text. So `text <break>` → image, `image <break>` → text, `... <mask:0>` → text.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, length)`): the conditional stream.

    Returns:
        `torch.LongTensor` of shape `(batch_size,)` with values in {`TEXT`, `IMAGE`, `END_OF_IMAGE`}.
    """
    length = input_ids.shape[-1]
    run = trailing_image_run(input_ids, image_token_offset, image_vocab_size)
    inside = run % image_seq_length != 0
    if generate_image is None:
        second_last = input_ids[:, -2] if length > 1 else None
        after_text = (torch.ones_like(run, dtype=torch.bool) if second_last is None else
                      (second_last < image_token_offset) | (second_last >= image_token_offset + image_vocab_size))
        outside = torch.where((input_ids[:, -1] == break_token_id) & after_text, IMAGE, TEXT)
    else:
        outside = torch.full_like(run, IMAGE if generate_image else TEXT)
    return torch.where(inside, IMAGE, torch.where(run > 0, END_OF_IMAGE, outside))


class ImageTokenConstraintLogitsProcessor(LogitsProcessor):
    r"""Modality-constrained decoding (metaseq's CM3Leon demo): an image is exactly `image_seq_length` image codes, then
    `<break>` or `<eos>`; text never contains image codes.

    With `generate_image=True` the continuation must be an image (text-to-image, editing); with `False` it is text
    (captioning, VQA) and image codes are suppressed, except to finish an image the prompt left incomplete; with `None`
    the document layout decides (a `<break>` after text starts an image, see `next_token_modality`). Disallowed tokens
    get `-inf`.

    The processor runs on the stacked streams, before guidance, so that every guidance formula sees the same allowed
    set whether the LM head computed the whole vocabulary or, in image mode, only the `image_vocab_size` image columns
    (scores of that width are scattered back into the full vocabulary).

    Args:
        image_token_offset (`int`): id of image code 0.
        image_vocab_size (`int`): number of image codes.
        image_seq_length (`int`): codes per image.
        end_of_image_token_ids (`list[int]`): the tokens allowed right after an image, `<break>` first, then `<eos>`.
        vocab_size (`int`): width of full-vocabulary scores.
        generate_image (`bool`, *optional*): whether the continuation is an image; `None`: the layout decides.

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf.logits_process import ImageTokenConstraintLogitsProcessor
    >>> proc = ImageTokenConstraintLogitsProcessor(
    ...     image_token_offset=8, image_vocab_size=4, image_seq_length=2, end_of_image_token_ids=[2, 1],
    ...     vocab_size=12, generate_image=True)
    >>> ids = torch.tensor([[1, 5, 2]])  # <eos> text <break>: an image must start
    >>> proc(ids, torch.zeros(1, 12)).isfinite().nonzero()[:, 1].tolist()
    [8, 9, 10, 11]
    >>> ids = torch.tensor([[1, 5, 2, 9, 10]])  # a complete 2-code image: <break> or <eos> next
    >>> proc(ids, torch.zeros(1, 12)).isfinite().nonzero()[:, 1].tolist()
    [1, 2]

    ```
    """

    def __init__(
        self,
        image_token_offset: int,
        image_vocab_size: int,
        image_seq_length: int,
        end_of_image_token_ids: list[int],
        vocab_size: int,
        generate_image: bool | None = None,
    ):
        for name, value in (
            ("image_vocab_size", image_vocab_size),
            ("image_seq_length", image_seq_length),
            ("vocab_size", vocab_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if image_token_offset < 0 or image_token_offset + image_vocab_size > vocab_size:
            raise ValueError(
                f"The image ids [{image_token_offset}, {image_token_offset + image_vocab_size}) do not fit the "
                f"vocabulary of {vocab_size} (`image_token_offset`)."
            )
        if not end_of_image_token_ids or any(not 0 <= t < vocab_size for t in end_of_image_token_ids):
            raise ValueError(f"`end_of_image_token_ids` must be ids in [0, {vocab_size}), got {end_of_image_token_ids}.")
        self.image_token_offset = image_token_offset
        self.image_vocab_size = image_vocab_size
        self.image_seq_length = image_seq_length
        self.vocab_size = vocab_size
        self.break_token_id = end_of_image_token_ids[0]
        self.generate_image = generate_image
        allowed = torch.zeros(3, vocab_size, dtype=torch.bool)  # rows: TEXT, IMAGE, END_OF_IMAGE
        allowed[TEXT] = True
        allowed[TEXT, image_token_offset : image_token_offset + image_vocab_size] = False
        allowed[IMAGE, image_token_offset : image_token_offset + image_vocab_size] = True
        allowed[END_OF_IMAGE, end_of_image_token_ids] = True
        self._allowed = allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        num_streams = scores.shape[0] // input_ids.shape[0]
        state = next_token_modality(
            input_ids,
            self.image_token_offset,
            self.image_vocab_size,
            self.image_seq_length,
            self.break_token_id,
            self.generate_image,
        )
        if scores.shape[-1] == self.image_vocab_size and scores.shape[-1] != self.vocab_size:
            # Image-only logits: `generate` asks for them only while every row must write an image code. Checked on
            # the device (an async assert: no host sync per token on a GPU, where it fails at the next sync).
            torch._assert_async((state == IMAGE).all(), "Got image-only logits for a row that may not emit an image code.")
            full = scores.new_full((scores.shape[0], self.vocab_size), float("-inf"))
            full[:, self.image_token_offset : self.image_token_offset + self.image_vocab_size] = scores
            return full
        if scores.shape[-1] != self.vocab_size:
            raise ValueError(f"Expected scores over {self.vocab_size} ids, got {scores.shape[-1]}.")
        if self._allowed.device != scores.device:  # copied once, not on every step
            self._allowed = self._allowed.to(scores.device)
        allowed = self._allowed[state].repeat(num_streams, 1)  # (rows, vocab)
        return scores.masked_fill(~allowed, float("-inf"))


class BatchedClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    r"""Classifier-free guidance on stacked streams (CL Eq. 1–2): `uncond + s * (cond - uncond)`.

    Unlike transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` (a second forward pass with its own cache,
    as HF Emu3 uses), the unconditional stream is computed in the same forward as extra batch rows; unlike its
    MusicGen-only `ClassifierFreeGuidanceLogitsProcessor`, any scale >= 0 is accepted (1 = conditional only, 0 =
    unconditional only), tokens a constraint set to `-inf` stay `-inf` instead of becoming NaN, and a token only the
    unconditional stream rules out keeps its conditional score (no NaN either). Mixing logits or
    log-probabilities gives the same distribution: they differ by a per-row constant.

    Args:
        guidance_scale (`float`): the paper's α_c (its demo uses 3, its evaluation 4).

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf.logits_process import BatchedClassifierFreeGuidanceLogitsProcessor
    >>> scores = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # row 0: conditional, row 1: unconditional
    >>> BatchedClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(1, 4, dtype=torch.long), scores)
    tensor([[ 4., -2.]])

    ```
    """

    def __init__(self, guidance_scale: float):
        self.guidance_scale = check_guidance_scale(guidance_scale)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cond, uncond = _split_streams(input_ids, scores, 2)
        # A token the unconditional stream rules out (-inf) but the conditional one allows has no finite guided
        # score (it would be NaN): it keeps its conditional score.
        uncond = torch.where(uncond.isneginf() & cond.isfinite(), cond, uncond)
        guided = uncond + self.guidance_scale * (cond - uncond)
        return guided.masked_fill(cond == float("-inf"), float("-inf"))


class InstructClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    r"""Guidance for instruction editing with separate image and text scales (CL §4.1; InstructPix2Pix's rule):
    `l = uncond + s_I * (image - uncond) + s_T * (full - image)`, over three stacked streams in the model's order: the
    full prompt (image and instruction), the unconditional `<mask>` prompt, and the prompt without the instruction.

    Args:
        image_guidance_scale (`float`): s_I (paper 1.5).
        guidance_scale (`float`): s_T, the text scale (paper 7.5).

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf.logits_process import InstructClassifierFreeGuidanceLogitsProcessor
    >>> scores = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # full, unconditional, image-only
    >>> InstructClassifierFreeGuidanceLogitsProcessor(1.5, 7.5)(torch.zeros(1, 3, dtype=torch.long), scores)
    tensor([[10.,  0.]])

    ```
    """

    def __init__(self, image_guidance_scale: float, guidance_scale: float):
        self.image_guidance_scale = check_guidance_scale(image_guidance_scale, "image_guidance_scale")
        self.guidance_scale = check_guidance_scale(guidance_scale)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        full, uncond, image = _split_streams(input_ids, scores, 3)
        # As in plain CFG: a token that a less conditioned stream rules out (-inf) but the full prompt allows would be
        # NaN; it takes the more conditioned stream's score instead (image from full, then unconditional from image).
        image = torch.where(image.isneginf() & full.isfinite(), full, image)
        uncond = torch.where(uncond.isneginf() & image.isfinite(), image, uncond)
        guided = uncond + self.image_guidance_scale * (image - uncond) + self.guidance_scale * (full - image)
        return guided.masked_fill(full == float("-inf"), float("-inf"))


class ContrastiveDecodingLogitsProcessor(LogitsProcessor):
    r"""CD-K, CM3Leon's self-contrastive decoding (CL Eq. 3), after Li et al.'s contrastive decoding: the expert is the
    conditional stream, the amateur the unconditional (`<mask>`) stream of the same model, and

        score(t) = log p_exp(t) - log p_ama(t)   if p_exp(t) >= alpha * (k-th largest p_exp)
                 = -inf                          otherwise.

    With `k = 1` this is Li et al.'s plausibility set, which the paper found "too strict, … consistently greedy"; the
    k-th largest probability widens it. Sampling then draws from `softmax(score)`. This is not transformers'
    "contrastive search" (`penalty_alpha`), which penalises similarity of hidden states.

    The paper does not report alpha, k or the amateur temperature: `generate`'s defaults (`DECODING_DEFAULTS` and
    `CONTRASTIVE_K` in `generation_cm3leon.py`) are alpha = 0.5 and amateur temperature 0.5, those of CM3Leon's
    evaluation script, and k = 5, ours and not tuned (the figures of `bench/RESULTS.md` use it). Ties at the k-th
    value are all kept (the set is defined by `>=`). The arguments carry `generate`'s names, so that an error names
    what the caller passed.

    Args:
        contrastive_alpha (`float`): plausibility threshold alpha, in (0, 1].
        contrastive_k (`int`): k, the rank of the reference probability, >= 1 and at most `vocab_size`.
        amateur_temperature (`float`): the amateur's logits are divided by it before the softmax.
        vocab_size (`int`, *optional*): number of candidate tokens (the image vocabulary in image mode), to validate k.

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf.logits_process import ContrastiveDecodingLogitsProcessor
    >>> expert = torch.tensor([0.5, 0.3, 0.16, 0.04]).log()  # k = 2: keep p >= 0.5 * 0.3
    >>> amateur = torch.tensor([0.7, 0.1, 0.1, 0.1]).log()
    >>> cd = ContrastiveDecodingLogitsProcessor(contrastive_alpha=0.5, contrastive_k=2, amateur_temperature=1.0)
    >>> cd(torch.zeros(1, 3, dtype=torch.long), torch.stack([expert, amateur])).round(decimals=3)
    tensor([[-0.3360,  1.0990,  0.4700,    -inf]])

    ```
    """

    def __init__(self, contrastive_alpha: float, contrastive_k: int, amateur_temperature: float,
                 vocab_size: int | None = None):
        alpha, k = contrastive_alpha, contrastive_k
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"`contrastive_alpha` must be in (0, 1], got {alpha!r}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`contrastive_k` must be an integer >= 1, got {k!r}.")
        if vocab_size is not None and k > vocab_size:
            raise ValueError(f"`contrastive_k` ({k}) is larger than the {vocab_size} candidate tokens.")
        if (
            isinstance(amateur_temperature, bool)
            or not isinstance(amateur_temperature, (int, float))
            or not math.isfinite(amateur_temperature)
            or amateur_temperature <= 0
        ):
            raise ValueError(f"`amateur_temperature` must be a finite number > 0, got {amateur_temperature!r}.")
        self.alpha = float(alpha)
        self.k = k
        self.amateur_temperature = float(amateur_temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        expert, amateur = _split_streams(input_ids, scores, 2)
        log_p_expert = expert.log_softmax(dim=-1)
        log_p_amateur = (amateur / self.amateur_temperature).log_softmax(dim=-1)
        k = min(self.k, log_p_expert.shape[-1])
        kth = log_p_expert.topk(k, dim=-1).values[:, -1:]  # (batch, 1)
        plausible = (log_p_expert >= kth + math.log(self.alpha)) & log_p_expert.isfinite()
        return torch.where(plausible, log_p_expert - log_p_amateur, float("-inf"))


class GeneratorSamplingLogitsProcessor(LogitsProcessor):
    r"""Draws each sampled token from the caller's `torch.Generator` (Gumbel-max: `argmax(scores + G)` with
    `G = -log(-log(U))` is a draw from `softmax(scores)`), so that a seed means the same tokens whatever else uses the
    process-wide RNG at the same time (other threads of a server, other libraries), as diffusers pipelines draw from
    theirs. It runs last, after temperature, top-k and top-p, and returns 0 at the drawn token and `-inf` elsewhere:
    transformers' sampling step then returns that token, whatever its own RNG draws.

    Args:
        generator (`torch.Generator`): the stream to draw from; it advances, so successive calls differ.

    Example:

    ```python
    >>> import torch
    >>> from cm3leon_hf.logits_process import GeneratorSamplingLogitsProcessor
    >>> scores = torch.tensor([[0.0, 2.0, float("-inf")]])
    >>> draw = lambda seed: GeneratorSamplingLogitsProcessor(torch.Generator().manual_seed(seed))(None, scores)
    >>> [int(draw(seed).argmax()) for seed in range(6)]  # token 1 is e^2 ≈ 7.4 times as likely as token 0; 2 never
    [1, 1, 1, 1, 1, 0]

    ```
    """

    def __init__(self, generator: torch.Generator):
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.rand(scores.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
        drawn = (scores.float() + gumbel.to(scores.device)).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


STREAM_PROCESSORS = (
    ImageTokenConstraintLogitsProcessor,
    BatchedClassifierFreeGuidanceLogitsProcessor,
    InstructClassifierFreeGuidanceLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
)
"""Processors that read the stacked streams, in the order they must run: before every other processor (which
expects one row per prompt)."""
