"""training/evaluate_image_tokenizer.py (cm3leon_hf.image_tokenizer_evaluation): the figures it prints are the
evaluator's own, for a saved image tokenizer and for a bare VQModel directory (a training checkpoint's `vq/`) alike."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from cm3leon_hf import image_tokenizer_evaluation as evaluation
from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.synthetic import Scene, make_row, score
from conftest import REPO

SHIPPED = f"{TINY_PATH}/image_tokenizer"


def test_figures_are_the_evaluators_on_the_reconstructions(tmp_path):
    image_tokenizer = Cm3LeonImageTokenizer.from_pretrained(SHIPPED)
    image_tokenizer.vq_model.save_pretrained(tmp_path / "vq")  # what a checkpoint holds: no preprocessing settings
    command = [sys.executable, str(REPO / "training" / "evaluate_image_tokenizer.py"), SHIPPED, str(tmp_path / "vq"),
               "--num_scenes", "40", "--context"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, check=True, env=env, capture_output=True, text=True).stdout
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert results[0] == {**results[1], "path": SHIPPED}  # same weights, same default settings: same figures

    rows = [make_row("text_to_image", "validation", i) for i in range(40)]
    images = [r["images"][0] for r in rows]
    reconstructions = image_tokenizer.decode(image_tokenizer.encode(images))
    scores = [score(im, Scene.from_json(r["scene"])) for im, r in zip(reconstructions, rows)]
    result = results[0]
    assert result["scenes"] == 40 and result["split"] == "validation"
    assert result["scene_correct"] == round(float(np.mean([s["scene_correct"] for s in scores])), 4)
    assert result["shape"] == round(float(np.mean([s["shape"] for s in scores])), 4)
    counts = [len(Scene.from_json(r["scene"]).objects) for r in rows]
    assert {int(k): int(v.split("/")[1]) for k, v in result["by_objects"].items()} == {n: counts.count(n) for n in set(counts)}
    assert sum(int(v.split("/")[0]) for v in result["by_objects"].values()) == sum(s["scene_correct"] for s in scores)
    psnr = np.mean([evaluation.psnr(a, b) for a, b in zip(images, reconstructions)])
    assert abs(result["psnr"] - psnr) < 0.01
    assert result["context"]["objects"] == 3 * counts.count(3)


def test_an_object_is_read_only_with_all_its_attributes():
    scene = Scene.from_json(make_row("text_to_image", "validation", 0)["scene"])
    obj = scene.objects[0]
    assert evaluation.object_read(scene, obj)
    other_color = next(c for c in ("red", "green") if c != obj.color)
    recolored = Scene(scene.background, (type(obj)(obj.shape, other_color, obj.size, obj.position),))
    assert not evaluation.object_read(recolored, obj)
    black, white = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 255, 255))
    assert evaluation.psnr(black, white) == 0.0 and evaluation.psnr(black, black) > 100


def test_freeform_figures_are_the_psnr_of_the_drawings():
    from cm3leon_hf.synthetic.freeform import drawing_image, user_drawings

    image_tokenizer = Cm3LeonImageTokenizer.from_pretrained(SHIPPED)
    result = evaluation.evaluate_freeform(evaluation.load_image_tokenizer(SHIPPED), 10, 100)
    drawings = [drawing_image(i, seed=evaluation.FREEFORM_TEST_SEED) for i in range(10)]
    values = [evaluation.psnr(a, b) for a, b in zip(drawings, image_tokenizer.decode(image_tokenizer.encode(drawings)))]
    assert result["drawings"] == 10 and abs(result["psnr"] - np.mean(values)) < 0.01
    assert result["at_least_28db"] == round(float(np.mean(np.array(values) >= 28)), 4)
    users = user_drawings()
    square = users["purple square"]
    assert abs(result["user_drawings"]["purple square"]
               - evaluation.psnr(square, image_tokenizer.decode(image_tokenizer.encode([square]))[0])) < 0.01
