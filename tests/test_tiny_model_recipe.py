"""training/train_tiny_model.py, the bundled model's recipe, end to end at a toy size: every stage runs, a re-run skips
what is complete, and the bundle holds the model, its decoding defaults, a model card and a memory bank, beside the
processor and without copies of the package's code."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
from conftest import REPO


def train_tiny_model(*argv: str) -> subprocess.CompletedProcess:
    """training/train_tiny_model.py as users run it (its stages are subprocesses of it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "training" / "train_tiny_model.py"), *argv], env=env,
                          capture_output=True, text=True)


def succeeds(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow
def test_the_recipe_builds_and_bundles_a_model(tmp_path):
    recipe = yaml.safe_load((REPO / "training" / "recipes" / "tiny_model.yaml").read_text())
    recipe.pop("continuations", None)  # the base stage first; continuation stages are tried below, at a toy size
    recipe.pop("sft", None)  # and the instruction-tuning stages after them
    recipe.update(
        output_root=str(tmp_path / "run"),
        train_rows=48,
        validation_rows=8,
        bundle_dir=str(tmp_path / "bundle"),
        bundle_bank_rows=16,
        pretrain_overrides={"max_steps": 2, "warmup_steps": 0, "save_steps": 1, "eval_steps": 2,
                            "per_device_train_batch_size": 4, "max_eval_examples": 4, "eval_num_images": 2,
                            "logging_steps": 1},
    )
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    succeeds(train_tiny_model("--config", str(config), "--no_progress"))
    bundle = tmp_path / "bundle"

    run = tmp_path / "run"
    manifest = json.loads((run / "pretokenized" / "train-rag" / "manifest.json").read_text())
    assert manifest["num_rows"] == 48 and manifest["retrieval"]["num_docs"] == recipe["num_retrieved_docs"]
    state = json.loads((run / "pretrain" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert any("eval_scene_accuracy" in record for record in state["log_history"])

    # The bundle: the trained weights, CFG on by default, a card that names the data, a bank; no code files.
    model = Cm3LeonForCausalLM.from_pretrained(bundle)
    trained = Cm3LeonForCausalLM.from_pretrained(run / "pretrain")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert model.generation_config.guidance_scale == recipe["generation"]["guidance_scale"]
    Cm3LeonProcessor.from_pretrained(bundle, model_config=model.config)
    card = (bundle / "README.md").read_text()
    assert "48 text-to-image pairs" in card
    assert "The tiny CM3Leon bundled with" in card and "A miniature for running and testing" in card  # the recipe's
    assert len(Cm3LeonMemoryBank.load(bundle / "memory_bank")) == 16
    assert not list(bundle.glob("*.py")) and not [p for p in bundle.parent.iterdir() if p.name.startswith(f".{bundle.name}")]

    # Run again: everything is complete, nothing is redone (the bank and data keep their files).
    stamps = {p: p.stat().st_mtime_ns for p in (run / "bank" / "index.faiss", run / "pretokenized" / "validation" / "manifest.json")}
    succeeds(train_tiny_model("--config", str(config), "--no_progress"))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((run / "pretrain" / "trainer_state.json").read_text())["global_step"] == 2

    # An intermediate checkpoint bundles too, and its card says which step of how many it is.
    checkpoint = run / "pretrain" / "checkpoint-1"
    succeeds(train_tiny_model("--config", str(config), "--no_progress", "--bundle_checkpoint", str(checkpoint)))
    model = Cm3LeonForCausalLM.from_pretrained(bundle)
    at_step_1 = Cm3LeonForCausalLM.from_pretrained(checkpoint)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), at_step_1.state_dict().values()))
    assert "its checkpoint at step 1 of 2" in (bundle / "README.md").read_text()
    refused = train_tiny_model("--config", str(config), "--bundle-checkpoint", str(run / "pretrain" / "nowhere"))
    assert refused.returncode != 0 and "not a complete training checkpoint" in refused.stderr

    # Continuation stages: each trains the previous stage's final weights again; the last one is bundled.
    def weights(path):
        return Cm3LeonForCausalLM.from_pretrained(path).state_dict()

    def same(a, b):
        return all((x == y).all() for x, y in zip(a.values(), b.values()))

    stage = {"max_steps": 1, "learning_rate": 1e-3, "warmup_steps": 0, "save_steps": 1, "eval_steps": 1,
             "eval_num_images": 0}
    succeeds(train_tiny_model("--config", str(config), "--no_progress", "--continuations", json.dumps([stage])))
    continued = run / "pretrain-continued-1"
    assert json.loads((continued / "trainer_state.json").read_text())["global_step"] == 1
    assert same(weights(bundle), weights(continued)) and not same(weights(continued), weights(run / "pretrain"))
    assert "then 1 continuation stage of 1 steps" in (bundle / "README.md").read_text()
    # Its first step started from the base stage's weights: one step of AdamW from there moves each weight by about lr.
    moved = max((a - b).abs().max().item() for a, b in zip(weights(continued).values(), weights(run / "pretrain").values()))
    assert 0 < moved < 2e-3
    # --start_from stands for every stage before the last: only the last one trains, from those weights.
    succeeds(train_tiny_model("--config", str(config), "--no_progress", "--continuations", json.dumps([stage, stage]),
                              "--start_from", str(run / "pretrain")))
    second = weights(run / "pretrain-continued-2")
    assert same(weights(bundle), second) and same(second, weights(continued))  # the same one step from the same start
    refused = train_tiny_model("--config", str(config), "--start_from", str(run / "pretrain"))
    assert refused.returncode != 0 and "the recipe has none" in refused.stderr

    # The instruction-tuned model: the recipe's `sft` stages from the bundle, into a bundle of its own.
    refused = train_tiny_model("--config", str(config), "--sft_only")
    assert refused.returncode != 0 and "--sft_only runs the recipe's `sft` stages; the recipe has none" in refused.stderr
    sft = {**recipe_sft(), "train_rows": 2, "validation_rows": 2, "bundle_dir": str(tmp_path / "bundle-sft"),
           "overrides": {"max_steps": 1, "warmup_steps": 0, "eval_steps": 1, "save_steps": 1, "logging_steps": 1,
                         "gradient_accumulation_steps": 1, "max_eval_examples": 2}}
    succeeds(train_tiny_model("--config", str(config), "--no_progress", "--sft_only", "--sft", json.dumps(sft)))
    tuned, sft_bundle = run / "sft" / "model", tmp_path / "bundle-sft"
    assert json.loads((tuned / "trainer_state.json").read_text())["global_step"] == 1
    manifest = json.loads((run / "sft" / "train" / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["num_rows"] == 2 * 7  # 2 rows of each of the world's 7 tasks
    assert same(weights(sft_bundle), weights(tuned)) and not same(weights(tuned), weights(bundle))
    Cm3LeonProcessor.from_pretrained(sft_bundle, model_config=Cm3LeonForCausalLM.from_pretrained(sft_bundle).config)
    card = (sft_bundle / "README.md").read_text()
    assert f"Instruction-tuned from `{bundle.name}`" in card and "2 rows each" in card and "1 steps" in card
    assert "A miniature of the paper's instruction tuning" in card  # the recipe's limitations
    assert not (sft_bundle / "memory_bank").exists() and not list(sft_bundle.glob("*.py"))
    bad = {k: v for k, v in sft.items() if k != "config"}
    refused = train_tiny_model("--config", str(config), "--sft_only", "--sft", json.dumps({**bad, "rows": 3}))
    assert refused.returncode == 2 and "--sft: missing keys ['config'], unknown keys ['rows']" in refused.stderr


def recipe_sft() -> dict:
    return yaml.safe_load((REPO / "training" / "recipes" / "tiny_model.yaml").read_text())["sft"]


def test_a_recipe_without_its_keys_is_refused(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"output_root": "x", "train_rows": 0}))
    refused = train_tiny_model("--config", str(config))
    assert refused.returncode == 2 and "required: --validation_rows" in refused.stderr
    assert "--num_retrieved_docs" in refused.stderr and "--pretrain_config" in refused.stderr
    config.write_text(yaml.safe_dump({"output_root": "x", "train_rows": 0, "validation_rows": 1,
                                      "num_retrieved_docs": 3, "pretrain_config": "p.yaml"}))
    refused = train_tiny_model("--config", str(config))
    assert refused.returncode == 2 and "--train_rows must be a positive integer, got 0" in refused.stderr
    config.write_text(yaml.safe_dump({"output_root": "x", "train_rows": 1, "validation_rows": 1,
                                      "num_retrieved_docs": 3, "pretrain_config": "p.yaml", "trian_rows": 5}))
    refused = train_tiny_model("--config", str(config))  # a misspelt key is not ignored
    assert refused.returncode == 2 and "trian_rows" in refused.stderr


def test_continuations_inherit_the_base_flags_but_not_its_shape(tmp_path):
    """A recipe that trains another shape (pretrain_overrides.config_overrides) continues from those weights: the
    continuation stages get every base flag but that one, which pretrain.py refuses beside --model_name_or_path."""
    sys.path.insert(0, str(REPO / "training"))
    from train_tiny_model import TinyModelArguments, pretraining_stages

    recipe = {"pretrain_overrides": {"max_steps": 8, "config_overrides": "hidden_size=384,num_attention_heads=6"},
              "continuations": [{"max_steps": 2}, {"learning_rate": 1e-4}]}
    stages = pretraining_stages(recipe, tmp_path, TinyModelArguments())
    assert [(path.name, flags, start and start.name) for path, flags, start in stages] == [
        ("pretrain", recipe["pretrain_overrides"], None),
        ("pretrain-continued-1", {"max_steps": 2}, "pretrain"),
        ("pretrain-continued-2", {"max_steps": 8, "learning_rate": 1e-4}, "pretrain-continued-1"),
    ]
