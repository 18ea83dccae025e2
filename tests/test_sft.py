"""Multi-task SFT (issue 25): the task formats, the mixture balancing, SFT pre-tokenization, packing without attention
across examples, LoRA through PEFT, and exact resume — on the synthetic world's tasks and the bundled tiny model."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import TrainerCallback
from trl import ModelConfig

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.pretokenized import load_pretokenized
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.sft import Cm3LeonSFTConfig, SFTArguments, build_sft_trainer, run_sft
from cm3leon_hf.sft_data import (
    TASK_COLUMNS,
    balance,
    balanced_rows,
    check_task_columns,
    format_example,
    format_messages,
    mixture_weights,
    pretokenize_sft,
)
from cm3leon_hf.synthetic import TASKS, build_tasks, make_row


@pytest.fixture(scope="module")
def processor():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, processor):
    """Two rows of every world task, pre-tokenized."""
    rows = build_tasks(num_train=2, num_validation=0, num_test=0, num_heldout=0)["train"]
    directory = tmp_path_factory.mktemp("sft-data")
    pretokenize_sft(rows, processor, directory, show_progress_bar=False)
    return directory


# ------------------------------------------------------------------------------------------------ formats


def test_every_world_task_formats_with_its_images_and_answer_last():
    for task in TASKS:
        row = make_row(task, "train", 5)
        prompt, completion, images = format_example(task, row, index=5)
        assert len(images) == len(row["images"])
        assert prompt.count("<image>") + completion.count("<image>") == len(images)
        if task in ("caption", "vqa"):  # the answer is a CM3 infill after the image, ending at <eoss>
            answer = row["caption"] if task == "caption" else row["answer"]
            assert prompt.endswith("<image> <mask:0>") and prompt.count("<mask:0>") == 2
            assert completion == f"{answer} <eoss> <eos>" and answer not in prompt
        else:  # the output image comes last
            assert completion == "<image> <eos>" and prompt.endswith("<break>")
    edit = make_row("edit", "train", 5)
    prompt, _, _ = format_example("edit", edit, index=5)
    assert prompt.startswith("Edit") and edit["instruction"] in prompt
    # The template is drawn per row, deterministically: the same row gives the same text, and all forms occur.
    forms = {format_example("vqa", make_row("vqa", "train", 0), index=i)[0].split("<mask:0>")[0][-8:] for i in range(40)}
    assert len(forms) == 3
    assert format_example("vqa", make_row("vqa", "train", 0), index=7) == format_example("vqa", make_row("vqa", "train", 0), index=7)


def test_a_dataset_without_a_tasks_columns_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'vqa' dataset needs the columns \['question', 'answer', 'images'\]; it lacks \['answer'\]"):
        check_task_columns("vqa", ["question", "images", "text"])
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        check_task_columns("poetry", ["text"])
    row = make_row("edit", "train", 0)
    with pytest.raises(ValueError, match="'edit' row has 2 images, this one has 1"):
        format_example("edit", {**row, "images": row["images"][:1]})
    with pytest.raises(ValueError, match="needs a value in column 'instruction'"):
        format_example("edit", {**row, "instruction": "  "})
    assert set(TASK_COLUMNS) == set(TASKS)


def test_mixture_weights_clip_each_task_to_the_thresholds_around_the_mean():
    sizes = {"caption": 10_000, "vqa": 1_000, "edit": 100, "infill": 10}  # mean 2,777.5
    weights = mixture_weights(sizes)
    assert weights == {"caption": 0.833, "vqa": 1.0, "edit": 8.33, "infill": 83.3}
    rows = balanced_rows(sizes, weights, seed=0)
    assert {t: len(r) for t, r in rows.items()} == {"caption": 8_330, "vqa": 1_000, "edit": 833, "infill": 833}
    assert len(np.unique(rows["caption"])) == 8_330  # down-sampling draws without replacement
    assert np.bincount(rows["infill"]).min() == 83  # up-sampling: 83 whole copies and a sample
    assert all((rows[t] == r).all() for t, r in balanced_rows(sizes, weights, seed=0).items())
    with pytest.raises(ValueError, match="at least one row"):
        mixture_weights({"caption": 0})
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        mixture_weights(sizes, (2.0, 3.0))


# ------------------------------------------------------------------------------------------------ data


def test_sft_pretokenization_marks_the_completion_and_round_trips(sft_data, processor):
    examples, _, manifest = load_pretokenized(sft_data, processor)
    assert manifest["kind"] == "sft" and manifest["num_examples_per_task"] == dict.fromkeys(sorted(TASKS), 2)
    assert manifest["files"]  # sizes and checksums of the data, checked when it loads
    rows = build_tasks(num_train=2, num_validation=0, num_test=0, num_heldout=0)["train"]
    for k, example in enumerate(examples):
        task = example["task"]
        prompt, completion, images = format_example(task, rows[k], index=k)
        ids, mask = example["input_ids"], example["completion_mask"]
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(ids) - start) and ids[0] == processor.eos_token_id
        expected = processor(prompt + " " + completion, images=images, padding=False)["input_ids"][0]
        assert ids == expected  # prompt and completion encode as the whole document does
        tail = processor.decode(ids[start:])
        if task in ("caption", "vqa"):
            assert tail == [completion]
        else:
            assert len(tail) == 2 and tail[1] == "<eos>"  # an image, then <eos>
    balanced = balance(examples, verbose=False)
    assert len(balanced) == len(examples)  # equal task sizes: nothing to balance


def test_a_row_that_cannot_be_formatted_is_skipped_and_counted(tmp_path, processor):
    rows = build_tasks(("edit",), num_train=3, num_validation=0, num_test=0, num_heldout=0)["train"]
    rows = rows.map(lambda row, i: {"instruction": None if i == 1 else row["instruction"]}, with_indices=True)
    pretokenize_sft(rows, processor, tmp_path / "data", show_progress_bar=False)
    examples, documents, manifest = load_pretokenized(tmp_path / "data", processor)
    assert manifest["num_skipped"] == {"bad_row": 1, "too_long": 0} and len(examples) == 2
    assert documents[1]["input_ids"] == []
    with pytest.raises(ValueError, match="kept no example: all 1 rows were skipped"):
        pretokenize_sft(rows.select([1]), processor, tmp_path / "none", show_progress_bar=False)
    assert not (tmp_path / "none" / "manifest.json").exists()
    with pytest.raises(ValueError, match="lacks \\['instruction'\\]"):
        pretokenize_sft(rows.remove_columns("instruction"), processor, tmp_path / "other", show_progress_bar=False)


def test_trls_vision_language_recipe_trains_the_same_ids_as_pretokenized_sft(sft_data, processor):
    """A user of TRL's own recipe (`messages` + `images` rows, `SFTTrainer(model, processing_class=processor)`, no
    pre-tokenization) gets the ids `training/sft.py` trains on, images in the answer included: TRL's collator renders
    the processor's chat template, which writes every task as `format_example` does."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    examples, _, _ = load_pretokenized(sft_data, processor)
    rows = build_tasks(num_train=2, num_validation=0, num_test=0, num_heldout=0)["train"]
    collator = DataCollatorForVisionLanguageModeling(processor=processor)
    for k in range(len(rows)):
        task = rows[k]["task"]
        conversation = format_messages(task, rows[k], index=k)
        batch = collator([conversation])
        assert batch["input_ids"][0].tolist() == examples[k]["input_ids"], task
        assert (batch["labels"] != -100).all()  # the whole sequence, as the paper trains (and training/sft.py)
    edit = format_messages("edit", rows[rows["task"].index("edit")], index=rows["task"].index("edit"))
    assert [part["type"] for part in edit["messages"][0]["content"]] == ["text", "image", "text"]
    assert edit["messages"][1]["content"] == [{"type": "image"}] and len(edit["images"]) == 2


