"""The bundled tiny model (`cm3leon_hf.pretrained.TINY_PATH`), as a user meets it: offline through the Auto classes and
the pipeline, with its decoding defaults and memory bank, as remote code where the package is absent; and drawing what
unseen prompts describe, read back by the world's exact evaluator."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.pretrained import CLIP_PATH, TINY_PATH
from cm3leon_hf.synthetic import Scene, make_row, score


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY_PATH)


@pytest.fixture(scope="module")
def text_to_image():
    return pipeline("text-to-image", model=str(TINY_PATH))


def test_loads_offline_through_the_auto_classes(model):
    assert type(model) is Cm3LeonForCausalLM
    processor = AutoProcessor.from_pretrained(TINY_PATH)
    assert type(processor) is Cm3LeonProcessor
    processor.validate_model_config(model.config)
    # CFG on by default (the scale chosen on validation prompts), with the paper's demo top-p: what every image the
    # model writes uses unless a call says otherwise.
    assert model.generation_config.guidance_scale == 1.25 and model.generation_config.top_p == 0.8
    assert model.generation_config.do_sample
    # The card names the data and the recipe; no code copies in the package; no pickle.
    card = (TINY_PATH / "README.md").read_text()
    assert "60,000 text-to-image pairs" in card and "training/recipes/tiny_model.yaml" in card
    # Named after the bundle, not after the training checkpoint it was copied from.
    assert "\n# cm3leon-tiny\n" in card and "checkpoint-" not in card
    assert not list(TINY_PATH.glob("*.py"))
    assert not [p for p in TINY_PATH.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]


def test_bundled_memory_bank_serves_retrieval():
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.retriever import Cm3LeonRetriever

    bank = Cm3LeonMemoryBank.load(TINY_PATH / "memory_bank")
    assert len(bank) == 3000
    retriever = Cm3LeonRetriever(bank, SentenceTransformer(str(CLIP_PATH)), query_dropout=0.0)
    prompt = "a large red circle at the top left on a white background"
    docs = retriever.retrieve(texts=[prompt], k=2)[0]
    assert len(docs) == 2
    # The world's CLIP finds documents about the prompt: red circles, the exact scene excluded only above 0.9.
    assert all("circle" in d.text or "red" in d.text for d in docs), [d.text for d in docs]


def one_object_prompts(count: int) -> tuple[list[str], list[Scene]]:
    """One-object captions of the `test` split: prompts the model never trained on."""
    prompts, scenes = [], []
    i = 0
    while len(prompts) < count:
        row = make_row("text_to_image", "test", i)
        scene = Scene.from_json(row["scene"])
        if len(scene.objects) == 1:
            prompts.append(row["caption"])
            scenes.append(scene)
        i += 1
    return prompts, scenes


def _shares(images, scenes) -> dict[str, float]:
    scores = [score(image, scene) for image, scene in zip(images, scenes)]
    return {field: float(np.mean([s[field] for s in scores]))
            for field in ("scene_correct", "count", "position", "color", "shape", "size", "background")}


def test_unseen_prompts_give_the_scenes_they_describe(text_to_image):
    """The main job: 24 one-object prompts of the test split, one image each, with the saved decoding defaults (CFG
    1.25, top-p 0.8), seeds 0, 1 and 2 (one seed moves the share by ±0.12). Measured on the shipped model (8,000
    steps + two 1,800-step continuations, the D2 decoder): the evaluator reads the prompt's whole scene back from 33
    of 72 (seeds: 8, 15, 10; the previous bundle 10, 13, 13); the position and background 72, the count 68, the colour
    62, the shape 48, the size 56. The bounds are those figures minus a margin; they rise with the model."""
    torch.set_num_threads(1)
    prompts, scenes = one_object_prompts(24)
    images = [result[0]["image"] for seed in (0, 1, 2) for result in
              text_to_image(prompts, batch_size=24, generator=torch.Generator().manual_seed(seed), progress_bar=False)]
    share = _shares(images, scenes * 3)
    assert share["scene_correct"] >= 0.38, share
    assert share["position"] >= 0.95 and share["count"] >= 0.9 and share["background"] >= 0.95, share
    assert share["color"] >= 0.8 and share["shape"] >= 0.55 and share["size"] >= 0.7, share


def test_reranked_candidates_give_most_scenes(text_to_image):
    """The paper's best decoding (CL Fig. 4): 8 candidates per prompt, ½ top-p + ½ CD-K, the world's CLIP keeps the
    best. On the same 24 prompts, two seeds, the evaluator finds the whole scene in most images: measured 33 of 48
    (seeds 0 and 1: 14 and 19; the previous bundle 12 and 18), against 23 of 48 with one sample; the colour 48, the
    shape 35, the size 41."""
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    prompts, scenes = one_object_prompts(24)
    reranker = SentenceTransformer(str(CLIP_PATH))
    images = [result[0]["image"] for seed in (0, 1) for result in
              text_to_image(prompts, batch_size=24, decoding="pooled", num_candidates=8, reranker=reranker,
                            generator=torch.Generator().manual_seed(seed), progress_bar=False)]
    share = _shares(images, scenes + scenes)
    assert share["scene_correct"] >= 0.6, share
    assert share["color"] >= 0.9 and share["shape"] >= 0.65 and share["size"] >= 0.78, share


def test_saved_copy_loads_with_remote_code_where_the_package_is_absent(model, tmp_path):
    """`save_pretrained` of the bundled model carries its code; a fresh interpreter that cannot import cm3leon_hf loads
    it with `trust_remote_code=True` and writes the same image ids, greedily, as the package does."""
    processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    inputs = processor(["a small blue star in the center on a black background <break>"], return_tensors="pt")
    expected = model.generate(**inputs, do_sample=False, guidance_scale=3.0)
    save_file({"input_ids": inputs["input_ids"], "expected": expected}, str(tmp_path / "expected.safetensors"))
    blocker = tmp_path / "no_package"
    blocker.mkdir()
    (blocker / "cm3leon_hf.py").write_text("raise ImportError('cm3leon_hf is not installed here')\n")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        ref = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "copy")!r}, trust_remote_code=True)
        out = model.generate(ref["input_ids"], attention_mask=torch.ones_like(ref["input_ids"]), do_sample=False,
                             guidance_scale=3.0)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert torch.equal(out, ref["expected"]), (out, ref["expected"])
        print("same ids", out.shape[1] - ref["input_ids"].shape[1])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": str(blocker)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(model.config.image_seq_length)
