"""Natural text about scenes: captions, long captions, referring expressions, VQA questions, edit instructions.

Every choice of wording is drawn from the seeded `numpy.random.Generator` passed in, so a row's text is as
reproducible as its image. Captions are *complete*: they name the background and every object's size, colour,
shape and position, so that `parsing.parse_caption(caption).key() == scene.key()` for every template. The
wording varies: two object phrasings ("a small red star", "a small star in red"), two phrasings per position
("at the top left", "in the top left corner"), object order shuffled, four short and two long caption
templates, counts ("two shapes on a white background: ...") and relations ("..., above a large blue circle
...", derived from grid rows/columns).

The English word is "colour" in questions and instructions (the issue's own example); code identifiers use
`color`. The parser accepts both spellings.

Example:

>>> import numpy as np
>>> from cm3leon_hf.synthetic.scene import Scene, SceneObject
>>> scene = Scene("white", (SceneObject("star", "red", "small", "top left"), SceneObject("circle", "blue", "large", "center")))
>>> caption(scene, np.random.default_rng(1))
'two shapes on a white background: a small star in red at the top left and a large circle in blue in the center'
>>> question, answer = make_question(scene, np.random.default_rng(3))
>>> question, answer
('is the red star left of the large circle?', 'yes')
"""

from __future__ import annotations

import re

import numpy as np

from .scene import (
    COLORS,
    HELDOUT_PAIRS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    grid_cell,
)

BREAK = "<break>"
IMAGE = "<image>"

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "at the top edge"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom edge"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
PLURALS: dict[str, str] = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}

# Short captions. {objects}: object phrases with positions, joined "A, B and C".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} on a {background} background",
    "a {background} background with {objects}",
    "{count} on a {background} background: {objects}",
    "on a {background} background, {objects}",
)
# With two or more objects, one template states a relation between the first two objects.
RELATION_TEMPLATE = "{first}, {relation} {second}{rest}, on a {background} background"
LONG_CAPTION_TEMPLATES: tuple[str, ...] = (
    "The image shows {count} on a {background} background. {sentences}",
    "There {be} {count} in this picture. The background is {background}. {sentences}",
)
LONG_SENTENCE_TEMPLATES: tuple[str, ...] = ("{Position} there is {object}.", "{Object} is {position}.")

RECOLOR_TEMPLATES = ("make {ref} {color}", "change the colour of {ref} to {color}", "paint {ref} {color}")
MOVE_TEMPLATES = ("move {ref} to the {position}", "shift {ref} to the {position}")
REMOVE_TEMPLATES = ("remove {ref}", "delete {ref}", "take away {ref}")
ADD_TEMPLATES = ("add {object} {position}", "draw {object} {position}", "insert {object} {position}")

EDIT_OPS: tuple[str, ...] = ("recolor", "move", "remove", "add")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "size", "position", "count", "background", "relation", "exists")