def test_trls_sft_trainer_runs_on_conversations_with_images_in_the_answer(tmp_path):
    """SFTTrainer with the processor and a dataset of conversations whose answers are images (text-to-image, edits):
    no TRL fine-tuning path existed for a model that writes images."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = [format_messages(task, make_row(task, "train", i), index=i) for task in ("text_to_image", "edit", "vqa")
            for i in range(2)]
    dataset = datasets.Dataset.from_list(rows)
    model = Cm3LeonForCausalLM.from_pretrained(TINY_PATH)
    trainer = SFTTrainer(model=model, processing_class=Cm3LeonProcessor.from_pretrained(TINY_PATH),
                         train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                        learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                                        activation_checkpointing=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ packing


def _per_token_nll(model, input_ids, labels, **inputs):
    logits = model(input_ids=input_ids, **inputs).logits[0, :-1]
    target = labels[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none")
    return nll[target != -100]


def test_packed_examples_give_the_same_per_token_loss_as_alone(sft_data, processor):
    """TRL's padding-free packing (one row, position_ids restarting per example) and each example alone give the same
    per-token losses: attention never crosses an example."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = Cm3LeonForCausalLM.from_pretrained(TINY_PATH).eval()
    examples, _, _ = load_pretokenized(sft_data, processor)
    chosen = [examples[i] for i in (0, 5, 9)]
    features = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in chosen]
    collator = DataCollatorForLanguageModeling(pad_token_id=processor.pad_token_id, padding_free=True)
    packed = collator([{"input_ids": [t for f in features for t in f["input_ids"]],
                        "labels": [t for f in features for t in f["labels"]],
                        "seq_lengths": [len(f["input_ids"]) for f in features]}])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        together = _per_token_nll(model, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
        alone = torch.cat([_per_token_nll(model, torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]]))
                           for f in features])
    # TRL's collator also drops each example's first label (nothing predicts it across the boundary).
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)
    # Without position_ids the same row is one long document: later examples see the earlier ones.
    with torch.no_grad():
        crossed = _per_token_nll(model, packed["input_ids"], packed["labels"])
    assert (crossed - alone).abs().max() > 1e-2


