"""Cm3LeonForCausalLM: parity with transformers' OPT, equivalences (cache, padding, packing, checkpointing), the paper's
initialisation, and clear errors."""

import pytest
import torch
from transformers import DynamicCache

from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM
from cm3leon_hf.convert_opt import to_opt
from conftest import left_padded, random_model


@pytest.fixture
def model(tiny_config):
    return random_model(tiny_config)


def random_prompts(config, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(config.sentinel_token_start_id + config.num_sentinel_tokens, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


# --- parity with transformers' OPTForCausalLM -------------------------------------------------------------------------


def test_opt_parity_full_forward(model):
    opt = to_opt(model)
    ids = torch.tensor(random_prompts(model.config, [24, 24]))
    with torch.no_grad():
        ours, theirs = model(ids).logits, opt(ids).logits
    assert ours.shape == (2, 24, model.config.vocab_size)
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_opt_parity_left_padding_and_cache(model):
    opt = to_opt(model)
    ids, mask = left_padded(random_prompts(model.config, [5, 11, 8]), model.config.pad_token_id)
    steps = torch.tensor(random_prompts(model.config, [6, 6, 6], seed=2))
    real = mask.bool()
    ours_cache, opt_cache = DynamicCache(config=model.config), DynamicCache(config=opt.config)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, cache=ours_cache, use_cache=True).logits
        theirs = opt(ids, attention_mask=mask, cache=opt_cache, use_cache=True).logits
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            ours = model(steps[:, t : t + 1], attention_mask=mask, cache=ours_cache, use_cache=True).logits
            theirs = opt(steps[:, t : t + 1], attention_mask=mask, cache=opt_cache, use_cache=True).logits
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# --- equivalences ---------------------------------------------------------------------------------------------------


def test_cached_decoding_equals_full_forward(model):
    ids = torch.tensor(random_prompts(model.config, [30, 30]))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        prefix = model(ids[:, :10], cache=cache, use_cache=True).logits
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(10, 30)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = random_prompts(model.config, [3, 12, 7])
    ids, mask = left_padded(prompts, model.config.pad_token_id)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(batched[row, -len(prompt) :], alone, atol=1e-5, rtol=0)

    eos = model.config.eos_token_id
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
        expected = alone.tolist()
        got = generated[row, : len(expected)].tolist()
        if eos in expected:  # the batch keeps going (padding) after a row ends
            cut = expected.index(eos) + 1
            expected, got = expected[:cut], got[:cut]
        assert got == expected


@pytest.mark.parametrize("training", [False, True])
def test_packed_row_equals_separate_rows(model, training):
    docs = random_prompts(model.config, [5, 9, 4])
    packed = torch.tensor([sum(docs, [])])
    position_ids = torch.tensor([[p for d in docs for p in range(len(d))]])
    model.train(training)
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits[0]
        ids, mask = left_padded(docs, model.config.pad_token_id)
        separate = model(ids, attention_mask=mask, use_cache=False).logits
        start = 0
        for row, doc in enumerate(docs):
            torch.testing.assert_close(logits[start : start + len(doc)], separate[row, -len(doc) :], atol=1e-5, rtol=0)
            start += len(doc)
        # Sanity: without restarting positions the later documents would see the earlier ones.
        leaky = model(packed, use_cache=False).logits[0]
    assert not torch.allclose(leaky[len(docs[0]) :], logits[len(docs[0]) :], atol=1e-3)


def test_gradient_checkpointing_gives_same_gradients(tiny_config):
    def grads(checkpointing: bool):
        model = random_model(tiny_config).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        model.model.layers[0].fc1.register_forward_hook(lambda *_: calls.append(1))
        ids = torch.tensor(random_prompts(tiny_config, [16, 16]))
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer really was recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-5, msg=name)


# --- initialisation (CL §2.3) ---------------------------------------------------------------------------------------


def test_paper_initialisation_on_mid_size_config():
    config = Cm3LeonConfig(
        text_vocab_size=4096,
        image_vocab_size=1024,
        image_seq_length=256,
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = Cm3LeonForCausalLM(config)
    # Std of a normal truncated at ±3σ: σ·sqrt(1 − 2·3·φ(3)/(2Φ(3) − 1)) = 0.98658σ.
    truncated = 0.98658
    std, cut = config.initializer_range, 3 * config.initializer_range
    matrices = {"model.embed_tokens.weight": model.model.embed_tokens.weight}
    zeros = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            matrices[f"layers.{i}.{name}"] = getattr(layer.self_attn, name).weight
        matrices[f"layers.{i}.fc1"] = layer.fc1.weight
        zeros[f"layers.{i}.out_proj"] = layer.self_attn.out_proj.weight
        zeros[f"layers.{i}.fc2"] = layer.fc2.weight
    for name, weight in matrices.items():
        w = weight.detach().double()
        assert abs(w.mean().item()) < 2e-5, name
        assert w.std().item() == pytest.approx(std * truncated, rel=0.02), name
        assert w.abs().max().item() <= cut * (1 + 1e-6), name  # truncated at 3σ ...
        assert w.abs().max().item() > 0.97 * cut, name  # ... with the tails present up to the cut
        assert (w.abs() > cut * (1 - 1e-6)).double().mean().item() < 1e-4, name  # truncated, not clipped
    for name, weight in zeros.items():
        assert torch.count_nonzero(weight).item() == 0, name
    positions = model.model.embed_positions.weight.detach().double()
    pos_std = config.position_initializer_range
    assert positions.std().item() == pytest.approx(pos_std * truncated, rel=0.03)
    assert positions.abs().max().item() <= 3 * pos_std * (1 + 1e-6)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * config.num_hidden_layers + 1
    assert all(sum(p.numel() for p in m.parameters()) == 0 for m in norms)  # no learnable LN parameters


# --- bad input ------------------------------------------------------------------------------------------------------


def test_ids_outside_vocabulary_raise(model):
    with pytest.raises(ValueError, match=f"id {model.config.vocab_size}, outside the vocabulary"):
        model(torch.tensor([[5, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="id -3, outside the vocabulary"):
        model(torch.tensor([[5, -3]]))


def test_sequence_longer_than_context_raises(model):
    n = model.config.max_position_embeddings + 1
    with pytest.raises(ValueError, match=f"{n} tokens long .*max_position_embeddings={n - 1}"):
        model(torch.full((1, n), 30))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.full((1, n - 1), 30), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=rf"{n - 1} cached \+ 1 new"):
        model(torch.full((1, 1), 30), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="position_ids contains 1024"):
        model(torch.full((1, 2), 30), position_ids=torch.tensor([[0, n - 1]]))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"image_token_offset": 1000}, "image_token_offset"),
        ({"vocab_size": 1000}, "vocab_size"),
        ({"break_token_id": 1}, "break_token_id"),
        ({"eoss_token_id": 10}, "eoss_token_id"),
        ({"pad_token_id": 5000}, "pad_token_id"),
        ({"sentinel_token_start_id": 1020}, "sentinel"),
        ({"image_seq_length": 1024}, "image_seq_length"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"initializer_range": -1.0}, "initializer_range"),
    ],
)
def test_invalid_config_raises_naming_the_field(tiny_config, kwargs, field):
    values = {**tiny_config.to_dict(), **kwargs}
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    with pytest.raises(ValueError, match=field):
        Cm3LeonConfig(**values)
