"""Reliability probes: bad input, corrupt files and concurrency against the public API and the commands, as a careful
user would try them. Each probe is one thing a user can get wrong (or one condition that must hold), and its outcome
falls in one class:

  clear       a ValueError / TypeError / OSError (or argparse's usage error) whose message matches what the probe
              expects: it names the problem
  unclear     an exception, but another type or a message that does not name the problem (a crash deep inside)
  silent      no error where one was due (an invalid argument accepted), or a wrong result where one was checked
  hang        still running after the probe's time limit

The probes reproduce the findings of the reliability issue (hangs, unchecked masks, silent numbers, deep crashes,
corrupt memory banks, paths outside a bank) and extend them to the code added since (collator, processor truncation,
the end-to-end recipe, the CLI). The reference in every run is the count of probes: the table prints each class as a
share of them. No network; a tiny random model with the shipped processor; a few minutes on one CPU thread.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python bench/reliability.py            # the table; --verbose: every probe
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
PROBES: list[tuple[str, str, object]] = []


def probe(area: str, expect: str | None):
    """Register `fn` as a probe of `area`. `expect`: a regex the error message must match (an error is due), or None:
    the probe checks a result itself and raises `Silent` when it is wrong."""

    def register(fn):
        PROBES.append((area, fn.__name__, expect, fn))
        return fn

    return register


class Silent(Exception):
    """A wrong result, or an invalid input accepted without a word."""


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ shared fixtures

_cache: dict = {}


def model():
    if "model" not in _cache:
        from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM

        torch.manual_seed(0)
        _cache["model"] = Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")).eval()
        for p in _cache["model"].parameters():  # random weights with some spread, so that outputs differ
            torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    return _cache["model"]


def processor():
    if "processor" not in _cache:
        from cm3leon_hf import Cm3LeonProcessor
        from cm3leon_hf.pretrained import TINY_PATH

        _cache["processor"] = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    return _cache["processor"]


def prompt_ids():
    return processor()(["a red star at the top left <break>"], return_tensors="pt")["input_ids"]


def workdir() -> Path:
    if "dir" not in _cache:
        _cache["dir"] = Path(tempfile.mkdtemp(prefix="cm3leon-probes-"))
    return _cache["dir"]


def bank_copy(name: str) -> Path:
    """A fresh copy of a small memory bank built once for the bank probes."""
    source = workdir() / "bank"
    if not source.exists():
        from sentence_transformers import SentenceTransformer

        from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
        from cm3leon_hf.pretrained import CLIP_PATH
        from cm3leon_hf.synthetic import build_task

        pairs = build_task("text_to_image", num_train=64, num_validation=0, num_test=0, num_heldout=0)["train"]
        Cm3LeonMemoryBank.build(pairs, SentenceTransformer(str(CLIP_PATH)), source, text_column="caption",
                                image_column="images", show_progress_bar=False)
    target = workdir() / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def command(*args: str, timeout: int = 120) -> None:
    """Run a repository command; raise its last stderr line as the error (argparse and our checks print there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    try:
        result = subprocess.run([sys.executable, *args], cwd=workdir(), env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Hang(f"{args[0]} still running after {timeout} s") from None
    if result.returncode == 0:
        raise Silent(f"{' '.join(args)} exited 0")
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback" in result.stderr and not re.match(r"(ValueError|TypeError|OSError|FileNotFoundError|SystemExit)", last):
        raise RuntimeError(f"crash: {last}")
    raise ValueError(last)


# ------------------------------------------------------------------------------------------------ model

@probe("model", r"input_ids.*(integer|long|dtype)")
def float_input_ids():
    model()(prompt_ids().float())


@probe("model", r"input_ids.*(2-D|2D|dim|batch)")
def one_dimensional_input_ids():
    model()(prompt_ids()[0])


@probe("model", r"(empty|no tokens|length 0)")
def empty_prompt():
    model()(torch.zeros(1, 0, dtype=torch.long))


@probe("model", r"vocab|outside|range")
def ids_outside_the_vocabulary():
    model()(torch.tensor([[1, 5000]]))


@probe("model", r"position_ids.*(negative|outside)")
def negative_position_ids():
    ids = prompt_ids()
    model()(ids, position_ids=-torch.arange(ids.shape[1])[None])


@probe("model", r"attention_mask.*(length|shape|size)")
def mask_longer_than_ids():
    ids = prompt_ids()
    model()(ids, attention_mask=torch.ones(1, ids.shape[1] + 3, dtype=torch.long))


@probe("model", r"attention_mask.*only 0.*and 1")
def mask_holding_two():
    ids = prompt_ids()
    model()(ids, attention_mask=torch.full_like(ids, 2))


@probe("model", r"attention_mask.*only 0.*and 1")
def mask_holding_a_half():
    ids = prompt_ids()
    model()(ids, attention_mask=torch.full(ids.shape, 0.5))


@probe("model", r"attention.mask.*shape.*drop")
def short_mask_with_cfg():
    ids = prompt_ids()
    model().generate(ids, attention_mask=torch.ones(1, ids.shape[1] - 2, dtype=torch.long), guidance_scale=3.0,
                     do_sample=False, max_new_tokens=4, generate_image=False)


@probe("model", r"num_return_sequences")
def zero_return_sequences_guided():
    model().generate(prompt_ids(), guidance_scale=3.0, num_return_sequences=0, do_sample=True)


@probe("model", r"(context|max_position_embeddings|longer)")
def prompt_longer_than_the_context():
    model().generate(torch.ones(1, 1100, dtype=torch.long), max_new_tokens=4, generate_image=False)


@probe("model", None)
def seeded_generation_is_the_same_in_threads():
    ids = prompt_ids()

    def run(seed):
        return model().generate(ids, do_sample=True, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed))

    alone = {seed: run(seed) for seed in range(4)}
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, run(s))) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(not torch.equal(alone[s], results[s]) for s in alone):
        raise Silent("a seed gave other images in a thread than alone")


