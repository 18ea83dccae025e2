"""Guided and constrained generation: processor formulas, batched streams vs separate forwards, the image-token
constraint, seeds, and bad input."""

import math

import pytest
import torch
from transformers import DynamicCache, LogitsProcessorList, TopPLogitsWarper

from cm3leon_hf.logits_process import (
    BatchedClassifierFreeGuidanceLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    ImageTokenConstraintLogitsProcessor,
    InstructClassifierFreeGuidanceLogitsProcessor,
)
from conftest import left_padded, random_model

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model():
    from cm3leon_hf import Cm3LeonConfig
    from conftest import HUB_CONFIGS

    return random_model(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny"), std=0.05)


def text_prompts(config, lengths, seed=0):
    """`<eos> text… <break>` prompts of the given total lengths, text ids drawn above the special tokens."""
    g = torch.Generator().manual_seed(seed)
    low = config.sentinel_token_start_id + config.num_sentinel_tokens
    return [
        [config.eos_token_id, *torch.randint(low, config.text_vocab_size, (n - 2,), generator=g).tolist(), config.break_token_id]
        for n in lengths
    ]


def constraint_for(config, generate_image):
    return ImageTokenConstraintLogitsProcessor(
        config.image_token_offset,
        config.image_vocab_size,
        config.image_seq_length,
        [config.break_token_id, config.eos_token_id],
        config.vocab_size,
        generate_image,
    )


# --- formulas -------------------------------------------------------------------------------------------------------

IDS = torch.zeros(2, 3, dtype=torch.long)  # two prompts


def test_cfg_formula_and_masked_tokens():
    cond = torch.tensor([[1.0, 2.0, NEG_INF], [0.5, -1.0, 3.0]])
    uncond = torch.tensor([[0.0, 3.0, NEG_INF], [0.5, 1.0, 2.0]])
    out = BatchedClassifierFreeGuidanceLogitsProcessor(2.5)(IDS, torch.cat([cond, uncond]))
    expected = torch.tensor([[2.5, 0.5, NEG_INF], [0.5, -4.0, 4.5]])  # uncond + 2.5 (cond - uncond)
    torch.testing.assert_close(out, expected)
    assert not out.isnan().any()
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(BatchedClassifierFreeGuidanceLogitsProcessor(1.0)(IDS, both), cond)
    torch.testing.assert_close(BatchedClassifierFreeGuidanceLogitsProcessor(0.0)(IDS, both)[1], uncond[1])


def test_instruct_cfg_formula():
    full = torch.tensor([[3.0, 0.0, NEG_INF], [1.0, 2.0, 0.5]])
    uncond = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.5]])
    image = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 0.5]])
    streams = torch.cat([full, uncond, image])
    out = InstructClassifierFreeGuidanceLogitsProcessor(1.5, 7.5)(IDS, streams)
    # uncond + 1.5 (image - uncond) + 7.5 (full - image); a token the full prompt rules out stays ruled out
    expected = torch.tensor([[10.0, 0.0, NEG_INF], [7.0, 3.0, 0.5]])
    torch.testing.assert_close(out, expected)
    assert not out.isnan().any()
    # Both scales 1: the full prompt alone; both 0: the unconditional stream alone.
    torch.testing.assert_close(InstructClassifierFreeGuidanceLogitsProcessor(1.0, 1.0)(IDS, streams), full)
    torch.testing.assert_close(InstructClassifierFreeGuidanceLogitsProcessor(0.0, 0.0)(IDS, streams)[1], uncond[1])


def test_instruct_cfg_has_no_nan_where_only_a_less_conditioned_stream_rules_a_token_out():
    """A token the full prompt allows but the image-only or unconditional stream rules out (-inf) keeps a finite score:
    the more conditioned stream's, as plain CFG does (a negative-prompt stream could rule tokens out)."""
    full = torch.tensor([[2.0, 1.0, 0.5]])
    uncond = torch.tensor([[1.0, NEG_INF, NEG_INF]])
    image = torch.tensor([[1.5, NEG_INF, 0.0]])
    out = InstructClassifierFreeGuidanceLogitsProcessor(1.5, 7.5)(IDS[:1], torch.cat([full, uncond, image]))
    # token 0: 1 + 1.5 * 0.5 + 7.5 * 0.5; token 1: image and uncond take full's 1.0; token 2: uncond takes image's 0.0
    torch.testing.assert_close(out, torch.tensor([[5.5, 1.0, 3.75]]))