def test_a_packed_row_may_be_longer_than_the_context_but_its_positions_may_not(tiny_config):
    from conftest import random_model

    model = random_model(tiny_config)
    context = tiny_config.max_position_embeddings
    ids = torch.randint(5, 300, (1, context + 100))
    restarting = torch.cat([torch.arange(context // 2 + 50), torch.arange(context // 2 + 50)]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=restarting).logits
        second = model(input_ids=ids[:, context // 2 + 50:]).logits  # the second example alone
    torch.testing.assert_close(logits[:, context // 2 + 50:], second, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position_ids contains"):
        model(input_ids=ids, position_ids=torch.arange(context + 100).unsqueeze(0))
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        model(input_ids=ids)  # without position_ids it is one document


# ------------------------------------------------------------------------------------------------ training


def _config(output_dir, **kwargs):
    defaults = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                    warmup_steps=0, save_steps=2, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
                    seed=0, data_seed=0)
    return Cm3LeonSFTConfig(**{**defaults, **kwargs})


def _weights(path):
    return Cm3LeonForCausalLM.from_pretrained(path).state_dict()


class _StopAt(TrainerCallback):
    """Stops training at a step as a kill would: the checkpoint of that step is written, the run never ends."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_sft_resumed_after_a_stop_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, sft_data):
    args, model = SFTArguments(train_data=str(sft_data)), ModelConfig(model_name_or_path=TINY_PATH)
    run_sft(args, _config(tmp_path / "whole"), model)
    trainer = build_sft_trainer(args, _config(tmp_path / "stopped"), model)
    trainer.add_callback(_StopAt(2))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    run_sft(args, _config(tmp_path / "stopped"), model)  # the same command again: resumes from checkpoint-2
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "stopped")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not all(torch.equal(whole[k], v) for k, v in _weights(TINY_PATH).items())  # it trained
    state = json.loads((tmp_path / "stopped" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The same command once more: the run is complete, nothing trains (Trainer alone would count a fifth step and
    # write checkpoint-5); with its final model gone, it is written again from checkpoint-4.
    assert run_sft(args, _config(tmp_path / "stopped"), model) is None
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (tmp_path / "stopped" / "model.safetensors").unlink()
    assert run_sft(args, _config(tmp_path / "stopped"), model) is None
    again = _weights(tmp_path / "stopped")
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert json.loads((tmp_path / "stopped" / "trainer_state.json").read_text())["global_step"] == 4
    # The saved model loads with its processor, and both agree.
    Cm3LeonProcessor.from_pretrained(tmp_path / "stopped").validate_model_config(
        Cm3LeonForCausalLM.from_pretrained(tmp_path / "stopped").config)


@pytest.mark.slow
def test_lora_trains_only_the_adapter_which_saves_loads_and_merges(tmp_path, sft_data):
    from peft import PeftModel

    model = ModelConfig(model_name_or_path=TINY_PATH, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        lora_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    trainer = run_sft(SFTArguments(train_data=str(sft_data)), _config(tmp_path / "lora", save_steps=4), model)
    trained = trainer.model
    assert isinstance(trained, PeftModel)
    saved = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved  # the adapter only
    base = Cm3LeonForCausalLM.from_pretrained(TINY_PATH)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    # What loads is what trained: every parameter, adapter and frozen base alike.
    trained_parameters = dict(trained.named_parameters())
    assert {k for k in trained_parameters if "lora_" in k} and trained_parameters.keys() == dict(loaded.named_parameters()).keys()
    assert all(torch.equal(trained_parameters[k], v) for k, v in loaded.named_parameters())
    # Only the adapter trained: the frozen base's weights are those it started from.
    lora_free = {k.replace("base_layer.", ""): v for k, v in loaded.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_weights[k], lora_free[k]) for k in base_weights)
    ids = torch.tensor([load_pretokenized(sft_data)[0][3]["input_ids"]])
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits
        original = Cm3LeonForCausalLM.from_pretrained(TINY_PATH).eval()(input_ids=ids).logits
        assert (adapted - original).abs().max() > 1e-3  # the adapter changes the model
        merged = loaded.merge_and_unload()
        assert isinstance(merged, Cm3LeonForCausalLM)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)  # fp32 (W + BA)x vs Wx + BAx


def test_pretraining_data_is_refused_for_sft(tmp_path, processor):
    from cm3leon_hf.pretokenized import pretokenize
    from cm3leon_hf.synthetic import build_task

    pairs = build_task("text_to_image", num_train=2, num_validation=0, num_test=0, num_heldout=0)["train"]
    pretokenize(pairs, processor, tmp_path / "pretrain", text_column="caption", image_column="images",
                show_progress_bar=False)
    args, model = SFTArguments(train_data=str(tmp_path / "pretrain")), ModelConfig(model_name_or_path=TINY_PATH)
    with pytest.raises(ValueError, match="holds pretraining data, not SFT data"):
        build_sft_trainer(args, _config(tmp_path / "out"), model)
    with pytest.raises(ValueError, match="longer than the model's context"):
        build_sft_trainer(args, _config(tmp_path / "out", max_length=100_000), model)
    with pytest.raises(ValueError, match="--model_name_or_path is required"):
        build_sft_trainer(args, _config(tmp_path / "out"), ModelConfig())
    shutil.rmtree(tmp_path / "pretrain")


@pytest.mark.slow
def test_the_sft_commands_run_as_written(tmp_path):
    """training/pretokenize_sft.py then training/sft.py with the recipe, as the recipe's header says (at toy size)."""
    import subprocess
    import sys

    from conftest import REPO

    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def run(*argv):
        result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    data = tmp_path / "train"
    printed = run("training/pretokenize_sft.py", "--synthetic_rows", "3", "--synthetic_tasks", "caption", "edit",
                  "--output_dir", str(data), "--no_progress")
    summary = json.loads(printed.stdout.strip().splitlines()[-1])
    assert summary["num_examples_per_task"] == {"caption": 3, "edit": 3}
    run("training/sft.py", "--config", "training/recipes/sft_tiny.yaml", "--train_data", str(data), "--eval_data", "",
        "--eval_strategy", "no", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--output_dir", str(tmp_path / "sft"), "--disable_tqdm", "true")
    assert json.loads((tmp_path / "sft" / "trainer_state.json").read_text())["global_step"] == 2
    Cm3LeonForCausalLM.from_pretrained(tmp_path / "sft")
    # A user's dataset without a column its task needs: refused, naming the column.
    from cm3leon_hf.synthetic import build_task

    build_task("vqa", num_train=2, num_validation=0, num_test=0, num_heldout=0)["train"].remove_columns(
        "answer").save_to_disk(str(tmp_path / "my-vqa"))
    refused = subprocess.run([sys.executable, "training/pretokenize_sft.py", "--dataset", str(tmp_path / "my-vqa"),
                              "--task", "vqa", "--output_dir", str(tmp_path / "x")], cwd=REPO, env=env,
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "it lacks ['answer']" in refused.stderr


def test_an_sft_step_that_breaks_the_weights_stops_the_run(tmp_path, sft_data):
    from cm3leon_hf.trainer import NonFiniteTrainingError

    args, model = SFTArguments(train_data=str(sft_data)), ModelConfig(model_name_or_path=TINY_PATH)
    with pytest.raises(NonFiniteTrainingError, match="step"):
        run_sft(args, _config(tmp_path / "broken", learning_rate=1e20, save_steps=1), model)
    assert not (tmp_path / "broken" / "model.safetensors").exists()


def test_the_sft_benchmark_scores_right_wrong_and_partly_right_outputs():
    """bench/sft.py's scorer, on outputs whose score is known: the row's own target image and caption are right with
    full credit; a caption with one colour changed is wrong with partial credit; an empty or unparseable answer
    scores nothing."""
    import importlib.util

    from conftest import REPO
    from cm3leon_hf.synthetic import make_row

    spec = importlib.util.spec_from_file_location("bench_sft", REPO / "bench" / "sft.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for task in ("text_to_image", "structure", "edit", "infill", "spatial"):
        row = make_row(task, "test", 1)
        assert bench.score_output(task, row, row["images"][-1]) == (True, 1.0), task
    row = make_row("text_to_image", "test", 1)
    assert bench.score_output("text_to_image", row, make_row("text_to_image", "test", 2)["images"][-1])[0] is False
    caption = make_row("caption", "test", 0)
    assert bench.score_output("caption", caption, caption["caption"]) == (True, 1.0)
    colour = next(c for c in ("red", "green", "blue") if c in caption["caption"].split())
    other = "pink"  # a colour of the world that the caption does not use
    right, partial = bench.score_output("caption", caption, caption["caption"].replace(colour, other, 1))
    assert not right and 0.5 < partial < 1.0, partial
    assert bench.score_output("caption", caption, "the.") == (False, 0.0)
    vqa = make_row("vqa", "test", 0)
    assert bench.score_output("vqa", vqa, vqa["answer"] + ".") == (True, 1.0)
    assert bench.score_output("vqa", vqa, "The.") == (False, 0.0)
