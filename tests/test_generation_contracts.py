"""Contracts every transformers model keeps, kept by `Cm3LeonForCausalLM.generate` too: no special id is required
(`eos_token_id=None`), the old `past_key_values=` name, the model's own distribution when the modality constraint is
switched off, and decoding defaults that a checkpoint's `generation_config.json` carries."""

import functools
import json
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM
from conftest import HUB_CONFIGS, random_model


@pytest.fixture
def config():
    return Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")


@pytest.fixture
def model(config):
    return random_model(config, std=0.05)


TEXT_PROMPT = [[1, 300, 301, 302]]  # <eos> text: text continues


def image_prompt(config):
    return torch.tensor([[config.eos_token_id, 300, 301, config.break_token_id]])  # <eos> text <break>: an image


def manual_greedy(model, ids, steps):
    """Argmax over the whole vocabulary, one forward over the whole sequence per token: the reference."""
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("where", ["config", "generation_config", "both"])
@pytest.mark.parametrize(
    "mode",
    ["greedy", "sample", "beam_search", "assisted", "inputs_embeds"],
)
def test_eos_token_id_none_generates_to_full_length(config, where, mode):
    """transformers' generation tests set the end-of-sequence ids to None to force full-length outputs."""
    model = random_model(config)
    if where in ("config", "both"):
        model.config.eos_token_id = None
    if where in ("generation_config", "both"):
        model.generation_config.eos_token_id = None
    ids = torch.tensor(TEXT_PROMPT)
    kwargs = {
        "greedy": dict(do_sample=False),
        "sample": dict(do_sample=True),
        "beam_search": dict(do_sample=False, num_beams=2),
        "assisted": dict(do_sample=False, assistant_model=model),
        "inputs_embeds": dict(do_sample=False),
    }[mode]
    if mode == "inputs_embeds":
        out = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=6, **kwargs)
        assert out.shape == (1, 6)
    else:
        out = model.generate(ids, max_new_tokens=6, **kwargs)
        assert out.shape == (1, ids.shape[1] + 6)
        # Text continues (the layout), so no image code is written.
        assert not ((out[:, ids.shape[1]:] >= config.image_token_offset)
                    & (out[:, ids.shape[1]:] < config.image_token_offset + config.image_vocab_size)).any()


def test_a_config_without_eos_builds_a_generation_config_without_none(config):
    prompt = image_prompt(config)
    config.eos_token_id = None
    model = random_model(config)
    assert model.generation_config.eos_token_id == [config.eoss_token_id]
    image = model.generate(prompt, guidance_scale=3.0, do_sample=False)
    assert image.shape[1] == 4 + config.image_seq_length


def test_past_key_values_is_the_old_name_of_cache(model):
    ids = torch.tensor([[1, 300, 301, 302, 303]])
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = model(ids[:, -1:], past_key_values=prefix.cache).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_without_the_modality_constraint_greedy_is_the_models_own_argmax(model, config):
    ids = image_prompt(config)
    constrained = model.generate(ids, do_sample=False)
    assert constrained.shape[1] == ids.shape[1] + config.image_seq_length
    free = model.generate(ids, do_sample=False, max_new_tokens=12, image_token_constraint=False)
    assert free.tolist() == manual_greedy(model, ids, 12).tolist()
    with pytest.raises(ValueError, match="needs the modality constraint"):
        model.generate(ids, image_token_constraint=False, generate_image=True)