def test_contrastive_decoding_formula_ties_and_edges():
    expert = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1], [0.5, 0.25, 0.125, 0.0625, 0.0625]]).log()
    amateur = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.2, 0.3, 0.2, 0.2]]).log()
    scores = torch.cat([expert, amateur])

    def by_hand(alpha, k, tau):
        p_exp = expert.softmax(-1)
        log_p_ama = (amateur / tau).log_softmax(-1)
        rows = []
        for r in range(2):
            kth = sorted(p_exp[r].tolist(), reverse=True)[k - 1]
            rows.append([
                math.log(p_exp[r, t]) - log_p_ama[r, t].item() if p_exp[r, t] >= alpha * kth - 1e-7 else NEG_INF
                for t in range(5)
            ])
        return torch.tensor(rows)

    for alpha, k, tau in [(0.5, 1, 1.0), (0.5, 2, 0.5), (1.0, 2, 1.0), (0.25, 3, 2.0), (1.0, 5, 1.0), (1e-3, 1, 0.5)]:
        out = ContrastiveDecodingLogitsProcessor(alpha, k, tau)(IDS, scores)
        torch.testing.assert_close(out, by_hand(alpha, k, tau), msg=f"alpha={alpha} k={k} tau={tau}")
    # Ties at the k-th value: p = 0.2 twice at ranks 2 and 3; k = 2, alpha = 1 keeps both.
    out = ContrastiveDecodingLogitsProcessor(1.0, 2, 1.0)(IDS, scores)
    assert out[0].isfinite().tolist() == [True, True, True, False, False]
    # k = 1 is Li et al.'s original set: alpha = 1 keeps only the argmax.
    assert ContrastiveDecodingLogitsProcessor(1.0, 1, 1.0)(IDS, scores).isfinite().sum(-1).tolist() == [1, 1]
    # Tokens a constraint removed (-inf) never come back, and no NaN appears, even with k larger than the survivors.
    masked = scores.clone()
    masked[:, 3:] = NEG_INF
    out = ContrastiveDecodingLogitsProcessor(0.5, 5, 1.0)(IDS, masked)
    assert not out.isnan().any() and out[:, 3:].eq(NEG_INF).all() and out[:, :1].isfinite().all()


