"""Quality of the shipped tiny VQ on held-out synthetic images (the `test` split, never seen in training): PSNR of
reconstructions, the exact evaluator reading the same scene back from them, and codebook usage."""

import numpy as np
import pytest
import torch

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


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


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


def test_evaluator_reads_the_same_scene_from_98_percent_of_reconstructions(evaluator_scores):
    originals, reconstructed = evaluator_scores
    assert mean_of(originals, "scene_correct") == 1.0  # the evaluator itself is exact on the originals
    assert mean_of(reconstructed, "scene_correct") >= 0.98


def test_evaluator_accuracy_on_reconstructions_does_not_regress(evaluator_scores):
    # Per attribute, the level the shipped VQ reaches on these 400 scenes (scene 98.25%, shape 99.5%, colour 99.6%,
    # size 99.75%, position 99.9%), minus a margin: a retrained or re-exported VQ that reads worse fails here even
    # where the scenes it misses still stay under 2%.
    originals, reconstructed = evaluator_scores
    assert mean_of(originals, "scene_correct") == 1.0
    assert mean_of(reconstructed, "shape") >= 0.99
    assert mean_of(reconstructed, "color") >= 0.99
    assert mean_of(reconstructed, "size") >= 0.99
    assert mean_of(reconstructed, "position") >= 0.995


def test_half_of_the_codebook_is_used(image_tokenizer):
    images = [im for task in TASKS for i in range(60) for im in make_row(task, "test", i)["images"]]
    codes = image_tokenizer.encode(images)
    used = torch.unique(codes).numel() / image_tokenizer.codebook_size
    assert used >= 0.5, used