def test_a_trained_random_sequence_is_reproduced_with_the_constraint_off(config):
    """transformers' training test: overfit one random sequence, then greedy `generate` must reproduce it. A random
    sequence breaks the CM3 layout, so it reproduces only without the constraint (saved in the generation config)."""
    small = Cm3LeonConfig(**{**config.to_dict(), "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                              "intermediate_size": 128})
    torch.manual_seed(0)
    model = Cm3LeonForCausalLM(small)
    sequence = torch.randint(0, small.vocab_size, (1, 64))
    sequence[0, 0] = small.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(sequence, labels=sequence).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.05
    model.generation_config.image_token_constraint = False
    out = model.generate(sequence[:, :1], do_sample=False, max_new_tokens=63)
    assert out.tolist() == sequence.tolist()


def test_decoding_defaults_live_in_the_generation_config(model, config, tmp_path):
    ids = image_prompt(config)

    def sample(m, **kwargs):
        return m.generate(ids, do_sample=True, generator=torch.Generator().manual_seed(3), **kwargs)

    explicit = sample(model, guidance_scale=3.0)
    plain = sample(model)
    assert explicit.shape == plain.shape == (1, 4 + config.image_seq_length)  # an image: its length, no max_new_tokens
    model.generation_config.guidance_scale = 3.0
    assert sample(model).tolist() == explicit.tolist()  # the default applies
    # Saved with the model, in generation_config.json, and used by the reloaded model.
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["guidance_scale"] == 3.0
    reloaded = Cm3LeonForCausalLM.from_pretrained(tmp_path).eval()
    assert sample(reloaded).tolist() == explicit.tolist()
    # guidance_scale=1 is the conditional distribution: one stream, as without guidance.
    assert sample(reloaded, guidance_scale=1.0).tolist() == plain.tolist()
    # A guidance argument of the call replaces the saved guidance instead of conflicting with it.
    cd = sample(reloaded, contrastive_k=5)
    assert cd.shape == explicit.shape
    # Text continuations (captioning) are not guided by the image default.
    text = torch.tensor(TEXT_PROMPT)
    guided_text = reloaded.generate(text, do_sample=True, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    reloaded.generation_config.guidance_scale = None
    plain_text = reloaded.generate(text, do_sample=True, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert guided_text.tolist() == plain_text.tolist()


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (`.item()`, `int()`, `bool()` on a tensor) made by this
    package's code: those whose innermost caller outside torch is a `cm3leon_hf` file. (transformers' mask helper
    checks `attention_mask.all()` on a padded batch only when not tracing, so it is no obstacle to CUDA graphs.)"""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            caller = next((f for f in reversed(traceback.extract_stack()) if "/torch/" not in f.filename), None)
            if caller is not None and "cm3leon_hf" in caller.filename:
                self.count += 1
                self.where.append(f"{caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("guidance", [{}, {"guidance_scale": 3.0}, {"contrastive_k": 5}])
def test_a_decoding_step_makes_no_host_sync(model, config, monkeypatch, guidance):
    """Our part of every decoding step after the first (preparing the inputs, the forward pass, the stream processors)
    reads no tensor value on the host, so that it can run as a CUDA graph. transformers' loop around it is not ours."""
    from cm3leon_hf.logits_process import STREAM_PROCESSORS

    counter, steps = HostSyncCounter(), {"n": 0}

    def counted(function, is_step):
        @functools.wraps(function)  # transformers reads the signatures
        def wrapper(*args, **kwargs):
            if not is_step(*args, **kwargs):
                return function(*args, **kwargs)
            steps["n"] += 1
            with counter:
                return function(*args, **kwargs)
        return wrapper

    forward = model.forward
    monkeypatch.setattr(model, "forward", counted(forward, lambda *a, **k: k.get("cache") is not None
                                                  and (k.get("input_ids") if k.get("input_ids") is not None
                                                       else k["inputs_embeds"]).shape[1] == 1))
    prepare = model.prepare_inputs_for_generation
    monkeypatch.setattr(model, "prepare_inputs_for_generation",
                        counted(prepare, lambda *a, **k: not k.get("is_first_iteration")))
    for cls in STREAM_PROCESSORS:
        monkeypatch.setattr(cls, "__call__", counted(cls.__call__, lambda self, ids, scores: ids.shape[1] > 4))
    out = model.generate(image_prompt(config), do_sample=True, generator=torch.Generator().manual_seed(0), **guidance)
    assert out.shape[1] == 4 + config.image_seq_length
    assert steps["n"] >= 3 * (config.image_seq_length - 1)  # every step was counted
    assert counter.count == 0, counter.where[:3]


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, top_p=0.8)])
@pytest.mark.parametrize("guidance", [{}, {"guidance_scale": 3.0}])
def test_static_cache_gives_the_dynamic_caches_ids(model, config, sampling, guidance):
    prompts = torch.tensor([[0, 1, 300, 2], [1, 300, 301, 2]])  # left-padded batch of two image prompts
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, **sampling, **guidance)
    dynamic = model.generate(prompts, generator=torch.Generator().manual_seed(4), **kwargs)
    static = model.generate(prompts, generator=torch.Generator().manual_seed(4), cache_implementation="static", **kwargs)
    assert dynamic.shape == (2, 4 + config.image_seq_length)
    assert static.tolist() == dynamic.tolist()


