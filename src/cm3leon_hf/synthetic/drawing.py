"""Drawing scenes: RGB images, edge maps, segmentation maps, masked images for infilling.

Shapes are rasterised here, not by PIL: a pixel belongs to a shape when its *centre* lies inside the shape
scaled to the object's square (PIL's polygon fill rounds fractional vertices asymmetrically, which makes a
10 px triangle lopsided). Pixels take the exact palette colour — no anti-aliasing — so that the evaluator can
read colours back. The same cached masks (`shape_mask`) are the evaluator's shape templates.

Example:

>>> from cm3leon_hf.synthetic.scene import Scene, SceneObject
>>> scene = Scene("black", (SceneObject("diamond", "brown", "small", "center", (0.5, 0.5)),))
>>> image = render(scene, 64)
>>> image.size, image.mode, image.getpixel((31, 31)), image.getpixel((0, 0))
((64, 64), 'RGB', (150, 75, 0), (0, 0, 0))
>>> object_pixel_box(scene.objects[0], 64)
(26, 26, 36, 36)
>>> print("\\n".join("".join("#" if v else "-" for v in row) for row in shape_mask("triangle", 7)))
---#---
---#---
--###--
--###--
-#####-
-#####-
#######
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

from .scene import BACKGROUNDS, COLORS, SHAPES, Scene, SceneObject, check_resolution, object_box, size_pixels

# Pascal VOC's first six class colours, one per shape, on VOC's black background.
SEGMENTATION_COLORS: dict[str, tuple[int, int, int]] = {
    "circle": (128, 0, 0),
    "square": (0, 128, 0),
    "triangle": (128, 128, 0),
    "star": (0, 0, 128),
    "diamond": (128, 0, 128),
    "cross": (0, 128, 128),
}
EDGE_COLOR = (255, 255, 255)
# Fill of the region to restore in the infilling task: ≥ 110 away from every palette colour.
MASK_COLOR = (64, 64, 64)
CROSS_ARM = 1 / 3  # arm width of the cross, as a fraction of its side
STAR_INNER = 0.5  # inner radius of the five-pointed star, as a fraction of the outer radius


def _star_polygon() -> np.ndarray:
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return (pts - pts.min(0)) / (pts.max(0) - pts.min(0))  # fit the unit square: (10, 2)


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule for points (u, v) against a closed polygon (n, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask (side, side) of `shape` drawn in a square of `side` pixels (read-only, cached)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    c = (np.arange(side) + 0.5) / side  # pixel centres in the unit square
    v, u = np.meshgrid(c, c, indexing="ij")
    eps = 1e-9
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25 + eps
    elif shape == "diamond":
        mask = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + eps
    elif shape == "triangle":  # apex at the top centre, base along the bottom
        mask = v >= 2 * np.abs(u - 0.5) - eps
    elif shape == "cross":
        mask = (np.abs(u - 0.5) <= CROSS_ARM / 2 + eps) | (np.abs(v - 0.5) <= CROSS_ARM / 2 + eps)
    else:  # star
        mask = _inside_polygon(u, v, _star_polygon())
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=None)
def tight_shape(shape: str, side: int) -> tuple[np.ndarray, int, int]:
    """`shape_mask` cropped to its pixels' bounding box, and that box's (x, y) offset in the square."""
    mask = shape_mask(shape, side)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return crop, int(cols[0]), int(rows[0])


def object_pixel_box(obj: SceneObject, resolution: int) -> tuple[int, int, int, int]:
    """Tight pixel box `(x0, y0, x1, y1)` (inclusive) of the pixels the object is drawn with."""
    x0, y0, _, _ = object_box(obj, resolution)
    crop, dx, dy = tight_shape(obj.shape, size_pixels(obj.size, resolution))
    return x0 + dx, y0 + dy, x0 + dx + crop.shape[1] - 1, y0 + dy + crop.shape[0] - 1


def _check_renderable(scene: Scene) -> None:
    if not isinstance(scene, Scene):
        raise ValueError(f"expected a Scene, got {type(scene).__name__}")
    scene.validate()
    if scene.background is None:
        raise ValueError("cannot render a scene without a background")
    for i, o in enumerate(scene.objects):
        if not o.is_complete:
            missing = [k for k in ("shape", "color", "size", "position") if getattr(o, k) is None]
            raise ValueError(f"cannot render object {i}: it has no {', '.join(missing)}")


def label_map(scene: Scene, resolution: int = 64) -> np.ndarray:
    """(resolution, resolution) int array: 0 for background, i + 1 for pixels of object i."""
    resolution = check_resolution(resolution)
    _check_renderable(scene)
    labels = np.zeros((resolution, resolution), dtype=np.int32)
    for i, o in enumerate(scene.objects):
        x0, y0, x1, y1 = object_box(o, resolution)
        labels[y0 : y1 + 1, x0 : x1 + 1][shape_mask(o.shape, x1 - x0 + 1)] = i + 1
    return labels


def render_array(scene: Scene, resolution: int = 64) -> np.ndarray:
    """The scene as a (resolution, resolution, 3) uint8 array."""
    resolution = check_resolution(resolution)
    _check_renderable(scene)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[...] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        x0, y0, x1, y1 = object_box(o, resolution)
        image[y0 : y1 + 1, x0 : x1 + 1][shape_mask(o.shape, x1 - x0 + 1)] = COLORS[o.color]
    return image


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """The scene as an RGB PIL image."""
    return Image.fromarray(render_array(scene, resolution), mode="RGB")


def edge_array(scene: Scene, resolution: int = 64) -> np.ndarray:
    """Edge map (canny-style condition): object pixels with a 4-neighbour outside the object, white on
    black, one pixel wide. Returns (resolution, resolution, 3) uint8."""
    labels = label_map(scene, resolution)
    padded = np.pad(labels, 1, mode="edge")
    differs = np.zeros_like(labels, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy : dy + resolution, dx : dx + resolution] != labels
    image = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    image[(labels > 0) & differs] = EDGE_COLOR
    return image


def segmentation_array(scene: Scene, resolution: int = 64) -> np.ndarray:
    """Segmentation map condition: each object filled with its shape's class colour
    (`SEGMENTATION_COLORS`) on black. Returns (resolution, resolution, 3) uint8."""
    labels = label_map(scene, resolution)
    lut = np.zeros((len(scene.objects) + 1, 3), dtype=np.uint8)
    for i, o in enumerate(scene.objects):
        lut[i + 1] = SEGMENTATION_COLORS[o.shape]
    return lut[labels]


def masked_array(image: np.ndarray, region_255: tuple[int, int, int, int]) -> np.ndarray:
    """A copy of `image` with `region_255` (inclusive box on the 0–255 scale) filled with `MASK_COLOR`."""
    resolution = image.shape[0]
    x0, y0, x1, y1 = region_255
    out = image.copy()
    out[y0 * resolution // 256 : (y1 + 1) * resolution // 256, x0 * resolution // 256 : (x1 + 1) * resolution // 256] = MASK_COLOR
    return out


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB array, with zlib level 1 (the data sets' choice: ~3× faster than the default
    level for ~10% more bytes on these flat images)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
