"""Caption parser and evaluator: round trips, rejections, robustness, scores."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from cm3leon_hf.synthetic import captions as C
from cm3leon_hf.synthetic.drawing import render, render_array
from cm3leon_hf.synthetic.evaluator import read_scene, score, score_many
from cm3leon_hf.synthetic.parsing import answer_question, apply_instruction, parse_caption, parse_instruction
from cm3leon_hf.synthetic.scene import Relation, Scene, SceneObject, sample_scene

# ------------------------------------------------------------------------------------------------ parser

SHORT_FORMS = {
    "objects first": re.compile(r"^an? .* on an? \w+ background$"),
    "background first": re.compile(r"^an? \w+ background with "),
    "count": re.compile(r"^\w+ (shape|object)s? on an? \w+ background: "),
    "fronted background": re.compile(r"^on an? \w+ background, "),
    "relation": re.compile(r", (to the left of|left of|to the right of|right of|above|below|under) .*, on an? \w+ background$"),
}


def test_every_caption_template_round_trips():
    seen_short, seen_long, seen_positions = set(), set(), set()
    for i in range(3000):
        rng = np.random.default_rng(i)
        scene = sample_scene(rng)
        short, long = C.caption(scene, rng), C.long_caption(scene, rng)
        assert parse_caption(short).key() == scene.key(), short
        assert parse_caption(long).key() == scene.key(), long
        seen_short |= {name for name, form in SHORT_FORMS.items() if form.search(short)}
        seen_long.add(long.split(" ")[0])
        seen_positions |= {p for phrases in C.POSITION_PHRASES.values() for p in phrases if p in short}
    assert seen_short == set(SHORT_FORMS)
    assert seen_long == {"The", "There"}
    assert seen_positions == {p for phrases in C.POSITION_PHRASES.values() for p in phrases}


def test_relations_in_captions_are_parsed_and_true():
    scene = Scene("white", (SceneObject("star", "red", "small", "top left"), SceneObject("circle", "blue", "large", "bottom left")))
    parsed = parse_caption("a small red star at the top left, above a large blue circle at the bottom left, on a white background")
    assert parsed.relations == (Relation(0, "above", 1),)
    assert parsed.key() == scene.key()


def test_free_text_parses_to_a_partial_scene():
    s = parse_caption("a red star")
    assert [(o.shape, o.color, o.size, o.position) for o in s.objects] == [("star", "red", None, None)]
    assert s.background is None
    assert [o.shape for o in parse_caption("two red stars on a black background").objects] == ["star", "star"]
    assert len(parse_caption("three objects").objects) == 3
    assert parse_caption("a red star left of a blue circle").relations == (Relation(0, "left of", 1),)
    assert parse_caption("A Small RED Star in the top left corner.").objects[0] == SceneObject("star", "red", "small", "top left", None)
    assert parse_caption("a red star in the centre").objects[0].position == "center"  # British spelling


@pytest.mark.parametrize(
    "text, message",
    [
        ("a red star on a plaid background", "unknown word 'plaid'"),
        ("a red dragon", "names no shape"),
        ("a star blue", "colour 'blue' does not describe an object"),
        ("a white star", "'white' is a background colour"),
        ("two shapes on a white background: a red star", "it says 2 objects but describes 1"),
        ("a red star at the top left and a blue circle at the top left", "objects 0 and 1 are both at 'top left'"),
        ("a red star at the top left, below a blue circle at the bottom right", "is not below"),
        ("nine red stars and a blue circle", "10 objects but the grid has 9 cells"),
        ("two red stars at the top left", "2 objects cannot share one place"),
        ("a red star <break> <image>", "document with <break>/<image> markers"),
        ("a red star and a blue circle on a white background on a black background", "several backgrounds"),
        ("at the top left", "not attached to an object"),
        ("", "neither objects nor a background"),
    ],
)
def test_unreadable_or_impossible_captions_are_rejected(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_caption(text)


def test_non_string_caption_is_rejected():
    with pytest.raises(ValueError, match="expects a str"):
        parse_caption(None)


def test_instructions_parse_and_apply():
    scene = Scene("white", (SceneObject("star", "red", "small", "top left"), SceneObject("circle", "blue", "large", "center")))
    assert apply_instruction(scene, "make the star green").objects[0].color == "green"
    assert apply_instruction(scene, "change the colour of the blue circle to pink").objects[1].color == "pink"
    moved = apply_instruction(scene, "move the object at the top left to the bottom right")
    assert moved.objects[0].position == "bottom right"
    assert [o.shape for o in apply_instruction(scene, "take away the red star").objects] == ["circle"]
    added = apply_instruction(scene, "add a medium brown cross on the left")
    assert added.objects[-1] == SceneObject("cross", "brown", "medium", "left", (0.5, 0.5))
    for bad, message in [
        ("make the square green", "matches 0 objects"),
        ("move the star to the center", "are both at 'center'"),
        ("add a red star", "needs a size, colour, shape and position"),
        ("sing the star", "must start with one of"),
        ("make the star", "needs exactly one new colour"),
        ("move the star", "needs one destination"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            apply_instruction(scene, bad)
    with pytest.raises(ValueError, match="matches 2 objects"):
        apply_instruction(Scene("white", (SceneObject("star", "red", "small", "top"), SceneObject("star", "red", "large", "left"))), "remove the red star")
    assert parse_instruction("delete the star").op == "remove"


def test_questions_are_answered_from_the_scene():
    scene = Scene("black", (SceneObject("star", "red", "small", "top left"), SceneObject("circle", "red", "large", "bottom right")))
    assert answer_question(scene, "what colour is the background?") == "black"
    assert answer_question(scene, "what shape is the large object?") == "circle"
    assert answer_question(scene, "where is the star?") == "top left"
    assert answer_question(scene, "how many red objects are there?") == "two"
    assert answer_question(scene, "how many crosses are there?") == "zero"
    assert answer_question(scene, "is the star above the circle?") == "yes"
    assert answer_question(scene, "is the star to the right of the circle?") == "no"
    assert answer_question(scene, "is there a blue circle?") == "no"
    with pytest.raises(ValueError, match="matches 2 objects"):
        answer_question(scene, "where is the red object?")
    with pytest.raises(ValueError, match="cannot parse question"):
        answer_question(scene, "why is the star?")


def test_caption_vocabulary_covers_every_generated_text():
    vocab = set(C.vocabulary())
    for i in range(500):
        rng = np.random.default_rng(i)
        scene = sample_scene(rng)
        texts = [C.caption(scene, rng), C.long_caption(scene, rng), *C.make_question(scene, rng)]
        for text in texts:
            assert set(re.findall(r"[a-z]+", text.lower())) <= vocab, text


# --------------------------------------------------------------------------------------------- evaluator


def _jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_evaluator_under_gaussian_noise_and_jpeg():
    n, noisy, jpeg = 2000, 0, 0
    for i in range(n):
        rng = np.random.default_rng([42, i])
        scene = sample_scene(rng, heldout=bool(i % 2))
        image = render_array(scene, 64)
        noise = rng.normal(0.0, 8.0, image.shape)  # σ = 8/255 on the 0–1 scale
        noisy += read_scene(np.clip(image + noise, 0, 255).round().astype(np.uint8)).key() == scene.key()
        jpeg += read_scene(_jpeg(image)).key() == scene.key()
    assert noisy / n >= 0.98 and jpeg / n >= 0.98
    assert noisy == n  # measured: noise at σ = 8/255 never changes a reading


def test_blank_and_noise_images_report_no_object():
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert read_scene(blank) == Scene("white", ())
    result = score(blank, "a red star on a white background")
    assert result["status"] == "no object found" and result["objects_found"] == 0 and not result["scene_correct"]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert read_scene(noise) == Scene(None, ())
    assert score(noise, "a red star")["status"] == "no background found"
    # heavy noise on a white background: a background, but nothing that is an object
    speckled = np.clip(255 - np.abs(rng.normal(0, 40, (64, 64, 3))), 0, 255).astype(np.uint8)
    assert read_scene(speckled).objects == ()


@pytest.mark.parametrize(
    "image, message",
    [
        (Image.new("L", (64, 64)), "expected an RGB image, got mode 'L'"),
        (Image.new("RGBA", (64, 64)), "got mode 'RGBA'"),
        (Image.new("RGB", (64, 48)), "expected a square image, got 64x48"),
        (Image.new("RGB", (32, 32)), "below the minimum resolution 64"),
        (np.zeros((64, 64, 3), dtype=np.float32), "expected a uint8 array"),
        (np.zeros((64, 64), dtype=np.uint8), "expected a uint8 array"),
        ([[0, 0, 0]], "expected a PIL RGB image or a uint8"),
    ],
)
def test_bad_images_are_clear_errors(image, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        read_scene(image)


def test_score_reports_per_attribute_accuracy():
    target = Scene("white", (SceneObject("star", "red", "small", "top left"), SceneObject("circle", "blue", "large", "center")))
    wrong_colour = Scene("white", (SceneObject("star", "red", "small", "top left"), SceneObject("circle", "green", "large", "center")))
    r = score(render(wrong_colour), target)
    assert (r["shape"], r["color"], r["size"], r["position"], r["background"], r["count"]) == (1.0, 0.5, 1.0, 1.0, 1.0, 1.0)
    assert r["scene_correct"] is False and r["status"] == "ok" and r["relations"] is None and r["box_iou"] is None
    missing = Scene("black", target.objects[:1])
    r = score(render(missing), target)
    assert (r["count"], r["background"], r["shape"], r["objects_found"]) == (0.0, 0.0, 0.5, 1)
    # a caption states only some attributes; the others are not scored
    r = score(render(target), "a star left of a circle")
    assert r["scene_correct"] and r["size"] is None and r["position"] is None and r["relations"] == 1.0
    r = score(render(target), "a star right of a circle")
    assert not r["scene_correct"] and r["relations"] == 0.0
    with pytest.raises(ValueError, match="target must be a Scene or a caption"):
        score(render(target), 3)


def test_score_many_averages():
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(10)]
    images = [render(s) for s in scenes]
    targets = scenes[:5] + [Scene(s.background, s.objects[:-1] + (SceneObject("cross", "pink", "large", None),)) for s in scenes[5:]]
    result = score_many(images, targets)
    assert result["n"] == 10 and result["scene_correct"] == 0.5 and result["count"] == 1.0
    with pytest.raises(ValueError, match="got 2 images but 1 targets"):
        score_many(images[:2], targets[:1])
