"""Quality of the shipped tiny VQ on held-out synthetic images (the `test` split, never seen in training): PSNR of
reconstructions, the exact evaluator reading the same scene back from them, and codebook usage; and on pictures users
draw in the world's palette (free-form drawings from a seed no training run draws, and the three user drawings).

The shipped VQ trades a little of its reading of the world's scenes for the free-form drawings (bench/RESULTS.md,
"Image tokenizer for what users draw"): before it, 98.25% of these scenes read back and the free-form drawings came
back at 23.2 dB; now 94.75% and 31.9 dB. Its decoder was then fine-tuned alone (codes unchanged: the bundled models
stay valid) on more drawings that nearly fill the frame, which brought the 56-px square from 21.9 to 29.3 dB. The
bounds below are the measured figures minus a margin."""

import numpy as np
import pytest
import torch

from cm3leon_hf.image_tokenizer_evaluation import psnr
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor
from cm3leon_hf.synthetic import TASKS, Scene, make_row, score


@pytest.fixture(scope="module")
def image_tokenizer():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH).image_tokenizer


@pytest.fixture(scope="module")
def scenes_and_reconstructions(image_tokenizer):
    rows = [make_row("text_to_image", "test", i) for i in range(400)]
    images = [r["images"][0] for r in rows]
    reconstructions = image_tokenizer.decode(image_tokenizer.encode(images))
    return rows, images, reconstructions


def test_reconstruction_psnr_is_at_least_28_db(scenes_and_reconstructions):
    _, images, reconstructions = scenes_and_reconstructions
    values = [psnr(a, b) for a, b in zip(images, reconstructions)]
    assert np.mean(values) >= 28.0, np.mean(values)


@pytest.fixture(scope="module")
def evaluator_scores(scenes_and_reconstructions):
    """The exact evaluator's `score` of each original and each reconstruction against its scene, computed once."""
    rows, images, reconstructions = scenes_and_reconstructions
    scenes = [Scene.from_json(r["scene"]) for r in rows]
    return [score(im, sc) for im, sc in zip(images, scenes)], [score(im, sc) for im, sc in zip(reconstructions, scenes)]


def mean_of(scores, field: str) -> float:
    return float(np.mean([s[field] for s in scores]))


def test_evaluator_reads_the_same_scene_from_93_percent_of_reconstructions(evaluator_scores):
    originals, reconstructed = evaluator_scores
    assert mean_of(originals, "scene_correct") == 1.0  # the evaluator itself is exact on the originals
    assert mean_of(reconstructed, "scene_correct") >= 0.93  # measured 94.75% (379 of 400; 94.5% before the decoder fine-tune)


def test_evaluator_accuracy_on_reconstructions_does_not_regress(evaluator_scores):
    # Per attribute, the level the shipped VQ reaches on these 400 scenes (shape 97.8%, colour 99.5%, size 98.4%,
    # position 99.7%), minus a margin: a retrained or re-exported VQ that reads worse fails here even where the scene
    # figure above still passes. What it misses most is the shape of the smallest objects in three-object scenes.
    originals, reconstructed = evaluator_scores
    assert mean_of(originals, "scene_correct") == 1.0
    assert mean_of(reconstructed, "shape") >= 0.97
    assert mean_of(reconstructed, "color") >= 0.99
    assert mean_of(reconstructed, "size") >= 0.975
    assert mean_of(reconstructed, "position") >= 0.995


def test_half_of_the_codebook_is_used(image_tokenizer):
    images = [im for task in TASKS for i in range(60) for im in make_row(task, "test", i)["images"]]
    codes = image_tokenizer.encode(images)
    used = torch.unique(codes).numel() / image_tokenizer.codebook_size
    assert used >= 0.5, used


def test_free_form_drawings_come_back_at_30_db(image_tokenizer):
    """Shapes of any kind, size, aspect and place, overlapping, in the world's palette (measured: 31.9 dB mean, 61% of
    drawings at 28 dB or more; the VQ before the free-form runs: 23.2 dB and 23%)."""
    from cm3leon_hf.synthetic.freeform import drawing_image

    drawings = [drawing_image(i, image_tokenizer.resolution, seed=2_000_003) for i in range(200)]
    values = np.array([psnr(a, b) for a, b in zip(drawings, image_tokenizer.decode(image_tokenizer.encode(drawings)))])
    assert values.mean() >= 30.0, values.mean()
    assert (values >= 28).mean() >= 0.5, (values >= 28).mean()


def test_user_drawings_come_back(image_tokenizer):
    """The issue's three drawings, all above 28 dB: the red ellipse 33.9 dB and the thin blue bar 33.9 dB (they were
    at 24.9 and 21.8, the bar turned purple), the 56-px square with 4-px margins 29.3 dB (10.4 at first, a smeared
    blob; 21.9 before the decoder-only fine-tune, its margins lavender; bench/RESULTS.md)."""
    from cm3leon_hf.synthetic.freeform import user_drawings

    drawings = user_drawings(image_tokenizer.resolution)
    back = dict(zip(drawings, image_tokenizer.decode(image_tokenizer.encode(list(drawings.values())))))
    values = {name: psnr(drawings[name], back[name]) for name in drawings}
    assert values["red ellipse"] >= 30.0 and values["thin blue bar"] >= 30.0, values
    assert values["purple square"] >= 28.0, values
    # The bar keeps its colour: the mean of its pixels stays blue (it turned purple before).
    bar = np.asarray(drawings["thin blue bar"]).reshape(-1, 3)
    inside = (bar != 255).any(axis=1)
    red, green, blue = np.asarray(back["thin blue bar"]).reshape(-1, 3)[inside].mean(axis=0)
    assert blue > 200 and red < 100, (red, green, blue)