def test_image_constraint_states():
    # vocab 12: image codes 8..11, 2 codes per image, <break>=2, <eos>=1
    proc = ImageTokenConstraintLogitsProcessor(8, 4, 2, [2, 1], 12, generate_image=True)
    ids = torch.tensor([[1, 5, 5, 2], [1, 5, 2, 9], [2, 5, 9, 10]])  # after <break>; mid-image; complete image
    out = proc(ids, torch.zeros(3, 12))
    allowed = [row.isfinite().nonzero().flatten().tolist() for row in out]
    assert allowed == [[8, 9, 10, 11], [8, 9, 10, 11], [1, 2]]
    layout = ImageTokenConstraintLogitsProcessor(8, 4, 2, [2, 1], 12)  # generate_image=None: `<break>` after text
    out = layout(torch.tensor([[0, 1, 5, 2], [1, 9, 10, 2], [0, 1, 5, 4], [0, 2, 2, 2]]), torch.zeros(4, 12))
    allowed = [row.isfinite().nonzero().flatten().tolist() for row in out]
    assert allowed == [[8, 9, 10, 11], list(range(8)), list(range(8)), [8, 9, 10, 11]]
    text = ImageTokenConstraintLogitsProcessor(8, 4, 2, [2, 1], 12, generate_image=False)
    out = text(ids, torch.zeros(6, 12))  # two streams: the same rule on both
    allowed = [row.isfinite().nonzero().flatten().tolist() for row in out]
    assert allowed[0] == allowed[3] == list(range(8)) and allowed[1] == [8, 9, 10, 11] and allowed[2] == [1, 2]
    # Image-only logits (the LM head's image columns) are scattered back into the vocabulary.
    sliced = torch.arange(8.0).view(2, 4)
    out = proc(ids[:2], sliced)
    assert out.shape == (2, 12) and out[:, 8:].tolist() == sliced.tolist() and out[:, :8].eq(NEG_INF).all()
    with pytest.raises(RuntimeError, match="image-only logits"):  # a device-side assert: no host sync on GPUs
        proc(ids, torch.zeros(3, 4))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BatchedClassifierFreeGuidanceLogitsProcessor(-1.0), "guidance_scale"),
        (lambda: BatchedClassifierFreeGuidanceLogitsProcessor(float("nan")), "guidance_scale"),
        (lambda: BatchedClassifierFreeGuidanceLogitsProcessor(float("inf")), "guidance_scale"),
        (lambda: InstructClassifierFreeGuidanceLogitsProcessor(float("nan"), 7.5), "image_guidance_scale"),
        (lambda: InstructClassifierFreeGuidanceLogitsProcessor(1.5, -2), "`guidance_scale`"),
        (lambda: ContrastiveDecodingLogitsProcessor(0.0, 5, 0.5), "`contrastive_alpha`"),
        (lambda: ContrastiveDecodingLogitsProcessor(1.5, 5, 0.5), "`contrastive_alpha`"),
        (lambda: ContrastiveDecodingLogitsProcessor(0.5, 0, 0.5), "`contrastive_k`"),
        (lambda: ContrastiveDecodingLogitsProcessor(0.5, 513, 0.5, vocab_size=512), "larger than the 512"),
        (lambda: ContrastiveDecodingLogitsProcessor(0.5, 5, 0), "amateur_temperature"),
    ],
)
def test_processor_arguments_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_processors_do_not_edit_their_input():
    scores = torch.randn(4, 12)
    before = scores.clone()
    ids = torch.tensor([[1, 5, 2], [1, 5, 9]])
    for proc in (
        BatchedClassifierFreeGuidanceLogitsProcessor(3.0),
        ContrastiveDecodingLogitsProcessor(0.5, 2, 0.5),
        ImageTokenConstraintLogitsProcessor(8, 4, 2, [2, 1], 12, generate_image=True),
    ):
        proc(ids, scores)
        assert torch.equal(scores, before)


# --- batched streams vs. separate forwards --------------------------------------------------------------------------


def reference_decode(model, streams, combine, steps, constraint, warpers=None, seed=None, generator=None):
    """The slow way: every stream its own forward and its own cache; returns per-step guided scores (after `warpers`)
    and the tokens, greedy or sampled: with a `seed` from the global RNG, with a `generator` by Gumbel-max from it."""
    caches = [DynamicCache(config=model.config) for _ in streams]
    inputs = [ids for ids, _ in streams]
    masks = [mask for _, mask in streams]
    sequences = streams[0][0]
    all_scores = []
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            logits = [
                model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1].float()
                for ids, mask, cache in zip(inputs, masks, caches)
            ]
            if constraint is not None:
                logits = [constraint(sequences, l) for l in logits]
            guided = combine(*logits)
            if warpers is not None:
                guided = warpers(sequences, guided)
            all_scores.append(guided)
            if generator is not None:
                uniform = torch.rand(guided.shape, generator=generator).clamp(min=1e-20, max=1 - 1e-7)
                next_tokens = (guided - torch.log(-torch.log(uniform))).argmax(-1)
            elif seed is None:
                next_tokens = guided.argmax(-1)
            else:
                next_tokens = torch.multinomial(guided.softmax(-1), 1).squeeze(1)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            inputs = [next_tokens[:, None]] * len(streams)
            masks = [torch.nn.functional.pad(m, (0, 1), value=1) for m in masks]
    return all_scores, sequences


def cfg(scale):
    return lambda c, u: torch.where(c.isfinite(), u + scale * (c - u), NEG_INF)