# Referring expressions: attribute sets, least specific first; "shape" absent means the noun "object".
REFERENCE_FORMS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
    ("shape", "position"),
    ("color", "shape", "position"),
    ("color",),
    ("size",),
    ("size", "color"),
    ("position",),
    ("color", "position"),
)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_phrases(phrases: list[str]) -> str:
    """"A", "A and B", "A, B and C"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def count_phrase(n: int, rng: np.random.Generator) -> str:
    """"one shape", "two objects", ..."""
    noun = _pick(rng, ("shape", "object"))
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def object_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """"a small red star" or "a small star in red"."""
    if rng.random() < 0.5:
        return f"{article(obj.size)} {obj.size} {obj.color} {obj.shape}"
    return f"{article(obj.size)} {obj.size} {obj.shape} in {obj.color}"


def position_phrase(position: str, rng: np.random.Generator) -> str:
    return _pick(rng, POSITION_PHRASES[position])


def placed_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """"a small red star at the top left"."""
    return f"{object_phrase(obj, rng)} {position_phrase(obj.position, rng)}"


def true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations (`scene.RELATIONS`) that hold from `a` to `b` on the grid."""
    (ra, ca), (rb, cb) = grid_cell(a.position), grid_cell(b.position)
    out = []
    if ca < cb:
        out.append("left of")
    if ca > cb:
        out.append("right of")
    if ra < rb:
        out.append("above")
    if ra > rb:
        out.append("below")
    return out


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A complete short caption of `scene` (a template drawn by `rng`; the relation template is one more
    choice when the scene has two or more objects)."""
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    n_templates = len(CAPTION_TEMPLATES) + (1 if len(order) >= 2 else 0)
    choice = int(rng.integers(n_templates))
    if choice == len(CAPTION_TEMPLATES):
        first, second, *rest = order
        relation = _pick(rng, RELATION_PHRASES[_pick(rng, true_relations(first, second))])
        tail = "".join(", and " + placed_phrase(o, rng) for o in rest)
        return RELATION_TEMPLATE.format(
            first=placed_phrase(first, rng),
            relation=relation,
            second=placed_phrase(second, rng),
            rest=tail,
            background=scene.background,
        )
    return CAPTION_TEMPLATES[choice].format(
        objects=join_phrases([placed_phrase(o, rng) for o in order]),
        background=scene.background,
        count=count_phrase(len(order), rng),
    )


def long_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A complete multi-sentence description: a count and background sentence, then one per object."""
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    sentences = []
    for o in order:
        template = _pick(rng, LONG_SENTENCE_TEMPLATES)
        obj, pos = object_phrase(o, rng), position_phrase(o.position, rng)
        sentences.append(
            template.format(Position=pos[0].upper() + pos[1:], object=obj, Object=obj[0].upper() + obj[1:], position=pos)
        )
    n = len(order)
    return _pick(rng, LONG_CAPTION_TEMPLATES).format(
        count=count_phrase(n, rng),
        background=scene.background,
        be="is" if n == 1 else "are",
        sentences=" ".join(sentences),
    )


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """"two shapes on a white background": the count and background only (the spatial task's caption,
    whose objects are then listed with boxes)."""
    return f"{count_phrase(len(scene.objects), rng)} on a {scene.background} background"


# ---------------------------------------------------------------------------------- referring expressions


def _matches(obj: SceneObject, attrs: tuple[str, ...], values: SceneObject) -> bool:
    return all(getattr(obj, a) == getattr(values, a) for a in attrs)