# ------------------------------------------------------------------------------------------------ config

def config_with(**kwargs):
    from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig

    values = json.loads((HUB_CONFIGS / "cm3leon-tiny" / "config.json").read_text())
    values.update(kwargs)
    values.pop("architectures", None), values.pop("transformers_version", None), values.pop("model_type", None)
    return Cm3LeonConfig(**values)


for _name, _field, _value, _pattern in (
    ("layer_norm_eps_nan", "layer_norm_eps", float("nan"), r"layer_norm_eps"),
    ("initializer_range_inf", "initializer_range", float("inf"), r"initializer_range"),
    ("vocab_size_not_an_integer", "vocab_size", 400.5, r"vocab_size"),
    ("image_token_offset_float", "image_token_offset", 256.0, r"image_token_offset"),
    ("hidden_act_unknown", "hidden_act", "nope", r"hidden_act"),
    ("heads_not_dividing_width", "num_attention_heads", 3, r"num_attention_heads|hidden_size"),
):
    def _config_probe(field=_field, value=_value):
        config_with(**{field: value})

    _config_probe.__name__ = f"config_{_name}"
    probe("config", _pattern)(_config_probe)


# ------------------------------------------------------------------------------------------------ guidance

@probe("guidance", None)
def cfg_with_an_unconditional_minus_inf():
    from cm3leon_hf.logits_process import BatchedClassifierFreeGuidanceLogitsProcessor

    scores = torch.tensor([[1.0, 2.0], [float("-inf"), 0.0]])
    out = BatchedClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(1, 2, dtype=torch.long), scores)
    if torch.isnan(out).any():
        raise Silent(f"NaN guided logits: {out}")


@probe("guidance", r"guidance_scale|scale")
def negative_guidance_scale():
    from cm3leon_hf.logits_process import BatchedClassifierFreeGuidanceLogitsProcessor

    BatchedClassifierFreeGuidanceLogitsProcessor(-1.0)


@probe("guidance", r"`contrastive_k`")
def contrastive_k_zero():
    model().generate(prompt_ids(), contrastive_k=0, do_sample=True)