def assert_same_scores(ours, reference, atol=1e-5):
    assert len(ours) == len(reference)
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert torch.equal(a.isfinite(), b.isfinite()), step
        finite = a.isfinite()
        torch.testing.assert_close(
            a.log_softmax(-1)[finite], b.log_softmax(-1)[finite], atol=atol, rtol=0, msg=f"step {step}"
        )


def uncond_prompts(config, batch):
    return torch.tensor([[config.eos_token_id, config.mask_token_id, config.break_token_id]] * batch)


@pytest.mark.parametrize("generate_image", [True, None])
def test_batched_cfg_equals_separate_forwards_greedy(model, generate_image):
    config = model.config
    ids, mask = left_padded(text_prompts(config, [5, 9, 7]), config.pad_token_id)
    uncond = uncond_prompts(config, 3)
    steps = 12
    out = model.generate(
        ids, attention_mask=mask, guidance_scale=3.0, generate_image=generate_image, do_sample=False,
        max_new_tokens=steps, output_scores=True, return_dict_in_generate=True,
    )
    constraint = constraint_for(config, generate_image)  # None: the layout decides (here `text <break>` → image)
    scores, sequences = reference_decode(
        model, [(ids, mask), (uncond, torch.ones_like(uncond))], cfg(3.0), steps, constraint
    )
    assert_same_scores(out.scores, scores)
    assert torch.equal(out.sequences, sequences)


def test_batched_cfg_equals_transformers_unbatched_cfg(model):
    """transformers' own two-forward CFG (log-prob mixing, a second cache; what its `guidance_scale` runs for other
    models) picks the same tokens."""
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    config = model.config
    ids, mask = left_padded(text_prompts(config, [4, 8]), config.pad_token_id)
    uncond = uncond_prompts(config, 2)
    ours = model.generate(
        ids, attention_mask=mask, guidance_scale=2.0, do_sample=False, max_new_tokens=10,
        output_scores=True, return_dict_in_generate=True,
    )
    unbatched = UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, model, unconditional_ids=uncond)
    theirs = model.generate(
        ids, attention_mask=mask, logits_processor=LogitsProcessorList([unbatched]), do_sample=False,
        max_new_tokens=10, output_scores=True, return_dict_in_generate=True,
    )
    assert torch.equal(ours.sequences, theirs.sequences)
    assert_same_scores(ours.scores, theirs.scores)


def test_batched_cfg_equals_separate_forwards_sampling(model):
    config = model.config
    ids, mask = left_padded(text_prompts(config, [6, 3]), config.pad_token_id)
    uncond = uncond_prompts(config, 2)
    steps = config.image_seq_length
    out = model.generate(
        ids, attention_mask=mask, guidance_scale=3.0, generate_image=True, do_sample=True, top_p=0.8,
        generator=torch.Generator().manual_seed(7), output_scores=True, return_dict_in_generate=True,
    )
    _, sequences = reference_decode(
        model, [(ids, mask), (uncond, torch.ones_like(uncond))], cfg(3.0), steps,
        constraint_for(config, True), warpers=LogitsProcessorList([TopPLogitsWarper(0.8)]),
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(out.sequences, sequences)


def test_other_processors_run_after_guidance_on_one_row_per_prompt(model):
    """transformers' own processors (repetition penalty, min length) see the guided rows, not the stacked streams."""
    from transformers import RepetitionPenaltyLogitsProcessor

    config = model.config
    ids, mask = left_padded(text_prompts(config, [4, 7]), config.pad_token_id)
    uncond = uncond_prompts(config, 2)
    out = model.generate(
        ids, attention_mask=mask, guidance_scale=2.0, repetition_penalty=1.5, do_sample=False, max_new_tokens=10,
        output_scores=True, return_dict_in_generate=True,
    )
    scores, sequences = reference_decode(
        model, [(ids, mask), (uncond, torch.ones_like(uncond))], cfg(2.0), 10, constraint_for(config, None),
        warpers=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=(1 - mask).sum(-1))]),
    )
    assert_same_scores(out.scores, scores)
    assert torch.equal(out.sequences, sequences)


