"""Free-form drawings in the world's palette: what users draw, not only what the world renders.

The world's scenes put 11–19 px shapes on a 3×3 grid. A user who draws in the same palette puts anything
anywhere: an ellipse, a thin bar off the grid, a square that fills most of the frame, shapes that hide each
other. The image tokenizer is trained on these too (`training/train_image_tokenizer.py --freeform-fraction`),
and `tests/test_image_tokenizer_quality.py` holds it to a PSNR bound on them.

A drawing is a background and 1–`max_shapes` (3) shapes painted in order (later ones hide earlier ones), each:

- a kind: ellipse (any aspect), rectangle, bar (1–4 px thick, horizontal, vertical or diagonal), triangle or convex
  polygon with random vertices, line, or one of the world's shapes (`SHAPES`) at any size;
- a box anywhere in or partly outside the frame, its side log-uniform from 3 px to 1.25× the frame (so that
  whole-frame fills occur);
- a colour: any palette colour, object or background, other than the background's.

The background is one of `BACKGROUNDS` (80%) or an object colour (20%). Pixels are exact palette colours without
anti-aliasing, as in the world.

>>> import numpy as np
>>> a = sample_drawing(np.random.default_rng(0))
>>> a.shape, a.dtype, bool((a == sample_drawing(np.random.default_rng(0))).all())
((64, 64, 3), dtype('uint8'), True)
>>> palette = {tuple(c) for c in PALETTE}
>>> all(tuple(p) in palette for p in a.reshape(-1, 3))
True
>>> drawing_image(1).size
(64, 64)
>>> sorted(user_drawings())
['purple square', 'red ellipse', 'thin blue bar']
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .drawing import _inside_polygon, shape_mask
from .scene import BACKGROUNDS, COLORS, SHAPES

PALETTE: np.ndarray = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.uint8)
KINDS: tuple[str, ...] = ("ellipse", "rectangle", "bar", "triangle", "polygon", "line", "world")
# Relative frequencies of the kinds; the world's shapes at other sizes and places weigh most.
KIND_WEIGHTS: tuple[float, ...] = (0.2, 0.15, 0.12, 0.08, 0.05, 0.05, 0.35)


def _paint_mask(kind: str, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """Boolean (resolution, resolution) mask of one shape of `kind`, placed at random."""
    n = resolution
    c = np.arange(n) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    side = float(np.exp(rng.uniform(np.log(3.0), np.log(1.25 * n))))
    if kind in ("bar", "line"):
        thickness = rng.integers(1, 5) if kind == "bar" else 1
        length = max(side, 6.0)
        angle = rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)])
        cx, cy = rng.uniform(-0.1 * n, 1.1 * n, size=2)
        ux, uy = np.cos(angle), np.sin(angle)
        along = (x - cx) * ux + (y - cy) * uy
        across = -(x - cx) * uy + (y - cy) * ux
        return (np.abs(along) <= length / 2) & (np.abs(across) <= thickness / 2)
    aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.3)))) if kind != "world" else 1.0
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    cx, cy = rng.uniform(-0.15 * n, 1.15 * n), rng.uniform(-0.15 * n, 1.15 * n)
    if kind == "ellipse":
        return ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1.0
    if kind == "rectangle":
        return (np.abs(x - cx) <= w / 2) & (np.abs(y - cy) <= h / 2)
    if kind in ("triangle", "polygon"):
        count = 3 if kind == "triangle" else int(rng.integers(4, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=count))
        poly = np.stack([cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)], axis=1)
        return _inside_polygon(x, y, poly)
    # One of the world's shapes, as the world rasterises it, at an integer side anywhere.
    s = int(np.clip(round(side), 3, 2 * n))
    shape = shape_mask(str(rng.choice(SHAPES)), s)
    x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
    mask = np.zeros((n, n), dtype=bool)
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    w_, h_ = min(s - sx0, n - dx0), min(s - sy0, n - dy0)
    if w_ > 0 and h_ > 0:
        mask[dy0 : dy0 + h_, dx0 : dx0 + w_] = shape[sy0 : sy0 + h_, sx0 : sx0 + w_]
    return mask


def _frame_mask(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A shape that nearly fills the frame: a rectangle, ellipse or world shape whose box leaves a margin of 1–8 px
    (at 64 px) on each side."""
    n = resolution
    scale = n / 64
    x0, y0, x1, y1 = (int(round(rng.uniform(1, 8) * scale)) for _ in range(4))
    box = np.zeros((n, n), dtype=bool)
    kind = rng.choice(["rectangle", "ellipse", "world"])
    w, h = n - x0 - x1, n - y0 - y1
    if kind == "rectangle":
        box[y0 : n - y1, x0 : n - x1] = True
        return box
    c = np.arange(n) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    if kind == "ellipse":
        return ((x - x0 - w / 2) / (w / 2)) ** 2 + ((y - y0 - h / 2) / (h / 2)) ** 2 <= 1.0
    side = min(w, h)
    box[y0 : y0 + side, x0 : x0 + side] = shape_mask(str(rng.choice(SHAPES)), side)
    return box


