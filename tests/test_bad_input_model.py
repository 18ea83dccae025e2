"""Bad input to the config, the model and guided decoding gets a clear error that names the problem, instead of a wrong
result or a crash deep inside torch (the reliability probes, each as a test)."""

import pytest
import torch

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.logits_process import BatchedClassifierFreeGuidanceLogitsProcessor
from conftest import HUB_CONFIGS, random_model


@pytest.fixture(scope="module")
def config():
    return Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")


@pytest.fixture(scope="module")
def model(config):
    return random_model(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layer_norm_eps", float("nan"), "`layer_norm_eps` must be a finite positive number"),
        ("initializer_range", float("inf"), "`initializer_range` must be a finite positive number"),
        ("vocab_size", 400.5, "`vocab_size` must be a positive integer"),
        ("image_token_offset", 1024.0, "`image_token_offset` must be an integer"),
        ("hidden_act", "nope", "`hidden_act` 'nope' is not an activation"),
        ("num_sentinel_tokens", 2.0, "`num_sentinel_tokens` must be an integer"),
    ],
)
def test_config_numbers_are_checked(config, field, value, message):
    with pytest.raises(ValueError, match=message):
        Cm3LeonConfig(**{**config.to_dict(), field: value})


@pytest.mark.parametrize(
    "make_ids, message",
    [
        (lambda: torch.tensor([[1.0, 300.0, 301.0]]), "integer token ids"),
        (lambda: torch.tensor([1, 300, 301]), r"shape \(batch_size, sequence_length\), got \(3,\)"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), "The input is empty"),
    ],
)
def test_input_ids_of_the_wrong_kind_are_named(model, make_ids, message):
    with pytest.raises(ValueError, match=message):
        model(make_ids())


def test_a_wrong_attention_mask_is_refused_not_used(model):
    ids = torch.tensor([[1, 300, 301, 302]])
    reference = model(ids).logits
    # The probe: a mask longer than the ids shifted the positions (logits off by up to 2.8).
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 9\), but the input needs \(1, 4\)"):
        model(ids, attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(ids, attention_mask=torch.tensor([[1, 2, 1, 1]]))
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(ids, attention_mask=torch.full((1, 4), 0.5))
    with pytest.raises(ValueError, match="needs \\(1, 4\\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    torch.testing.assert_close(model(ids, attention_mask=torch.ones(1, 4, dtype=torch.bool)).logits, reference)
    # With a cache, the mask covers cached and new tokens.
    prefix = model(ids[:, :3], use_cache=True)
    with pytest.raises(ValueError, match="needs \\(1, 4\\)"):
        model(ids[:, 3:], cache=prefix.cache, attention_mask=torch.ones(1, 1))
    with pytest.raises(ValueError, match="position_ids contains -1"):
        model(ids, position_ids=torch.tensor([[-1, 0, 1, 2]]))


def test_guided_decoding_refuses_masks_that_would_drop_prompt_tokens(model, config):
    ids = torch.tensor([[1, 300, 301, 302, config.break_token_id]])
    with pytest.raises(ValueError, match=r"The attention mask of `input_ids` has shape \(1, 3\), its ids \(1, 5\)"):
        model.generate(ids, attention_mask=torch.ones(1, 3, dtype=torch.long), guidance_scale=3.0)
    uncond = torch.tensor([[1, config.mask_token_id, config.break_token_id]])
    with pytest.raises(ValueError, match="The attention mask of `uncond_input_ids`"):
        model.generate(ids, guidance_scale=3.0, uncond_input_ids=uncond, uncond_attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="`uncond_input_ids` has shape"):
        model.generate(ids, guidance_scale=3.0, uncond_input_ids=uncond[0])
    with pytest.raises(ValueError, match="`num_return_sequences` must be a positive integer, got 0"):
        model.generate(ids, guidance_scale=3.0, num_return_sequences=0)


@pytest.mark.parametrize("kwargs,message", [
    ({"contrastive_k": 0}, r"`contrastive_k` must be an integer >= 1, got 0"),
    ({"contrastive_k": 3, "contrastive_alpha": 2.0}, r"`contrastive_alpha` must be in \(0, 1\], got 2.0"),
])
def test_contrastive_arguments_are_named_as_generate_takes_them(model, kwargs, message):
    """The CD-K processor names its own `k` and `alpha`; a `generate` caller passed `contrastive_k`/`_alpha`."""
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 300, 2]]), do_sample=True, max_new_tokens=2, generate_image=False, **kwargs)


def test_cfg_has_no_nan_where_only_the_unconditional_stream_rules_a_token_out():
    scores = torch.tensor([[1.0, 2.0, float("-inf")], [float("-inf"), 0.5, float("-inf")]])  # cond row, uncond row
    guided = BatchedClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(1, 2, dtype=torch.long), scores)
    assert not guided.isnan().any()
    assert guided.tolist() == [[1.0, 0.5 + 3.0 * 1.5, float("-inf")]]


@pytest.mark.parametrize(
    "script, argv",
    [
        ("train_image_tokenizer", ["--output-dir", "x", "--batch-size", "0"]),  # looped forever, memory growing
        ("train_image_tokenizer", ["--output-dir", "x", "--batch-size", "-2"]),
        ("train_image_tokenizer", ["--output-dir", "x", "--log-every", "0"]),  # ZeroDivisionError
        ("train_image_tokenizer", ["--output-dir", "x", "--checkpoint-every", "0"]),
        ("build_memory_bank", ["--synthetic-task", "text_to_image", "--output-dir", "x", "--batch-size", "0"]),  # hung
        ("train_text_tokenizer", ["--model-config", "x", "--output-dir", "x", "--max-texts", "0"]),  # trained on nothing
        ("evaluate_image_tokenizer", ["x", "--num-scenes", "0"]),  # NaN figures
    ],
)
def test_command_line_counts_below_one_are_refused(script, argv, capsys):
    import importlib
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "training"))
    module = importlib.import_module(script)
    parse = getattr(module, "parse_args", module.main)
    with pytest.raises(SystemExit):
        parse(argv)
    assert "must be at least" in capsys.readouterr().err


def test_memory_bank_build_refuses_a_batch_size_of_zero(tmp_path):
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.pretrained import CLIP_PATH
    from cm3leon_hf.synthetic import build_task

    pairs = build_task("text_to_image", num_train=4, num_validation=0, num_test=0, num_heldout=0)["train"]
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        Cm3LeonMemoryBank.build(pairs, SentenceTransformer(str(CLIP_PATH)), tmp_path / "bank", text_column="caption",
                                image_column="images", batch_size=0, show_progress_bar=False)