def reference_forms(scene: Scene, index: int, exclude: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The `REFERENCE_FORMS` that pick out object `index` alone, without the attributes in `exclude`."""
    target = scene.objects[index]
    return [
        form
        for form in REFERENCE_FORMS
        if not set(form) & set(exclude) and sum(_matches(o, form, target) for o in scene.objects) == 1
    ]


def reference_phrase(obj: SceneObject, form: tuple[str, ...], rng: np.random.Generator) -> str:
    """"the small red star", "the object at the top left", ..."""
    words = ["the"]
    words += [getattr(obj, a) for a in ("size", "color") if a in form]
    words.append(obj.shape if "shape" in form else "object")
    if "position" in form:
        words.append(position_phrase(obj.position, rng))
    return " ".join(words)


def refer(scene: Scene, index: int, rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str | None:
    """An unambiguous referring expression for object `index` (a form drawn by `rng`), or None if no form
    without `exclude` identifies it."""
    forms = reference_forms(scene, index, exclude)
    return reference_phrase(scene.objects[index], _pick(rng, forms), rng) if forms else None


# ------------------------------------------------------------------------------------------------- VQA


def make_question(scene: Scene, rng: np.random.Generator, *, heldout_ok: bool = True) -> tuple[str, str]:
    """A question about `scene` and its one-word (or two-word position) answer. Types (`QUESTION_TYPES`) are
    drawn uniformly among those that can be asked of this scene. Unless `heldout_ok`, an existence question
    never names a held-out (shape, colour) pair."""
    n = len(scene.objects)
    while True:
        kind = _pick(rng, QUESTION_TYPES)
        i = int(rng.integers(n))
        o = scene.objects[i]
        if kind in ("color", "shape", "size", "position"):
            ref = refer(scene, i, rng, exclude=(kind,))
            if ref is None:
                continue
            if kind == "position":
                return f"where is {ref}?", o.position
            word = "colour" if kind == "color" else kind
            return f"what {word} is {ref}?", getattr(o, kind)
        if kind == "background":
            return "what colour is the background?", scene.background
        if kind == "count":
            sub = int(rng.integers(3))
            if sub == 0:
                return "how many objects are there?", NUMBER_WORDS[n]
            if sub == 1:
                color = _pick(rng, list(COLORS))
                return f"how many {color} objects are there?", NUMBER_WORDS[sum(x.color == color for x in scene.objects)]
            shape = _pick(rng, SHAPES)
            return f"how many {PLURALS[shape]} are there?", NUMBER_WORDS[sum(x.shape == shape for x in scene.objects)]
        if kind == "relation":
            if n < 2:
                continue
            j = int(rng.integers(n - 1))
            j += j >= i
            ref_a, ref_b = refer(scene, i, rng), refer(scene, j, rng)
            relation = _pick(rng, list(RELATION_PHRASES))
            holds = relation in true_relations(o, scene.objects[j])
            return f"is {ref_a} {_pick(rng, RELATION_PHRASES[relation])} {ref_b}?", "yes" if holds else "no"
        # exists
        if rng.random() < 0.5:
            shape, color = o.shape, o.color
        else:
            shape = _pick(rng, SHAPES)
            color = _pick(rng, [c for c in COLORS if heldout_ok or (shape, c) not in HELDOUT_PAIRS])
        present = any(x.shape == shape and x.color == color for x in scene.objects)
        return f"is there {article(color)} {color} {shape}?", "yes" if present else "no"


# ------------------------------------------------------------------------------------------------- edits


def edit_instruction(op: str, scene: Scene, index: int, value, rng: np.random.Generator) -> str:
    """The instruction text for an edit of `scene`: recolour object `index` to colour `value`, move it to
    position `value`, remove it, or (op "add") add the complete `SceneObject` `value`."""
    if op == "add":
        return _pick(rng, ADD_TEMPLATES).format(object=object_phrase(value, rng), position=position_phrase(value.position, rng))
    exclude = ("color",) if op == "recolor" and rng.random() < 0.5 else ()
    ref = refer(scene, index, rng, exclude=exclude) or refer(scene, index, rng)
    if op == "recolor":
        return _pick(rng, RECOLOR_TEMPLATES).format(ref=ref, color=value)
    if op == "move":
        return _pick(rng, MOVE_TEMPLATES).format(ref=ref, position=value)
    if op == "remove":
        return _pick(rng, REMOVE_TEMPLATES).format(ref=ref)
    raise ValueError(f"unknown edit op {op!r}; expected one of {list(EDIT_OPS)}")


# ------------------------------------------------------------------------------------------- vocabulary

_TASK_PROMPT_WORDS = (
    "Describe the given picture in very detail. Describe all the objects in the given image. Generate a long "
    "caption for the given image. Question: Answer: The answer is. Edit the image following the text "
    "instruction. Edit first image following the instruction. Generate high quality image of with "
    "segmentations at location. Fabricate an image of at the location. Make high quality image from canny edge "
    "features and text description. Make high quality image from a segmentation map. Fill in the missing "
    "region of the image. Restore the masked region. how many are there what is where is there yes no "
    "colour color shape size"
)


def vocabulary() -> list[str]:
    """Every lower-cased word the world's text can contain (captions, questions, answers, instructions, task
    prompts), sorted. Digits and punctuation are not words here. The CLIP tokenizer is built on it."""
    texts = [
        *CAPTION_TEMPLATES, RELATION_TEMPLATE, *LONG_CAPTION_TEMPLATES, *LONG_SENTENCE_TEMPLATES,
        *RECOLOR_TEMPLATES, *MOVE_TEMPLATES, *REMOVE_TEMPLATES, *ADD_TEMPLATES, _TASK_PROMPT_WORDS,
        *(p for phrases in POSITION_PHRASES.values() for p in phrases),
        *(p for phrases in RELATION_PHRASES.values() for p in phrases),
        *SHAPES, *PLURALS.values(), *COLORS, *SIZES, *POSITIONS, *NUMBER_WORDS,
        "white black background a an the object objects shape shapes is are in on",
    ]  # fmt: skip
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{[^}]*\}", " ", text).lower()))
    return sorted(words)