def test_threads_with_their_own_seeds_get_their_single_thread_images(model, config):
    """A server generating for several requests at once: each call's generator alone decides its tokens, whatever the
    other threads do with the process-wide RNG meanwhile."""
    import threading

    prompt = image_prompt(config)
    seeds = [11, 12, 13, 14]
    alone = {s: model.generate(prompt, guidance_scale=3.0, generator=torch.Generator().manual_seed(s)).tolist() for s in seeds}
    results, barrier = {}, threading.Barrier(len(seeds))

    def work(seed):
        barrier.wait()
        for trial in range(3):
            torch.manual_seed(1000 + seed + trial)  # another user of the global RNG, in the middle of it all
            results[seed, trial] = model.generate(prompt, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed)).tolist()

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and all(results[s, t] == alone[s] for s, t in results)
    assert len({str(v) for v in alone.values()}) == len(seeds)


def test_the_generators_draws_follow_the_distribution():
    from cm3leon_hf.logits_process import GeneratorSamplingLogitsProcessor

    scores = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]]).expand(20000, -1)
    draws = GeneratorSamplingLogitsProcessor(torch.Generator().manual_seed(0))(None, scores).argmax(-1)
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    expected = torch.tensor([0.0, 1.0, 2.0]).softmax(-1).double()
    assert frequencies[3] == 0
    torch.testing.assert_close(frequencies[:3], expected, atol=0.012, rtol=0)  # ~4 standard errors at n = 20,000


def test_guidance_scale_one_with_cd_k_is_still_a_conflict(model, config):
    with pytest.raises(ValueError, match="Choose one of CD-K"):
        model.generate(image_prompt(config), guidance_scale=1.0, contrastive_k=5)


@pytest.mark.parametrize("saved", [False, True])
def test_guidance_scale_is_ours_one_forward_per_token(model, config, monkeypatch, saved):
    """`guidance_scale` (passed, or saved in the generation config) runs CM3Leon's batched CFG: one forward per token
    with both streams as rows, and transformers' own unbatched CFG processor (a second forward per token) is never
    added, as MusicGen and Janus keep it out."""
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    calls, rows = {"n": 0}, set()
    forward = model.forward

    @functools.wraps(forward)
    def counted(*args, **kwargs):
        calls["n"] += 1
        rows.add(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    built = []
    get_processors = model._get_logits_processor
    monkeypatch.setattr(model, "_get_logits_processor", lambda *a, **k: built.append(get_processors(*a, **k)) or built[-1])
    if saved:
        model.generation_config.guidance_scale = 2.0
        guidance = {}
    else:
        guidance = {"guidance_scale": 2.0}
    out = model.generate(image_prompt(config), generator=torch.Generator().manual_seed(0), **guidance)
    assert out.shape[1] == 4 + config.image_seq_length
    assert calls["n"] == config.image_seq_length and rows == {2}  # one forward per new token, 2 stream rows each
    names = [type(p).__name__ for p in built[0]]
    assert "BatchedClassifierFreeGuidanceLogitsProcessor" in names
    assert not any(isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor) for p in built[0])
    assert model.generation_config.guidance_scale == (2.0 if saved else None)  # the model's own config is untouched