def sample_drawing(rng: np.random.Generator, resolution: int = 64, max_shapes: int = 3,
                   frame_fraction: float = 0.0) -> np.ndarray:
    """One free-form drawing, a (resolution, resolution, 3) uint8 array (see the module docstring). With probability
    `frame_fraction` the first shape nearly fills the frame (thin margins, `_frame_mask`): rare among the random sizes,
    and the hardest case for a VQ trained on the world's small shapes."""
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    objects = len(COLORS)
    background = int(rng.integers(objects, len(PALETTE))) if rng.random() < 0.8 else int(rng.integers(objects))
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[...] = PALETTE[background]
    framed = frame_fraction > 0 and rng.random() < frame_fraction
    for i in range(int(rng.integers(1, max_shapes + 1))):
        kind = str(rng.choice(KINDS, p=np.array(KIND_WEIGHTS) / sum(KIND_WEIGHTS)))
        colour = int(rng.integers(len(PALETTE) - 1))
        colour += colour >= background  # any palette colour but the background's
        mask = _frame_mask(rng, resolution) if framed and i == 0 else _paint_mask(kind, rng, resolution)
        image[mask] = PALETTE[colour]
    return image


def user_drawings(resolution: int = 64) -> dict[str, Image.Image]:
    """Three drawings a new user tries first, on white (coordinates at 64 px, scaled to `resolution`): a red ellipse
    off the grid, a thin blue bar (3 px) across the frame, and a purple square 56 px wide."""
    n = resolution
    c = np.arange(n) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    k = n / 64
    masks = {
        "red ellipse": ((x - 30 * k) / (20 * k)) ** 2 + ((y - 36 * k) / (11 * k)) ** 2 <= 1,
        "thin blue bar": (x >= 7 * k) & (x < 57 * k) & (y >= 23 * k) & (y < 26 * k),
        "purple square": (x >= 4 * k) & (x < 60 * k) & (y >= 4 * k) & (y < 60 * k),
    }
    colours = {"red ellipse": COLORS["red"], "thin blue bar": COLORS["blue"], "purple square": COLORS["purple"]}
    out = {}
    for name, mask in masks.items():
        image = np.full((n, n, 3), 255, dtype=np.uint8)
        image[mask] = colours[name]
        out[name] = Image.fromarray(image, mode="RGB")
    return out


def drawing_image(index: int, resolution: int = 64, seed: int = 0, frame_fraction: float = 0.0) -> Image.Image:
    """Drawing number `index` of the stream with `seed`, as an RGB PIL image (the same pixels every time)."""
    rng = np.random.default_rng([seed, index])
    return Image.fromarray(sample_drawing(rng, resolution, frame_fraction=frame_fraction), mode="RGB")


__all__ = ["KINDS", "PALETTE", "drawing_image", "sample_drawing", "user_drawings"]
