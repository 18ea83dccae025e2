"""Golden outputs: what the package produced at a recorded commit, bit for bit, so that refactors cannot change
behaviour unnoticed. Recorded once (``CM3LEON_RECORD_GOLDEN=1 pytest tests/test_golden_outputs.py``) into
`tests/golden_outputs.json`; every other run compares against that file.

Covered: fixed-seed ids from `generate` with CFG, CD-K and instruct-CFG on the bundled tiny model; the pixels of the
text-to-image pipeline (top-p and pooled + CLIP re-ranking) and the image-text-to-image pipeline; a collator batch;
and the loss curve of 20 pretraining steps of `training/pretrain.py` (the command line, as users run it).

All of it runs on one torch thread (tests/conftest.py), as recorded: another thread count may change float sums, and
so sampled ids.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.data_collator import Cm3LeonDataCollator
from cm3leon_hf.pretrained import CLIP_PATH, TINY_PATH
from cm3leon_hf.synthetic import build_task
from conftest import REPO

GOLDEN = REPO / "tests" / "golden_outputs.json"
RECORD = os.environ.get("CM3LEON_RECORD_GOLDEN") == "1"
PROMPT = "a large red circle at the top left on a white background"


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def golden():
    recorded = {} if RECORD else json.loads(GOLDEN.read_text())
    yield recorded
    if RECORD:
        previous = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**previous, **recorded}, indent=1, sort_keys=True) + "\n")


def check(golden, name, value):
    if RECORD:
        golden[name] = value
    else:
        assert value == golden[name], f"{name} changed"


@pytest.fixture(scope="module")
def model():
    return Cm3LeonForCausalLM.from_pretrained(TINY_PATH).eval()


@pytest.fixture(scope="module")
def processor():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH)


def new_ids(model, prompt_ids, **kwargs) -> list[list[int]]:
    out = model.generate(prompt_ids, do_sample=True, top_p=0.8, top_k=0, num_return_sequences=2,
                         generator=torch.Generator().manual_seed(7), **kwargs)
    return out[:, prompt_ids.shape[1]:].tolist()


def test_generate_ids(golden, model, processor):
    prompt = processor(f"{PROMPT} <break>", return_tensors="pt")["input_ids"]
    check(golden, "generate/saved-decoding", new_ids(model, prompt))
    check(golden, "generate/cfg-2", new_ids(model, prompt, guidance_scale=2.0))
    check(golden, "generate/cd-k", new_ids(model, prompt, contrastive_k=5))
    source = build_task("text_to_image", num_train=1, num_validation=0, num_test=0, num_heldout=0)["train"][0]
    template = "Edit the image following the text instruction <break> <image> <break> {} <break>"
    full = processor(template.format("make the circle blue"), images=source["images"], return_tensors="pt")
    image_only = processor(template.format("<mask:0>"), images=source["images"], return_tensors="pt")
    check(golden, "generate/instruct-cfg", new_ids(model, full["input_ids"], guidance_scale=7.5, image_guidance_scale=1.5,
                                                  image_cond_input_ids=image_only["input_ids"]))


def test_pipeline_images(golden, model, processor):
    from sentence_transformers import SentenceTransformer
    from transformers import pipeline

    pipe = pipeline("text-to-image", model=model, processor=processor)
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    images = pipe(PROMPT, num_images_per_prompt=2, generator=seed(), progress_bar=False)
    check(golden, "pipeline/text-to-image", [digest(r["image"]) for r in images])
    reranker = SentenceTransformer(str(CLIP_PATH))
    images = pipe(PROMPT, decoding="pooled", num_candidates=4, num_images_per_prompt=2, reranker=reranker,
                  generator=seed(), progress_bar=False)
    check(golden, "pipeline/text-to-image-pooled", [[digest(r["image"]), round(r["score"], 6)] for r in images])
    edit = pipeline("image-text-to-image", model=model, processor=processor)
    source = build_task("text_to_image", num_train=1, num_validation=0, num_test=0, num_heldout=0)["train"][0]
    images = edit(source["images"][0], prompt="make the circle blue", generator=seed(), progress_bar=False)
    check(golden, "pipeline/image-text-to-image", [digest(r["image"]) for r in images])


def test_collator_batch(golden, processor):
    rng = np.random.default_rng(0)
    layout = processor.layout
    documents = []
    for _ in range(12):
        text = rng.integers(100, 1000, int(rng.integers(1, 12))).tolist()
        image = (layout.image_token_offset + rng.integers(0, layout.image_vocab_size, layout.image_seq_length)).tolist()
        documents.append({"input_ids": layout.document(text, image)})
    features = [{"input_ids": documents[i]["input_ids"], "source_index": i,
                 "retrieved_indices": [(i + 1) % 12, (i + 5) % 12, (i + 7) % 12]} for i in range(8)]
    batch = Cm3LeonDataCollator(layout, documents=documents, max_length=256, seed=11)(features)
    check(golden, "collator", {name: batch[name].tolist() for name in ("input_ids", "attention_mask", "labels")})


def test_pretraining_loss_curve(golden, processor, tmp_path):
    from cm3leon_hf import pretokenized as pretokenize
    pairs = build_task("text_to_image", num_train=96, num_validation=0, num_test=0, num_heldout=0, seed=2)["train"]
    pretokenize.pretokenize(pairs, processor, tmp_path / "train", text_column="caption", image_column="images",
                            show_progress_bar=False)
    command = [sys.executable, str(REPO / "training" / "pretrain.py"), "--config",
               str(REPO / "training" / "recipes" / "pretrain_tiny.yaml"), "--train_data", str(tmp_path / "train"),
               "--eval_data", "", "--output_dir", str(tmp_path / "run"), "--max_steps", "20", "--warmup_steps", "5",
               "--per_device_train_batch_size", "4", "--num_retrieved_docs", "0", "--logging_steps", "1",
               "--save_steps", "20", "--eval_strategy", "no", "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, cwd=tmp_path, env=env, capture_output=True)
    state = json.loads((tmp_path / "run" / "checkpoint-20" / "trainer_state.json").read_text())
    check(golden, "pretrain/loss-curve", [entry["loss"] for entry in state["log_history"] if "loss" in entry])