# ------------------------------------------------------------------------------------------------ processor

@probe("processor", r"uint8")
def image_array_of_floats():
    processor()("a <break> <image>", images=[np.random.default_rng(0).random((64, 64, 3))])


@probe("processor", r"zero size")
def image_of_zero_size():
    from PIL import Image

    processor()("a <break> <image>", images=[Image.new("RGB", (0, 64))])


@probe("processor", r"cannot decode the image bytes")
def image_bytes_corrupt():
    processor()("a <break> <image>", images=[b"not an image"])


@probe("processor", r"placeholders")
def images_and_placeholders_disagree():
    processor()("a <break> <image> <image>", images=[np.zeros((64, 64, 3), np.uint8)])


@probe("processor", r"truncation")
def truncation_of_an_unknown_kind():
    processor()("a red star", truncation="sideways", max_length=4)


@probe("processor", r"truncation.*max_length")
def truncation_without_max_length():
    processor()("a red star", truncation=True)


@probe("processor", r"vocab|image_token_offset|text_vocab_size|does not match|disagree")
def processor_of_another_vocabulary():
    processor().validate_model_config(config_with(text_vocab_size=2048, image_token_offset=2048, vocab_size=4096))


# ------------------------------------------------------------------------------------------------ pipelines

def text_to_image():
    if "pipe" not in _cache:
        from transformers import pipeline

        import cm3leon_hf.pipelines  # noqa: F401

        _cache["pipe"] = pipeline("text-to-image", model=model(), processor=processor())
    return _cache["pipe"]


@probe("pipeline", r"output_type")
def pipeline_output_type_unknown():
    text_to_image()("a red star", output_type="jpeg", progress_bar=False)


@probe("pipeline", r"reranker")
def pooled_without_a_reranker():
    text_to_image()("a red star", decoding="pooled", num_candidates=4, progress_bar=False)


@probe("pipeline", r"decoding")
def decoding_unknown():
    text_to_image()("a red star", decoding="beam", progress_bar=False)


@probe("pipeline", r"generator")
def generator_list_of_the_wrong_length():
    text_to_image()("a red star", num_images_per_prompt=2, generator=[torch.Generator()], progress_bar=False)


@probe("pipeline", r"max_new_tokens")
def max_new_tokens_not_an_image():
    text_to_image()("a red star", max_new_tokens=5, progress_bar=False)


# ------------------------------------------------------------------------------------------------ memory bank

@probe("memory bank", r"batch_size")
def bank_build_batch_size_zero():
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.pretrained import CLIP_PATH
    from cm3leon_hf.synthetic import build_task

    pairs = build_task("text_to_image", num_train=8, num_validation=0, num_test=0, num_heldout=0)["train"]
    Cm3LeonMemoryBank.build(pairs, SentenceTransformer(str(CLIP_PATH)), workdir() / "bank0", text_column="caption",
                            image_column="images", batch_size=0)