def test_batched_contrastive_decoding_equals_separate_forwards(model):
    config = model.config
    ids, mask = left_padded(text_prompts(config, [5, 8]), config.pad_token_id)
    uncond = uncond_prompts(config, 2)
    out = model.generate(
        ids, attention_mask=mask, contrastive_k=4, contrastive_alpha=0.3, amateur_temperature=0.7,
        generate_image=True, do_sample=False, max_new_tokens=8, output_scores=True, return_dict_in_generate=True,
    )

    def cd(c, u):
        log_c, log_u = c.log_softmax(-1), (u / 0.7).log_softmax(-1)
        kth = log_c.topk(4, -1).values[:, -1:]
        return torch.where((log_c >= kth + math.log(0.3)) & log_c.isfinite(), log_c - log_u, NEG_INF)

    scores, sequences = reference_decode(
        model, [(ids, mask), (uncond, torch.ones_like(uncond))], cd, 8, constraint_for(config, True)
    )
    assert_same_scores(out.scores, scores)
    assert torch.equal(out.sequences, sequences)


def test_instruct_cfg_equals_separate_forwards(model):
    config = model.config
    image = list(range(config.image_token_offset, config.image_token_offset + config.image_seq_length))
    head = text_prompts(config, [4])[0]
    full = head + image + [config.break_token_id, 700, 701, config.break_token_id]  # ... <break> instruction <break>
    image_only = head + image + [config.break_token_id, config.mask_token_id, config.break_token_id]
    ids, image_cond = torch.tensor([full]), torch.tensor([image_only])
    uncond = uncond_prompts(config, 1)
    out = model.generate(
        ids, guidance_scale=7.5, image_guidance_scale=1.5, image_cond_input_ids=image_cond, generate_image=True,
        do_sample=False, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
    )

    def instruct(f, u, i):
        return torch.where(f.isfinite(), u + 1.5 * (i - u) + 7.5 * (f - i), NEG_INF)

    ones = torch.ones_like
    scores, sequences = reference_decode(
        model, [(ids, ones(ids)), (uncond, ones(uncond)), (image_cond, ones(image_cond))], instruct, 6,
        constraint_for(config, True),
    )
    # Float noise between batched and separate forwards (~1e-6) is amplified by the scales: |1.5 - 7.5| + 7.5 + 0.5.
    assert_same_scores(out.scores, scores, atol=3e-5)
    assert torch.equal(out.sequences, sequences)


def test_mixed_length_batch_gives_each_prompt_its_own_image(model):
    config = model.config
    prompts = text_prompts(config, [3, 11, 6], seed=3)
    ids, mask = left_padded(prompts, config.pad_token_id)
    batched = model.generate(ids, attention_mask=mask, guidance_scale=3.0, generate_image=True, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), guidance_scale=3.0, generate_image=True, do_sample=False)
        assert batched[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


# --- constraint, seeds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decoding",
    [
        {"do_sample": False},
        {"do_sample": True, "top_p": 0.9},
        {"do_sample": True, "temperature": 1.5, "guidance_scale": 4.0},
        {"do_sample": True, "contrastive_k": 5},
        {"do_sample": False, "guidance_scale": 3.0, "num_return_sequences": 2},
    ],
)
def test_every_strategy_writes_exactly_one_image(model, decoding):
    config = model.config
    ids, mask = left_padded(text_prompts(config, [4, 9]), config.pad_token_id)
    out = model.generate(ids, attention_mask=mask, generate_image=True, generator=torch.Generator().manual_seed(1), **decoding)
    image = out[:, ids.shape[1] :]
    assert image.shape == (2 * decoding.get("num_return_sequences", 1), config.image_seq_length)
    assert ((image >= config.image_token_offset) & (image < config.image_token_offset + config.image_vocab_size)).all()
    # One more token may only close the image.
    longer = model.generate(ids, attention_mask=mask, generate_image=True, max_new_tokens=config.image_seq_length + 1,
                            generator=torch.Generator().manual_seed(1), **decoding)
    assert set(longer[:, -1].tolist()) <= {config.break_token_id, config.eos_token_id}


