"""Scenes of the synthetic world: the vocabulary of names, the grid geometry and seeded sampling.

A scene is a background colour and 1–3 objects (any number up to the 9 grid cells is representable). Each
object has a shape, a colour, a size and a position (a cell of a 3×3 grid), plus an `offset` that says where
inside its cell it sits, so that a scene renders to the same pixels at a given resolution every time.

Choices made here (the issue left them open):

- Colours are exact RGB palette values drawn without anti-aliasing, so an image reader can go back to names
  by nearest palette colour. They are at least 110 apart (Euclidean, 0–255) from each other and from the
  backgrounds, and every object colour's luma differs by at least 64 from both backgrounds' (white, black).
  The luma rule is why there is no gray background and no yellow: JPEG (4:2:0) and a stride-8 VQ keep luma
  at full resolution but blur chroma, and a shape drawn with little luma contrast (yellow on white, orange
  or green on gray, pure blue on black) loses its outline — measured: 6–25% of small JPEG'd shapes misread.
  Backgrounds have their own palette, so an object never has the background's colour.
- Sizes are fractions of a grid cell's side (`resolution // 3`), rounded down to an odd number of pixels
  so that every shape is left–right symmetric: 11/15/19 px at 64² (45/61/77 at 256²). An object keeps a
  margin of 5% of the cell side (at least 1 px) from its cell's border, so objects never touch: at 64² two
  large neighbours are at least 2 px apart.
- `MIN_RESOLUTION` is 64: below it the small star is under 11 px and shapes stop being readable exactly.
- Position names: "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
  "bottom right" (row-major order). Relations ("left of", "above") compare grid rows and columns.
- Held-out combinations: six (shape, colour) pairs, one per shape and each with a different colour
  (`HELDOUT_PAIRS`), never appear in the train/validation/test splits.

Example:

>>> import numpy as np
>>> scene = Scene(background="white", objects=(SceneObject("star", "red", "small", "top left"),))
>>> scene.to_json()
'{"background":"white","objects":[{"color":"red","offset":[0.5,0.5],"position":"top left","shape":"star","size":"small"}]}'
>>> Scene.from_json(scene.to_json()) == scene
True
>>> object_box(scene.objects[0], 64)
(5, 5, 15, 15)
>>> s = sample_scene(np.random.default_rng(0))
>>> s == sample_scene(np.random.default_rng(0)), 1 <= len(s.objects) <= 3
(True, True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "brown": (150, 75, 0),
    "green": (0, 176, 0),
    "cyan": (0, 255, 255),
    "blue": (40, 90, 255),
    "purple": (150, 40, 255),
    "pink": (255, 128, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.52, "medium": 0.71, "large": 0.9}
MARGIN_FRACTION = 0.05
GRID = 3
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
MIN_RESOLUTION = 64
MAX_OBJECTS = GRID * GRID
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "green"),
        ("square", "purple"),
        ("triangle", "orange"),
        ("star", "blue"),
        ("diamond", "brown"),
        ("cross", "pink"),
    }
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


def _check_name(value: str | None, allowed, what: str, where: str) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {what} {value!r}{where}; expected one of {sorted(allowed)}")


@dataclass(frozen=True)
class SceneObject:
    """One object. Attributes may be None only in *descriptions* (a parsed free-text caption that does not
    say, e.g., the size); scenes that are rendered have them all.

    Args:
        shape: one of `SHAPES`.
        color: one of `COLORS` (object palette; background colours are not allowed).
        size: one of `SIZES`.
        position: one of `POSITIONS` (a cell of the 3×3 grid).
        offset: where the object sits inside its cell, as fractions (x, y) of the free room: (0, 0) is the
            top-left corner of the room, (0.5, 0.5) centred. None in descriptions and read-back scenes.
        box: pixel box `(x1, y1, x2, y2)`, inclusive, on the 0–255 scale of the spatial task, as read from an
            image or stated by a caption. None for sampled scenes (their box depends on the resolution:
            see `object_box` and `box_to_255`).
    """

    shape: str | None
    color: str | None
    size: str | None
    position: str | None
    offset: tuple[float, float] | None = (0.5, 0.5)
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self):
        _check_name(self.shape, SHAPES, "shape", "")
        _check_name(self.color, COLORS, "color", " (object colours; backgrounds are separate)")
        _check_name(self.size, SIZES, "size", "")
        _check_name(self.position, POSITIONS, "position", "")
        if self.offset is not None:
            if len(self.offset) != 2 or not all(0.0 <= float(o) <= 1.0 for o in self.offset):
                raise ValueError(f"offset must be two fractions in [0, 1], got {self.offset!r}")
            object.__setattr__(self, "offset", (float(self.offset[0]), float(self.offset[1])))
        if self.box is not None:
            x1, y1, x2, y2 = (int(v) for v in self.box)
            if not (0 <= x1 <= x2 <= 255 and 0 <= y1 <= y2 <= 255):
                raise ValueError(f"box must be (x1, y1, x2, y2) with 0 <= x1 <= x2 <= 255 (same for y), got {self.box!r}")
            object.__setattr__(self, "box", (x1, y1, x2, y2))

    @property
    def is_complete(self) -> bool:
        return None not in (self.shape, self.color, self.size, self.position)

    def to_dict(self) -> dict:
        out = {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}
        if self.offset is not None:
            out["offset"] = list(self.offset)
        if self.box is not None:
            out["box"] = list(self.box)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        unknown = set(d) - {"shape", "color", "size", "position", "offset", "box"}
        if unknown:
            raise ValueError(f"unknown object fields {sorted(unknown)}")
        offset = d.get("offset")
        box = d.get("box")
        return cls(
            shape=d.get("shape"),
            color=d.get("color"),
            size=d.get("size"),
            position=d.get("position"),
            offset=tuple(offset) if offset is not None else None,
            box=tuple(box) if box is not None else None,
        )


@dataclass(frozen=True)
class Relation:
    """A stated relation between two objects of a description: `objects[subject]` is `relation`
    (`"left of"`, `"right of"`, `"above"`, `"below"`, by grid column/row) `objects[object]`."""

    subject: int
    relation: str
    object: int

    def __post_init__(self):
        _check_name(self.relation, RELATIONS, "relation", "")


@dataclass(frozen=True)
class Scene:
    """A background and its objects.

    Construction checks names (unknown colour/shape/size/position → `ValueError`). Whether a scene is
    *possible* (at most 9 objects, one per cell) is checked by `validate()`, which `render`, the task
    builders and `parse_caption` call; a scene *read* from a generated image may be impossible (two blobs
    in one cell) and is still representable, so that scoring can count it.

    `relations` only appear in descriptions parsed from text; they index `objects`.
    """

    background: str | None
    objects: tuple[SceneObject, ...] = ()
    relations: tuple[Relation, ...] = field(default=())

    def __post_init__(self):
        _check_name(self.background, BACKGROUNDS, "background", "")
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "relations", tuple(self.relations))
        for r in self.relations:
            if not (0 <= r.subject < len(self.objects) and 0 <= r.object < len(self.objects)):
                raise ValueError(f"relation {r} refers to an object index outside 0..{len(self.objects) - 1}")

    def validate(self) -> Scene:
        """Raise `ValueError` if no image can show this scene; return the scene otherwise."""
        if len(self.objects) > MAX_OBJECTS:
            raise ValueError(f"impossible scene: {len(self.objects)} objects but the grid has {MAX_OBJECTS} cells")
        taken: dict[str, int] = {}
        for i, o in enumerate(self.objects):
            if o.position is None:
                continue
            if o.position in taken:
                raise ValueError(f"impossible scene: objects {taken[o.position]} and {i} are both at {o.position!r}")
            taken[o.position] = i
        for r in self.relations:
            a, b = self.objects[r.subject].position, self.objects[r.object].position
            if a is not None and b is not None and not relation_holds(a, r.relation, b):
                raise ValueError(f"impossible scene: the object at {a!r} is not {r.relation} the object at {b!r}")
        return self

    @property
    def is_complete(self) -> bool:
        return self.background is not None and all(o.is_complete for o in self.objects)

    def key(self) -> tuple:
        """What the scene shows, ignoring object order, offsets and boxes: two scenes with equal keys are
        the same picture up to placement inside the cells."""
        return (
            self.background,
            tuple(sorted(((o.position or ""), (o.shape or ""), (o.color or ""), (o.size or "")) for o in self.objects)),
        )

    def to_dict(self) -> dict:
        out = {"background": self.background, "objects": [o.to_dict() for o in self.objects]}
        if self.relations:
            out["relations"] = [[r.subject, r.relation, r.object] for r in self.relations]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        unknown = set(d) - {"background", "objects", "relations"}
        if unknown:
            raise ValueError(f"unknown scene fields {sorted(unknown)}")
        return cls(
            background=d.get("background"),
            objects=tuple(SceneObject.from_dict(o) for o in d.get("objects", ())),
            relations=tuple(Relation(int(a), r, int(b)) for a, r, b in d.get("relations", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------- geometry


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool):
        raise ValueError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution {resolution} is below the minimum {MIN_RESOLUTION} (MIN_RESOLUTION)")
    return int(resolution)


def grid_cell(position: str) -> tuple[int, int]:
    """(row, column) of a position name."""
    i = POSITIONS.index(position)
    return divmod(i, GRID)


@lru_cache(maxsize=None)
def cell_bounds(index: int, resolution: int) -> tuple[int, int]:
    """Pixel range [lo, hi) of grid row/column `index` (the last one takes the remainder)."""
    return index * resolution // GRID, (index + 1) * resolution // GRID


@lru_cache(maxsize=None)
def margin_pixels(resolution: int) -> int:
    """Pixels an object keeps free from its cell's border."""
    return max(1, int(MARGIN_FRACTION * (resolution // GRID)))


@lru_cache(maxsize=None)
def size_pixels(size: str, resolution: int) -> int:
    """Nominal side in pixels of an object of this size class: odd, and small enough to fit its cell with
    the margin on both sides."""
    cell = resolution // GRID
    largest = cell - 2 * margin_pixels(resolution)
    largest -= 1 - largest % 2
    return min(2 * int(SIZE_FRACTIONS[size] * cell / 2) + 1, largest)


def object_box(obj: SceneObject, resolution: int) -> tuple[int, int, int, int]:
    """The nominal square `(x0, y0, x1, y1)` (pixels, inclusive) the object is drawn in."""
    if obj.position is None or obj.size is None:
        raise ValueError("object_box needs an object with a position and a size")
    offset = obj.offset if obj.offset is not None else (0.5, 0.5)
    row, col = grid_cell(obj.position)
    s = size_pixels(obj.size, resolution)
    m = margin_pixels(resolution)
    corner = []
    for index, frac in ((col, offset[0]), (row, offset[1])):
        lo, hi = cell_bounds(index, resolution)
        room = hi - lo - 2 * m - s
        corner.append(lo + m + int(round(frac * room)))
    return corner[0], corner[1], corner[0] + s - 1, corner[1] + s - 1


def box_to_255(box: tuple[int, int, int, int], resolution: int) -> tuple[int, int, int, int]:
    """Pixel box (inclusive) → the 0–255 scale of the spatial task (inclusive; exact when 256 % resolution
    == 0 or resolution % 256 == 0): a start maps to the first, an end to the last 0–255 unit it covers."""
    x0, y0, x1, y1 = box
    lo = lambda v: v * 256 // resolution  # noqa: E731
    hi = lambda v: (v + 1) * 256 // resolution - 1  # noqa: E731
    return lo(x0), lo(y0), max(lo(x0), hi(x1)), max(lo(y0), hi(y1))


def box_from_255(box: tuple[int, int, int, int], resolution: int) -> tuple[int, int, int, int]:
    """Inverse of `box_to_255` (pixels, inclusive)."""
    x0, y0, x1, y1 = box
    return x0 * resolution // 256, y0 * resolution // 256, x1 * resolution // 256, y1 * resolution // 256


def position_of(cx: float, cy: float, resolution: int) -> str:
    """Grid position of a pixel point."""
    col = max(i for i in range(GRID) if cell_bounds(i, resolution)[0] <= cx)
    row = max(i for i in range(GRID) if cell_bounds(i, resolution)[0] <= cy)
    return POSITIONS[row * GRID + col]


def size_class(side: float, resolution: int) -> str:
    """The size class whose nominal side is nearest to `side` pixels (ties go to the smaller class)."""
    return min(SIZES, key=lambda s: (abs(size_pixels(s, resolution) - side), SIZES.index(s)))


def relation_holds(a: str, relation: str, b: str) -> bool:
    """Whether position `a` is `relation` position `b` on the grid (rows/columns compared)."""
    (ra, ca), (rb, cb) = grid_cell(a), grid_cell(b)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


# ---------------------------------------------------------------------------------------------- sampling


def allowed_colors(shape: str, heldout: bool) -> list[str]:
    """Colours a `shape` may take outside the held-out split (all colours when `heldout`)."""
    return [c for c in COLORS if heldout or (shape, c) not in HELDOUT_PAIRS]


def sample_object(
    rng: np.random.Generator, position: str, *, heldout_ok: bool, force_heldout: bool = False
) -> SceneObject:
    """A random object at `position`. `force_heldout` draws its (shape, colour) from `HELDOUT_PAIRS`;
    otherwise held-out pairs are excluded unless `heldout_ok`."""
    if force_heldout:
        shape, color = sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))]
    else:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colors = allowed_colors(shape, heldout_ok)
        color = colors[rng.integers(len(colors))]
    size = SIZES[rng.integers(len(SIZES))]
    offset = (round(float(rng.random()), 3), round(float(rng.random()), 3))
    return SceneObject(shape, color, size, position, offset)