@probe("memory bank", r"rows|hash|checksum|sha256|changed|corrupt")
def bank_rows_file_flipped():
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    bank = bank_copy("flipped")
    arrow = max((bank / "rows").rglob("*.arrow"), key=lambda p: p.stat().st_size)
    data = bytearray(arrow.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    arrow.write_bytes(bytes(data))
    Cm3LeonMemoryBank.load(bank)


@probe("memory bank", r"manifest")
def bank_manifest_truncated():
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    bank = bank_copy("truncated-manifest")
    text = (bank / "manifest.json").read_text()
    (bank / "manifest.json").write_text(text[: len(text) // 2])
    Cm3LeonMemoryBank.load(bank)


@probe("memory bank", r"manifest")
def bank_manifest_missing_a_key():
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    from cm3leon_hf.memory_bank import MANIFEST_KEYS

    bank = bank_copy("missing-key")
    manifest = json.loads((bank / "manifest.json").read_text())
    manifest.pop(sorted(MANIFEST_KEYS)[0])
    (bank / "manifest.json").write_text(json.dumps(manifest))
    Cm3LeonMemoryBank.load(bank)


@probe("memory bank", r"index")
def bank_index_truncated():
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    bank = bank_copy("truncated-index")
    index = bank / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    Cm3LeonMemoryBank.load(bank)


@probe("memory bank", r"inside|outside|own directory")
def bank_index_file_outside_its_directory():
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    bank = bank_copy("escape")
    victim = bank_copy("victim")
    manifest = json.loads((bank / "manifest.json").read_text())
    manifest["index_file"] = "../victim/index.faiss"
    (bank / "manifest.json").write_text(json.dumps(manifest))
    try:
        Cm3LeonMemoryBank.load(bank).reindex("Flat")
    finally:
        if not (victim / "index.faiss").exists():
            raise Silent("a file outside the bank was deleted")


@probe("memory bank", r"NaN|finite|nan|inf")
def bank_search_with_nan_queries():
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    bank = Cm3LeonMemoryBank.load(bank_copy("nan-query"))
    bank.search(np.full((1, bank.index.d), np.nan, np.float32), 2)


# ------------------------------------------------------------------------------------------------ collator

@probe("collator", r"flat sequence")
def collator_nested_ids():
    from cm3leon_hf.data_collator import Cm3LeonDataCollator

    Cm3LeonDataCollator(model().config, documents=[])([{"input_ids": [[1, 300, 2]], "retrieved_indices": []}])


@probe("collator", r"max_length")
def collator_example_longer_than_the_context():
    from cm3leon_hf.data_collator import Cm3LeonDataCollator

    Cm3LeonDataCollator(model().config, documents=[])([{"input_ids": [300] * 2000, "retrieved_indices": []}])


# ------------------------------------------------------------------------------------------------ commands

def train_image_tokenizer(flag: str, value: str) -> None:
    command(str(REPO / "training" / "train_image_tokenizer.py"), flag, value, "--output-dir", f"vq{flag}",
            "--max-steps", "2")


@probe("commands", r"batch-size|batch_size")
def train_image_tokenizer_batch_size_zero():
    train_image_tokenizer("--batch-size", "0")


@probe("commands", r"log-every|at least 1|positive")
def train_image_tokenizer_log_every_zero():
    train_image_tokenizer("--log-every", "0")


@probe("commands", r"checkpoint-every|at least 1|positive")
def train_image_tokenizer_checkpoint_every_zero():
    train_image_tokenizer("--checkpoint-every", "0")


@probe("commands", r"batch-size|batch_size")
def build_memory_bank_batch_size_zero():
    command(str(REPO / "training" / "build_memory_bank.py"), "--synthetic-task", "text_to_image", "--synthetic-rows",
            "8", "--batch-size", "0", "--output-dir", "bank1")


@probe("commands", r"max-texts|at least 1|positive")
def train_text_tokenizer_on_nothing():
    from cm3leon_hf import HUB_CONFIGS

    command(str(REPO / "training" / "train_text_tokenizer.py"), "--max-texts", "0", "--output-dir", "bpe0",
            "--model-config", str(HUB_CONFIGS / "cm3leon-tiny"))


@probe("commands", r"num-scenes|at least 1|positive")
def evaluate_image_tokenizer_on_no_scenes():
    from cm3leon_hf.pretrained import TINY_PATH

    command(str(REPO / "training" / "evaluate_image_tokenizer.py"), str(TINY_PATH / "image_tokenizer"),
            "--num-scenes", "0")


@probe("commands", r"num-images|at least 1|-n")
def cli_generate_zero_images():
    command("-m", "cm3leon_hf.cli", "generate", "a red star", "-n", "0", "-o", "x.png")


@probe("commands", r"no word|knows|vocabulary|unknown")
def cli_generate_a_prompt_of_unknown_words():
    command("-m", "cm3leon_hf.cli", "generate", "zzqx wvvk", "-o", "x.png")


def pretrain(*flags: str) -> None:
    command(str(REPO / "training" / "pretrain.py"), "--config", str(REPO / "training/recipes/pretrain_tiny.yaml"),
            "--train_data", str(workdir() / "nowhere"), "--output_dir", str(workdir() / "pt"), "--max_steps", "1",
            *flags)


@probe("commands", r"train_data|not a pre-tokenized|does not exist|manifest")
def pretrain_on_a_missing_dataset():
    pretrain()


@probe("commands", r"num_retrieved_docs")
def pretrain_with_negative_documents():
    pretrain("--num_retrieved_docs", "-1")


@probe("commands", r"not a complete training checkpoint")
def bundle_a_checkpoint_that_is_not_one():
    command(str(REPO / "training" / "train_tiny_model.py"), "--config", str(REPO / "training/recipes/tiny_model.yaml"),
            "--bundle-checkpoint", str(workdir() / "nowhere"))


# ------------------------------------------------------------------------------------------------ issue 28

def small_pairs():
    if "pairs" not in _cache:
        from cm3leon_hf.synthetic import build_task

        _cache["pairs"] = build_task("text_to_image", num_train=8, num_validation=0, num_test=0, num_heldout=0)["train"]
    return _cache["pairs"]


def pretokenize_into(directory: Path, **kwargs):
    from cm3leon_hf.pretokenized import pretokenize

    settings = {"text_column": "caption", "image_column": "images", "show_progress_bar": False, **kwargs}
    return pretokenize(small_pairs(), processor(), directory, **settings)


def folder_of_other_files(name: str) -> Path:
    folder = workdir() / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "precious.csv").write_text("a,b\n")
    return folder


def _kept(folder: Path) -> None:
    if not (folder / "data" / "precious.csv").exists():
        raise Silent("a file the command did not write was deleted")


@probe("data loss", r"does not hold pre-tokenized data.*Nothing was deleted")
def pretokenize_into_a_folder_of_other_files():
    folder = folder_of_other_files("other-1")
    try:
        pretokenize_into(folder)
    finally:
        _kept(folder)


@probe("data loss", r"does not hold pre-tokenized data.*Nothing was deleted")
def pretokenize_overwrite_of_a_folder_of_other_files():
    folder = folder_of_other_files("other-2")
    try:
        pretokenize_into(folder, overwrite=True)
    finally:
        _kept(folder)


@probe("data loss", r"does not hold a memory bank.*Nothing was deleted")
def memory_bank_overwrite_of_a_folder_of_other_files():
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.pretrained import CLIP_PATH

    folder = folder_of_other_files("other-3")
    try:
        Cm3LeonMemoryBank.build(small_pairs(), SentenceTransformer(str(CLIP_PATH)), folder, text_column="caption",
                                image_column="images", overwrite=True, show_progress_bar=False)
    finally:
        _kept(folder)


def pretokenized_copy(name: str) -> Path:
    source = workdir() / "pretokenized"
    if not source.exists():
        pretokenize_into(source)
    target = workdir() / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


@probe("corrupt files", r"damaged: data/.* differs")
def pretokenized_data_with_a_flipped_byte():
    from cm3leon_hf.pretokenized import load_pretokenized

    folder = pretokenized_copy("pretok-flip")
    path = next((folder / "data").glob("*.arrow"))
    content = bytearray(path.read_bytes())
    content[-200] ^= 1
    path.write_bytes(bytes(content))
    load_pretokenized(folder)


@probe("corrupt files", r"damaged: data/.* has \d+ bytes")
def pretokenized_data_truncated():
    from cm3leon_hf.pretokenized import load_pretokenized

    folder = pretokenized_copy("pretok-cut")
    path = next((folder / "data").glob("*.arrow"))
    path.write_bytes(path.read_bytes()[:100])
    load_pretokenized(folder)


def tiny_copy(name: str) -> Path:
    from cm3leon_hf.pretrained import TINY_PATH

    target = workdir() / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(TINY_PATH, target, ignore=shutil.ignore_patterns("memory_bank"))
    return target


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@probe("corrupt files", r"model\.safetensors has \d+ bytes.*save or download it again")
def truncated_model_weights():
    from cm3leon_hf import Cm3LeonForCausalLM

    folder = tiny_copy("cut-weights")
    _cut(folder / "model.safetensors")
    Cm3LeonForCausalLM.from_pretrained(folder)


@probe("corrupt files", r"tokenizer\.json is not valid JSON")
def truncated_tokenizer_json():
    from cm3leon_hf import Cm3LeonProcessor

    folder = tiny_copy("cut-tokenizer")
    _cut(folder / "tokenizer.json")
    Cm3LeonProcessor.from_pretrained(folder)


@probe("corrupt files", r"generation_config\.json is not valid JSON")
def truncated_generation_config():
    from cm3leon_hf import Cm3LeonForCausalLM

    folder = tiny_copy("cut-generation")
    _cut(folder / "generation_config.json")
    Cm3LeonForCausalLM.from_pretrained(folder)


@probe("corrupt files", r"holds no image tokenizer")
def missing_image_tokenizer_folder():
    from cm3leon_hf import Cm3LeonProcessor

    folder = tiny_copy("no-vq")
    shutil.rmtree(folder / "image_tokenizer")
    Cm3LeonProcessor.from_pretrained(folder)


@probe("corrupt files", r"no such folder")
def from_pretrained_of_a_missing_local_folder():
    from cm3leon_hf import Cm3LeonForCausalLM

    Cm3LeonForCausalLM.from_pretrained(workdir() / "no-such-model")


@probe("model", r"attention mask of `input_ids` has shape \(1, 9\)")
def unguided_mask_longer_than_ids():
    model().generate(torch.tensor([[1, 5, 6, 7]]), attention_mask=torch.ones(1, 9, dtype=torch.long),
                     do_sample=False, max_new_tokens=2, image_token_constraint=False)


@probe("model", r"it needs \(batch_size, length\)")
def unguided_one_dimensional_ids():
    model().generate(torch.tensor([1, 5, 6]), do_sample=False, max_new_tokens=2)


@probe("model", r"prompt is empty")
def unguided_empty_prompt():
    model().generate(torch.zeros(1, 0, dtype=torch.long), do_sample=False, max_new_tokens=2)


@probe("model", r"logits_vocab_range")
def logits_vocab_range_reversed():
    model()(torch.tensor([[1, 5]]), logits_vocab_range=(5, 2))


@probe("model", r"top_p.*\(0, 1\]")
def top_p_above_one():
    model().generate(prompt_ids(), do_sample=True, top_p=1.5, max_new_tokens=2)


@probe("model", r"top_p of the generation config.*\(0, 1\]")
def saved_top_p_of_seven():
    config = model().generation_config
    saved, config.top_p = config.top_p, 7
    try:
        model().generate(prompt_ids(), do_sample=True, max_new_tokens=2)
    finally:
        config.top_p = saved


def collate(feature, **kwargs):
    from cm3leon_hf.data_collator import Cm3LeonDataCollator

    layout = processor().layout
    documents = [{"input_ids": layout.document([100], list(range(layout.image_token_offset,
                                                                layout.image_token_offset + layout.image_seq_length)))}]
    collator = Cm3LeonDataCollator(model().config, documents=documents, **kwargs)
    return collator([feature] if feature is not None else [])


@probe("collator", r"outside the vocabulary")
def collator_id_outside_the_vocabulary():
    collate({"input_ids": [1, 99999]})


@probe("collator", r"is empty")
def collator_empty_input_ids():
    collate({"input_ids": []})


@probe("collator", r"retrieved_indices.*not a row")
def collator_retrieved_index_minus_one():
    collate({"input_ids": [300], "retrieved_indices": [-1]})


@probe("collator", r"retrieved_indices.*not a row")
def collator_retrieved_index_past_the_documents():
    collate({"input_ids": [300], "retrieved_indices": [5]})


@probe("collator", r"max_length.*positions")
def collator_max_length_past_the_positions():
    collate({"input_ids": [300]}, max_length=5000)


@probe("collator", r"pad_to_multiple_of")
def collator_negative_pad_multiple():
    collate({"input_ids": [300]}, pad_to_multiple_of=-8)


@probe("collator", r"batch is empty")
def collator_empty_batch():
    collate(None)


@probe("pre-tokenization", r"max_length \(0\) leaves no room")
def pretokenize_max_length_zero():
    pretokenize_into(workdir() / "pt-0", max_length=0)


@probe("pre-tokenization", r"kept no example.*max_length=10")
def pretokenize_max_length_ten():
    pretokenize_into(workdir() / "pt-10", max_length=10)


@probe("pre-tokenization", r"kept no example.*no text in 'images'")
def pretokenize_text_column_of_images():
    pretokenize_into(workdir() / "pt-img", text_column="images")


@probe("commands", r"max_steps must be a positive")
def pretrain_max_steps_zero():
    pretrain("--max_steps", "0")


@probe("commands", r"learning_rate must be a finite")
def pretrain_learning_rate_inf():
    pretrain("--learning_rate", "inf")


# ------------------------------------------------------------------------------------ issue 28, items 7 to 9

@probe("cli", r"num-candidates \(1\) must be at least -n")
def demo_with_fewer_candidates_than_images():
    command("-m", "cm3leon_hf.cli", "demo", "-n", "2", "--num-candidates", "1", "-o", "d.png")


@probe("cli", r"re-ranking generates all .* at most 1024")
def a_million_reranked_images():
    command("-m", "cm3leon_hf.cli", "generate", "a red star", "-n", "1000000", "--rerank", "-o", "x.png")


@probe("cli", r"--seed must be at least 0 and at most")
def a_seed_beyond_torch():
    command("-m", "cm3leon_hf.cli", "generate", "a red star", "--seed", str(2**70), "-o", "x.png")


@probe("cli", r"not UTF-8 text: the byte 0xff")
def a_prompt_that_is_not_utf8():
    from cm3leon_hf.cli import main

    main(["generate", b"a red \xff star".decode("utf-8", errors="surrogateescape"), "-o", str(workdir() / "u.png"),
          "-q"])


@probe("processor", r"`text` must be a string.*got NoneType")
def processor_of_none():
    processor()(None)


@probe("processor", r"`text` must be a string.*got int")
def processor_of_a_number():
    processor()(5)


@probe("processor", r"batch_size.*positive integer, got 0")
def image_tokenizer_batch_size_zero():
    from PIL import Image

    processor().image_tokenizer.encode([Image.new("RGB", (64, 64))], batch_size=0)


@probe("model", r"labels contains the id .*neither -100")
def labels_outside_the_vocabulary():
    model()(input_ids=prompt_ids(), labels=torch.full_like(prompt_ids(), 10**6))


@probe("model", r"inputs_embeds must have shape .*hidden_size=")
def inputs_embeds_of_another_width():
    model()(inputs_embeds=torch.randn(1, 3, 7))


@probe("config", r"`image_token_offset` must be an integer, got 256.0")
def a_float_image_token_offset():
    config_with(image_token_offset=256.0)


@probe("pipelines", r"`reranker` must be a sentence-transformers CLIP model")
def a_reranker_without_encode():
    from transformers import pipeline

    import cm3leon_hf.pipelines  # noqa: F401
    from cm3leon_hf.pretrained import TINY_PATH

    pipeline("text-to-image", model=str(TINY_PATH))("a red star", reranker=object(), num_candidates=2,
                                                    progress_bar=False)


@probe("pipelines", r"only the `\{prompt\}` field, got \['foo'\]")
def an_edit_template_with_an_unknown_field():
    from PIL import Image
    from transformers import pipeline

    import cm3leon_hf.pipelines  # noqa: F401
    from cm3leon_hf.pretrained import TINY_PATH

    pipe = pipeline("image-text-to-image", model=str(TINY_PATH))
    pipe(Image.new("RGB", (64, 64)), prompt="make the star red", template="{foo} {prompt} <image>", progress_bar=False)


def _retriever(**kwargs):
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.pretrained import CLIP_PATH
    from cm3leon_hf.retriever import Cm3LeonRetriever

    return Cm3LeonRetriever(Cm3LeonMemoryBank.load(bank_copy("bank-retriever")), SentenceTransformer(str(CLIP_PATH)),
                            **kwargs)


@probe("memory bank", r"`batch_size` must be a positive integer, got 0")
def retriever_batch_size_zero():
    _retriever(batch_size=0)


@probe("memory bank", r"`k` must be a positive integer, got 2.5")
def retrieve_a_fractional_k():
    _retriever().retrieve(["a red star"], k=2.5)


@probe("guidance", r"cannot use `inputs_embeds`")
def guided_decoding_with_embeddings():
    ids = prompt_ids()
    model().generate(input_ids=ids, inputs_embeds=model().get_input_embeddings()(ids), guidance_scale=3.0,
                     max_new_tokens=4)


@probe("guidance", None)
def embeddings_with_their_ids_decode_as_the_ids():
    ids = prompt_ids()
    embeds = model().get_input_embeddings()(ids).detach()
    runs = [model().generate(max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(0),
                             guidance_scale=1.0, **inputs)[0, -6:]
            for inputs in ({"input_ids": ids}, {"input_ids": ids, "inputs_embeds": embeds})]
    if not torch.equal(*runs):
        raise Silent(f"ids {runs[0].tolist()} but ids + their embeddings {runs[1].tolist()}")


# ------------------------------------------------------------------------------------------------ runner

def classify(expect: str | None, fn, seconds: int) -> tuple[str, str]:
    try:
        with time_limit(seconds):
            fn()
    except Hang as error:
        return "hang", str(error)
    except Silent as error:
        return "silent", str(error)
    except SystemExit as error:  # argparse inside a called main()
        return ("clear", f"usage error {error}") if expect else ("unclear", f"SystemExit {error}")
    except (ValueError, TypeError, OSError) as error:
        message = f"{type(error).__name__}: {error}".replace("\n", " ")
        if expect and re.search(expect, str(error), re.I):
            return "clear", message[:200]
        return "unclear", message[:200]
    except Exception as error:  # noqa: BLE001 - a crash of any kind is what this counts
        return "unclear", f"{type(error).__name__}: {error}".replace("\n", " ")[:200]
    if expect:
        return "silent", "accepted without an error"
    return "clear", "holds"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="print every probe's outcome")
    parser.add_argument("--only", help="run the probes whose name matches this regex")
    parser.add_argument("--time-limit", type=int, default=180, help="seconds before a probe counts as a hang")
    parser.add_argument("--output", type=Path, help="write every outcome as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    outcomes = []
    try:
        for area, name, expect, fn in PROBES:
            if args.only and not re.search(args.only, name):
                continue
            outcome, detail = classify(expect, fn, args.time_limit)
            outcomes.append({"area": area, "probe": name, "outcome": outcome, "detail": detail})
            if args.verbose or outcome != "clear":
                print(f"{outcome:8s} {area:12s} {name}: {detail}", flush=True)
    finally:
        shutil.rmtree(_cache.get("dir", "/nonexistent"), ignore_errors=True)
    counts = Counter(o["outcome"] for o in outcomes)
    total = len(outcomes)
    print(f"\n| probes | clear errors (or holds) | unclear crashes | silent | hangs |")
    print("|---|---|---|---|---|")
    print(f"| {total} | " + " | ".join(f"{counts[k]} ({counts[k] / max(total, 1):.0%})"
                                      for k in ("clear", "unclear", "silent", "hang")) + " |")
    areas = sorted({o["area"] for o in outcomes})
    print("\n| area | probes | clear | unclear | silent | hang |\n|---|---|---|---|---|---|")
    for area in areas:
        c = Counter(o["outcome"] for o in outcomes if o["area"] == area)
        print(f"| {area} | {sum(c.values())} | {c['clear']} | {c['unclear']} | {c['silent']} | {c['hang']} |")
    if args.output:
        args.output.write_text(json.dumps(outcomes, indent=1) + "\n")
    return outcomes


if __name__ == "__main__":
    main()