def test_text_generation_never_emits_image_codes(model):
    config = model.config
    image_ids = range(config.image_token_offset, config.image_token_offset + config.image_vocab_size)
    ids = torch.tensor(text_prompts(config, [6, 6, 6, 6]))
    with torch.no_grad():  # unconstrained, this random model would write codes: a third of its mass is on them
        mass = model(ids).logits[:, -1].softmax(-1)[:, image_ids.start : image_ids.stop].sum(-1)
    assert (mass > 0.2).all()
    text = model.generate(ids, generate_image=False, do_sample=True, max_new_tokens=40, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    assert not (text[:, 6:] >= config.image_token_offset).any()


def test_the_layout_decides_the_modality_by_default(model):
    """No `generate_image`: `text <break>` continues with an image, `image <break>` and an infill `<mask:0>` with
    text, and a generated `<break>` after text starts an image of exactly `image_seq_length` codes."""
    config = model.config
    brk, mask = config.break_token_id, config.mask_token_id
    image = list(range(config.image_token_offset, config.image_token_offset + config.image_seq_length))
    text = text_prompts(config, [5])[0]  # <eos> ... <break>
    is_image = lambda t: config.image_token_offset <= t < config.image_token_offset + config.image_vocab_size  # noqa: E731
    after_text = model.generate(torch.tensor([text]), max_new_tokens=config.image_seq_length, do_sample=False)
    assert all(is_image(t) for t in after_text[0, len(text) :].tolist())
    for prompt in ([*text, *image, brk], [*text[:-1], mask, brk, *image, mask]):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=True,
                             generator=torch.Generator().manual_seed(0))[0, len(prompt) :].tolist()
        if brk in out:  # the model may switch modality itself: then an image follows, complete
            out = out[: out.index(brk)]
        assert not any(is_image(t) for t in out)


def test_generator_makes_sampling_reproducible(model):
    ids = torch.tensor(text_prompts(model.config, [5]))

    def sample(seed):
        return model.generate(ids, guidance_scale=3.0, generate_image=True, do_sample=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    sample(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_generation_arguments(model):
    config = model.config
    ids = torch.tensor(text_prompts(config, [5]))
    cases = [
        (dict(guidance_scale=-1.0), "`guidance_scale` must be"),  # named as generate takes it, not as the processor does
        (dict(guidance_scale=float("nan")), "`guidance_scale` must be"),
        (dict(guidance_scale=True), "`guidance_scale` must be"),  # not taken for 1.0, which would run unguided
        (dict(contrastive_k=0), "`contrastive_k` must be"),
        (dict(contrastive_k=config.image_vocab_size + 1, generate_image=True), f"larger than the {config.image_vocab_size}"),
        (dict(contrastive_k=5, contrastive_alpha=0.0), "alpha"),
        (dict(contrastive_k=5, contrastive_alpha=1.01), "alpha"),
        (dict(contrastive_k=5, guidance_scale=3.0), "Choose one"),
        (dict(guidance_scale=7.5, image_guidance_scale=1.5), "needs `image_cond_input_ids`"),
        (dict(image_guidance_scale=1.5), "needs both"),
        (dict(uncond_input_ids=ids), "need `guidance_scale`"),
        (dict(cfg_scale=3.0), "`cfg_scale` is now `guidance_scale`"),  # the old name, named
        (dict(image_cfg_scale=1.5), "`image_cfg_scale` is now `image_guidance_scale`"),
        (dict(guidance_scale=3.0, num_beams=2), "beam search"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, max_new_tokens=2, **kwargs)


def test_prompt_longer_than_context_after_streams_and_image(model):
    config = model.config
    room = config.max_position_embeddings - config.image_seq_length
    fits = torch.full((1, room), 300)
    model.generate(fits, guidance_scale=3.0, generate_image=True, max_new_tokens=1)
    too_long = torch.full((1, room + 1), 300)
    with pytest.raises(ValueError, match=rf"\({room + 1} tokens.*plus {config.image_seq_length} new tokens exceeds"):
        model.generate(too_long, guidance_scale=3.0, generate_image=True)
    # The unconditional stream counts too.
    with pytest.raises(ValueError, match="longest of its 2 stream"):
        model.generate(torch.full((1, 10), 300), guidance_scale=3.0, generate_image=True, uncond_input_ids=too_long)