def sample_scene(rng: np.random.Generator, *, heldout: bool = False, num_objects: int | None = None) -> Scene:
    """A random scene: uniform background, 1–3 objects (uniform, unless `num_objects`) in distinct cells,
    listed in row-major cell order. With `heldout=True` one object (chosen at random) has a held-out
    (shape, colour) pair and the others are unrestricted; otherwise no object has one."""
    if num_objects is None:
        num_objects = int(rng.integers(1, 4))
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}, got {num_objects}")
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    cells = sorted(rng.permutation(MAX_OBJECTS)[:num_objects].tolist())
    special = int(rng.integers(num_objects)) if heldout else -1
    objects = tuple(
        sample_object(rng, POSITIONS[c], heldout_ok=heldout, force_heldout=(i == special))
        for i, c in enumerate(cells)
    )
    return Scene(background, objects)


def has_heldout_pair(scene: Scene) -> bool:
    return any((o.shape, o.color) in HELDOUT_PAIRS for o in scene.objects)


def with_object(scene: Scene, index: int, **changes) -> Scene:
    """A copy of `scene` with object `index` changed (dataclasses.replace on that object)."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return replace(scene, objects=tuple(objects))


def sort_objects(scene: Scene) -> Scene:
    """Objects in row-major cell order (the order sampled scenes and read-back scenes use)."""
    if scene.relations:
        raise ValueError("cannot reorder a scene with relations (they index the objects)")
    order = sorted(scene.objects, key=lambda o: POSITIONS.index(o.position) if o.position else MAX_OBJECTS)
    return replace(scene, objects=tuple(order))
