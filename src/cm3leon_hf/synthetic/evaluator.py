"""Reading a scene back from an image, and scoring an image against a scene or a caption.

`read_scene` works in five steps, each with a stated rule:

1. Background: the background palette colour with the most pixels within `COLOR_DISTANCE` of it. If fewer
   than `BACKGROUND_MIN_FRACTION` of the pixels are that close to it, the image is not a picture of this
   world (blank noise, a photo) and the result is an empty scene with no background.
2. Foreground: pixels nearer to some object colour than to the background colour (the 50% blend line,
   so blurred or ringing pixels between two neighbours stay background); objects are its 8-connected
   components. Components smaller than `MIN_AREA_FRACTION` of the small square are noise.
3. Colour: the object colour nearest to the component's per-channel median colour (ties: palette order).
   A component whose median is farther than `OBJECT_COLOR_DISTANCE` from every object colour is noise. (A
   per-pixel vote within `COLOR_DISTANCE` fails on JPEG: 4:2:0 chroma subsampling moves a small object's
   colours by ~60.)
4. Shape and size: the component's mask is compared (IoU, centres aligned) with every shape's mask rendered
   at the nominal sides that could give its bounding box; the best match gives the shape, and the nearest
   size class to its side gives the size. A best IoU under `MIN_SHAPE_IOU` leaves the shape None
   ("unrecognised"), which scores as wrong.
5. Position: the grid cell that holds the centre of the component's bounding box.

A result with no objects means "no object found": `score` reports it in its `status`.

Example:

>>> from cm3leon_hf.synthetic.scene import Scene, SceneObject
>>> from cm3leon_hf.synthetic.drawing import render
>>> scene = Scene("black", (SceneObject("cross", "cyan", "medium", "bottom right"),))
>>> read = read_scene(render(scene, 64))
>>> read.key() == scene.key(), read.objects[0].box
(True, (180, 180, 239, 239))
>>> r = score(render(scene, 64), "a cyan cross at the bottom right on a black background")
>>> r["scene_correct"], r["shape"], r["size"], r["status"]
(True, 1.0, None, 'ok')
>>> from PIL import Image
>>> read_scene(Image.new("RGB", (64, 64), (255, 255, 255))).objects
()
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .drawing import tight_shape
from .scene import (
    BACKGROUNDS,
    COLORS,
    MIN_RESOLUTION,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    box_to_255,
    position_of,
    relation_holds,
    size_class,
    size_pixels,
)

COLOR_DISTANCE = 55.0  # < half the palette's smallest separation (110)
BACKGROUND_MIN_FRACTION = 0.5
MIN_AREA_FRACTION = 0.25
OBJECT_COLOR_DISTANCE = 100.0
MIN_SHAPE_IOU = 0.6
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position")

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (3, 3)
_OBJ_NAMES = list(COLORS)
_OBJ_RGB = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Largest number of pixels a shape's tight box loses against its nominal side (the star loses the most).
_MAX_SHRINK = 4


_LUT_BITS = 6  # per channel; a pixel's colour is rounded to the centre of its bin (error <= 2 of 255)


def _lut_index(array: np.ndarray) -> np.ndarray:
    q = (array >> (8 - _LUT_BITS)).astype(np.int32)  # (H, W, 3)
    return (q[..., 0] << (2 * _LUT_BITS)) | (q[..., 1] << _LUT_BITS) | q[..., 2]


@lru_cache(maxsize=1)
def _pixel_flags() -> np.ndarray:
    """Per quantised colour: bit b = within `COLOR_DISTANCE` of background b; bit (n_backgrounds + b) =
    some object colour is nearer than background b (foreground on that background)."""
    levels = (np.arange(2**_LUT_BITS) << (8 - _LUT_BITS)) + (1 << (7 - _LUT_BITS))
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    colors = np.stack([r, g, b], -1).reshape(-1, 3).astype(np.float32)  # (bins³, 3)
    bg = ((colors[:, None, :] - _BG_RGB) ** 2).sum(-1)  # (bins³, n_backgrounds)
    obj = ((colors[:, None, :] - _OBJ_RGB) ** 2).sum(-1).min(1, keepdims=True)  # (bins³, 1)
    flags = np.zeros(len(colors), dtype=np.uint8)
    for i in range(len(_BG_NAMES)):
        flags |= (bg[:, i] < COLOR_DISTANCE**2).astype(np.uint8) << i
        flags |= (obj[:, 0] < bg[:, i]).astype(np.uint8) << (len(_BG_NAMES) + i)
    return flags


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}; convert it with image.convert('RGB') first")
        array = np.asarray(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 array of shape (height, width, 3), got {image.dtype} {image.shape}")
        array = image
    else:
        raise ValueError(f"expected a PIL RGB image or a uint8 (height, width, 3) array, got {type(image).__name__}")
    height, width = array.shape[:2]
    if height != width:
        raise ValueError(f"expected a square image, got {width}x{height}")
    if width < MIN_RESOLUTION:
        raise ValueError(f"image is {width}x{height}, below the minimum resolution {MIN_RESOLUTION}")
    return array


def _iou_centered(a: np.ndarray, b: np.ndarray) -> float:
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    ca = np.zeros((h, w), dtype=bool)
    cb = np.zeros((h, w), dtype=bool)
    ya, xa = (h - a.shape[0]) // 2, (w - a.shape[1]) // 2
    yb, xb = (h - b.shape[0]) // 2, (w - b.shape[1]) // 2
    ca[ya : ya + a.shape[0], xa : xa + a.shape[1]] = a
    cb[yb : yb + b.shape[0], xb : xb + b.shape[1]] = b
    union = np.count_nonzero(ca | cb)
    return np.count_nonzero(ca & cb) / union if union else 0.0


def classify_shape(mask: np.ndarray) -> tuple[str | None, int, float]:
    """Best (shape, nominal side, IoU) for a component's mask cropped to its bounding box. The shape is None
    if no IoU reaches `MIN_SHAPE_IOU`. Ties go to the earlier shape in `SHAPES`, then the smaller side."""
    side = max(mask.shape)
    best = (None, side, -1.0)
    for shape in SHAPES:
        for nominal in range(max(1, side - 1), side + _MAX_SHRINK + 1):
            iou = _iou_centered(mask, tight_shape(shape, nominal)[0])
            if iou > best[2] + 1e-12:
                best = (shape, nominal, iou)
    return (best[0] if best[2] >= MIN_SHAPE_IOU else None), best[1], best[2]


def read_scene(image) -> Scene:
    """The scene an image shows (see the module docstring for the rules). Objects carry `box` (0–255
    scale) and no offset, in row-major cell order. Raises `ValueError` for input that is not a square RGB
    image (PIL image of mode RGB, or a uint8 array (H, W, 3)) of at least `MIN_RESOLUTION` pixels."""
    array = _as_array(image)
    resolution = array.shape[0]
    flags = _pixel_flags()[_lut_index(array)]  # (H, W) uint8
    near = [np.count_nonzero(flags & (1 << b)) for b in range(len(_BG_NAMES))]
    b = int(np.argmax(near))
    if near[b] < BACKGROUND_MIN_FRACTION * resolution * resolution:
        return Scene(None, ())
    foreground = (flags & (1 << (len(_BG_NAMES) + b))) != 0
    pixels = array.astype(np.float32)
    labels, _ = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    min_area = MIN_AREA_FRACTION * size_pixels(SIZES[0], resolution) ** 2
    found = []
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[region] == k
        area = int(mask.sum())
        if area < min_area:
            continue
        median = np.median(pixels[region][mask], axis=0)  # (3,)
        dist = np.sqrt(((median - _OBJ_RGB) ** 2).sum(-1))  # (8,)
        color = int(np.argmin(dist))
        if dist[color] > OBJECT_COLOR_DISTANCE:
            continue
        shape, nominal, _ = classify_shape(mask)
        y0, x0 = region[0].start, region[1].start
        y1, x1 = region[0].stop - 1, region[1].stop - 1
        found.append(
            SceneObject(
                shape=shape,
                color=_OBJ_NAMES[color],
                size=size_class(nominal, resolution),
                position=position_of((x0 + x1) / 2, (y0 + y1) / 2, resolution),
                offset=None,
                box=box_to_255((x0, y0, x1, y1), resolution),
            )
        )
    found.sort(key=lambda o: (POSITIONS.index(o.position), o.box[1], o.box[0]))
    return Scene(_BG_NAMES[b], tuple(found))


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def compare_scenes(read: Scene, target: Scene) -> dict:
    """Score a read-back scene against a target description (see `score`)."""
    n_t, n_r = len(target.objects), len(read.objects)
    matched: dict[int, int] = {}
    if n_t and n_r:
        agree = np.zeros((n_t, n_r))
        for i, t in enumerate(target.objects):
            for j, r in enumerate(read.objects):
                agree[i, j] = sum(getattr(t, a) is not None and getattr(t, a) == getattr(r, a) for a in ATTRIBUTES)
                agree[i, j] += 0.5 * (t.position is not None and t.position == r.position)  # positions identify
        rows, cols = linear_sum_assignment(-agree)
        matched = dict(zip(rows.tolist(), cols.tolist()))
    out: dict = {}
    for a in ATTRIBUTES:
        stated = [i for i, t in enumerate(target.objects) if getattr(t, a) is not None]
        hits = sum(i in matched and getattr(read.objects[matched[i]], a) == getattr(target.objects[i], a) for i in stated)
        out[a] = hits / len(stated) if stated else None
    out["background"] = None if target.background is None else float(read.background == target.background)
    out["count"] = float(n_r == n_t)
    if target.relations:
        ok = 0
        for rel in target.relations:
            if rel.subject in matched and rel.object in matched:
                a, b = read.objects[matched[rel.subject]], read.objects[matched[rel.object]]
                ok += relation_holds(a.position, rel.relation, b.position)
        out["relations"] = ok / len(target.relations)
    else:
        out["relations"] = None
    boxed = [i for i, t in enumerate(target.objects) if t.box is not None]
    out["box_iou"] = (
        sum(_box_iou(target.objects[i].box, read.objects[matched[i]].box) if i in matched else 0.0 for i in boxed)
        / len(boxed)
        if boxed
        else None
    )
    parts = [out[k] for k in (*ATTRIBUTES, "background", "count", "relations")]
    out["scene_correct"] = all(p == 1.0 for p in parts if p is not None)
    out["objects_found"] = n_r
    out["status"] = "no background found" if read.background is None else ("no object found" if n_r == 0 else "ok")
    return out


def score(image, target: Scene | str) -> dict:
    """Score an image against a target `Scene` or a caption (parsed by `parse_caption`).

    Target objects are matched to the objects read from the image by an optimal assignment on the number of
    agreeing stated attributes. Returns:

    - `shape`, `color`, `size`, `position`: fraction of target objects stating that attribute whose matched
      object has it (unmatched objects count as wrong); None if no target object states it;
    - `background`: 1.0/0.0, None if not stated; `count`: 1.0 if as many objects were found as described;
    - `relations`: fraction of stated relations that hold between the matched objects (None if none);
    - `box_iou`: mean box IoU for target objects with boxes (None if none);
    - `scene_correct`: every stated attribute, the background, the count and the relations are right;
    - `objects_found` and `status` ("ok", "no object found", "no background found").
    """
    if isinstance(target, str):
        from .parsing import parse_caption

        target = parse_caption(target)
    elif not isinstance(target, Scene):
        raise ValueError(f"target must be a Scene or a caption string, got {type(target).__name__}")
    return compare_scenes(read_scene(image), target)


def score_many(images, targets) -> dict[str, float]:
    """Mean of each numeric `score` field over pairs (None fields are left out of their mean), plus `n`."""
    images, targets = list(images), list(targets)
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for image, target in zip(images, targets):
        for k, v in score(image, target).items():
            if isinstance(v, (bool, float, int)) and k != "objects_found":
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    return {**{k: sums[k] / counts[k] for k in sums}, "n": len(images)}
