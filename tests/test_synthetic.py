"""The synthetic world: vocabulary and geometry, scenes, rendering, bad input, doctests."""

import doctest
import importlib
import itertools

import numpy as np
import pytest
from PIL import Image

from cm3leon_hf.synthetic import drawing as R
from cm3leon_hf.synthetic.scene import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    MIN_RESOLUTION,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    box_from_255,
    box_to_255,
    margin_pixels,
    object_box,
    sample_scene,
    size_pixels,
)

MODULES = ["scene", "drawing", "captions", "parsing", "evaluator", "tasks", "clip", "__init__"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module("cm3leon_hf.synthetic" + ("" if name == "__init__" else f".{name}"))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and (result.attempted > 0 or name == "__init__")


def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def test_vocabulary_sizes_and_palette_separation():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(SIZES) >= 3 and len(POSITIONS) == 9
    palette = {**COLORS, **BACKGROUNDS}
    distances = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(palette.values(), 2)]
    assert min(distances) >= 110
    # every object colour keeps its outline in luma on every background
    assert min(abs(_luma(c) - _luma(b)) for c in COLORS.values() for b in BACKGROUNDS.values()) >= 64
    assert not set(COLORS) & set(BACKGROUNDS)
    assert len(HELDOUT_PAIRS) == len(SHAPES) and len({c for _, c in HELDOUT_PAIRS}) == len(SHAPES)


@pytest.mark.parametrize("resolution", range(MIN_RESOLUTION, 513))
def test_sizes_are_odd_increasing_and_fit_their_cell(resolution):
    sides = [size_pixels(s, resolution) for s in SIZES]
    assert sides == sorted(set(sides)) and all(s % 2 == 1 for s in sides)
    assert sides[-1] + 2 * margin_pixels(resolution) <= resolution // 3


def test_sizes_at_64_and_256():
    assert [size_pixels(s, 64) for s in SIZES] == [11, 15, 19]
    assert [size_pixels(s, 256) for s in SIZES] == [45, 61, 77]


@pytest.mark.parametrize("side", [11, 15, 19, 45])
def test_shapes_are_symmetric_and_distinct(side):
    masks = {s: R.shape_mask(s, side) for s in SHAPES}
    for mask in masks.values():
        assert np.array_equal(mask, mask[:, ::-1])  # left-right symmetric (odd sides)
    ious = [(masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum() for a, b in itertools.combinations(SHAPES, 2)]
    assert max(ious) < 0.85


def test_objects_stay_inside_their_cell_and_never_touch():
    for i in range(300):
        scene = sample_scene(np.random.default_rng(i), num_objects=9 if i % 3 == 0 else None)
        labels = R.label_map(scene, 64)
        for k, o in enumerate(scene.objects):
            x0, y0, x1, y1 = object_box(o, 64)
            assert (labels == k + 1).sum() == R.shape_mask(o.shape, x1 - x0 + 1).sum()
        # no two objects are 8-neighbours
        padded = np.pad(labels, 1)
        for dy, dx in itertools.product((0, 1, 2), repeat=2):
            other = padded[dy : dy + 64, dx : dx + 64]
            assert not ((labels > 0) & (other > 0) & (other != labels)).any()


def test_render_uses_exact_palette_colours_only():
    scene = sample_scene(np.random.default_rng(3), num_objects=3)
    image = R.render_array(scene, 64)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {BACKGROUNDS[scene.background], *(COLORS[o.color] for o in scene.objects)}


def test_scene_json_round_trip_reproduces_the_image():
    scene = sample_scene(np.random.default_rng(5))
    again = Scene.from_json(scene.to_json())
    assert again == scene
    assert np.array_equal(R.render_array(again, 64), R.render_array(scene, 64))


def test_boxes_on_the_0_255_scale():
    assert box_to_255((0, 0, 63, 63), 64) == (0, 0, 255, 255)
    assert box_to_255((5, 6, 15, 16), 64) == (20, 24, 63, 67)
    assert box_from_255((20, 24, 63, 67), 64) == (5, 6, 15, 16)
    assert box_to_255((5, 6, 15, 16), 256) == (5, 6, 15, 16)


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown color 'mauve'"):
        SceneObject("star", "mauve", "small", "top left")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        SceneObject("hexagon", "red", "small", "top left")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        SceneObject("star", "red", "huge", "top left")
    with pytest.raises(ValueError, match="unknown position 'upper middle'"):
        SceneObject("star", "red", "small", "upper middle")
    with pytest.raises(ValueError, match="unknown color 'white'.*backgrounds are separate"):
        SceneObject("star", "white", "small", "top left")
    with pytest.raises(ValueError, match="unknown background 'red'"):
        Scene("red", ())
    with pytest.raises(ValueError, match="offset"):
        SceneObject("star", "red", "small", "top left", offset=(0.5, 1.5))


def test_impossible_scenes_are_clear_errors():
    ten = tuple(SceneObject("star", "red", "small", None) for _ in range(10))
    with pytest.raises(ValueError, match="impossible scene: 10 objects but the grid has 9 cells"):
        Scene("white", ten).validate()
    same_cell = (SceneObject("star", "red", "small", "center"), SceneObject("circle", "blue", "large", "center"))
    with pytest.raises(ValueError, match="objects 0 and 1 are both at 'center'"):
        R.render(Scene("white", same_cell), 64)
    with pytest.raises(ValueError, match="cannot render object 0: it has no size"):
        R.render(Scene("white", (SceneObject("star", "red", None, "center"),)), 64)
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(np.random.default_rng(0), num_objects=10)


@pytest.mark.parametrize("resolution", [0, 32, 63])
def test_resolution_below_minimum_is_an_error(resolution):
    scene = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match=f"resolution {resolution} is below the minimum 64"):
        R.render(scene, resolution)


def test_resolution_must_be_an_int():
    with pytest.raises(ValueError, match="resolution must be an int"):
        R.render(sample_scene(np.random.default_rng(0)), 64.0)


# -------------------------------------------------------------------------------------- condition images


def test_edge_map_is_the_inner_outline():
    scene = Scene("white", (SceneObject("square", "red", "medium", "center"),))
    edges = R.edge_array(scene, 64)
    x0, y0, x1, y1 = object_box(scene.objects[0], 64)
    on = np.all(edges == 255, axis=-1)
    assert on.sum() == 4 * (x1 - x0)  # the ring of a 15 px square
    assert on[y0, x0] and on[y1, x1] and not on[y0 + 1, x0 + 1]
    assert set(map(tuple, edges.reshape(-1, 3))) == {(0, 0, 0), (255, 255, 255)}


def test_segmentation_map_colours_objects_by_shape():
    scene = sample_scene(np.random.default_rng(11), num_objects=3)
    seg = R.segmentation_array(scene, 64)
    labels = R.label_map(scene, 64)
    for k, o in enumerate(scene.objects):
        assert np.all(seg[labels == k + 1] == R.SEGMENTATION_COLORS[o.shape])
    assert np.all(seg[labels == 0] == 0)


def test_masked_region_is_filled_and_the_rest_kept():
    image = R.render_array(sample_scene(np.random.default_rng(2)), 64)
    masked = R.masked_array(image, (32, 64, 95, 127))
    assert np.all(masked[16:32, 8:24] == R.MASK_COLOR)
    outside = np.ones((64, 64), bool)
    outside[16:32, 8:24] = False
    assert np.array_equal(masked[outside], image[outside])


def test_png_round_trip_is_lossless():
    image = R.render_array(sample_scene(np.random.default_rng(4)), 64)
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(R.encode_png(image)))), image)
