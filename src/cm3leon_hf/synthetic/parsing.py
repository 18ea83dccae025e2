"""Reading the world's text back into structure: captions → `Scene`, instructions → `Edit`, questions → answers.

The parser is a small scanner over words, not a list of regular expressions per template, so that free text
in the world's vocabulary parses too ("a red star left of a blue circle", "three objects", "two red stars").
It recognises:

- objects: `[a|an|the|one..nine] [size] [colour] shape|object [in colour]` (plural nouns after a number);
- positions: `[at|on|in|to] the <position> [corner|edge|side|cell]`, with "middle" for "center";
- boxes: `(x1, y1) -> (x2, y2)` on the 0–255 scale (they set the object's box, position and size);
- relations: "to the left of", "left of", "to the right of", "right of", "above", "below", "under";
- the background: "a white background", "the background is white";
- counts: "two shapes", "three objects" (a summary that must agree with the objects listed, or, alone,
  a number of objects with nothing else said about them); a plural noun without a number ("all the
  objects") names no particular object;
- filler words of the templates and task prompts ("there is", "the image shows", "generate high quality
  image of", ...).

Clauses are separated by punctuation and "and". In a clause, a position belongs to the clause's object; a
clause with only a position ("at the top left, ...") gives it to the next clause's object. A relation word
relates the last object before it to the first object after it.

What it cannot read raises `ValueError` naming the problem: an unknown word, a dangling position or colour,
an ambiguous clause, contradicting counts/backgrounds/relations, or an impossible scene. Attributes a text
does not state are None in the result and are not scored.

Example:

>>> scene = parse_caption("two shapes on a white background: a small red star at the top left and a large blue circle in the middle")
>>> [(o.size, o.color, o.shape, o.position) for o in scene.objects], scene.background
([('small', 'red', 'star', 'top left'), ('large', 'blue', 'circle', 'center')], 'white')
>>> parse_caption("a red star left of a blue circle").relations
(Relation(subject=0, relation='left of', object=1),)
>>> parse_caption("a red star on a plaid background")
Traceback (most recent call last):
...
ValueError: cannot parse 'a red star on a plaid background': unknown word 'plaid'
>>> apply_instruction(scene, "make the star blue").objects[0].color
'blue'
>>> answer_question(scene, "what colour is the object in the middle?")
'blue'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .captions import PLURALS, RELATION_PHRASES
from .scene import (
    BACKGROUNDS,
    COLORS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    Relation,
    Scene,
    SceneObject,
    box_from_255,
    position_of,
    relation_holds,
    size_class,
)

_SYNONYMS = {"colour": "color", "centre": "center", "middle": "center"}
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_GENERIC = {"object": False, "objects": True, "shape": False, "shapes": True, "thing": False, "things": True}
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS) if i > 0}
_DETERMINERS = {"a": 1, "an": 1, "the": 1, **_NUMBERS}
_POSITION_WORDS = sorted((tuple(p.split()) for p in POSITIONS), key=len, reverse=True)
_RELATIONS = sorted(
    ((tuple(phrase.split()), name) for name, phrases in RELATION_PHRASES.items() for phrase in phrases),
    key=lambda x: len(x[0]),
    reverse=True,
)
_FILLERS = frozenset(
    """a an the and with there is are this that of in on at to it image images picture shows show
    describe given very detail all generate long caption for high quality fabricate segmentations location
    make from canny edge features text description segmentation map fill missing region restore masked
    color""".split()
)
_SEPARATORS = frozenset({",", ";", ":", ".", "!", "?", "and"})
_TOKEN = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*->\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)|[a-z]+|[,;:.!?]|\S")


@dataclass
class _Item:
    kind: str  # "object", "count", "position", "box", "relation", "background", "color", "sep"
    value: object = None
    prep: str | None = None


@dataclass
class _ObjectWords:
    size: str | None
    color: str | None
    shape: str | None
    number: int | None  # a number word before the noun ("two red stars" → 2)
    plural: bool

    @property
    def has_attributes(self) -> bool:
        return any(v is not None for v in (self.size, self.color, self.shape))


def _tokens(text: str) -> list[str | tuple[int, int, int, int]]:
    out: list[str | tuple[int, int, int, int]] = []
    for m in _TOKEN.finditer(text.lower()):
        if m.group(1) is not None:
            out.append(tuple(int(m.group(k)) for k in range(1, 5)))
        elif m.group(0) in ('"', "'"):
            continue
        else:
            out.append(_SYNONYMS.get(m.group(0), m.group(0)))
    return out


def _scan(text: str) -> list[_Item]:
    """Words → items. Raises ValueError on a word outside the world's vocabulary."""
    if "<break>" in text or "<image>" in text:
        raise ValueError(
            f"cannot parse {text!r}: it is a document with <break>/<image> markers; pass only its text part "
            "(e.g. a row's `caption`, or `text.split(' <break> ')[0]`)"
        )
    toks = _tokens(text)
    items: list[_Item] = []
    i = 0
    while i < len(toks):
        # The first reader that recognises the words at i wins: relations before positions ("to the left of"
        # contains "the left"), objects last before single words.
        for read in (_read_box, _read_relation, _read_position, _read_background, _read_object):
            step = read(text, toks, i)
            if step is not None:
                item, i = step
                break
        else:
            item, i = _read_word(text, toks, i), i + 1
        if item is not None:
            items.append(item)
    return items


# Each reader looks at the words from `i`: None if they are not its kind, else `(item or None, index after them)`.
_Step = tuple[_Item | None, int] | None


def _at(toks: list, k: int):
    return toks[k] if k < len(toks) else None


def _read_box(text: str, toks: list, i: int) -> _Step:
    """`(x1, y1) -> (x2, y2)`, already one token."""
    return (_Item("box", toks[i]), i + 1) if isinstance(toks[i], tuple) else None


def _read_relation(text: str, toks: list, i: int) -> _Step:
    """The longest relation phrase starting at `i` ("to the left of" before "left of")."""
    words, name = next(((w, n) for w, n in _RELATIONS if tuple(toks[i : i + len(w)]) == w), (None, None))
    return (_Item("relation", name), i + len(words)) if words is not None else None


def _read_position(text: str, toks: list, i: int) -> _Step:
    """`[at|on|in|to] the <position> [corner|edge|side|cell]`."""
    j, prep = i, None
    if toks[i] in ("at", "on", "in", "to") and _at(toks, i + 1) == "the":
        prep, j = toks[i], i + 1
    if _at(toks, j) != "the":
        return None
    words = next((w for w in _POSITION_WORDS if tuple(toks[j + 1 : j + 1 + len(w)]) == w), None)
    if words is None:
        return None
    k = j + 1 + len(words)
    if _at(toks, k) in ("corner", "edge", "side", "cell"):
        k += 1
    return _Item("position", " ".join(words), prep), k


def _read_background(text: str, toks: list, i: int) -> _Step:
    """`<colour> background` or `background is <colour>`."""
    t = toks[i]
    if t in BACKGROUNDS and _at(toks, i + 1) == "background":
        return _Item("background", t), i + 2
    if t == "background" and _at(toks, i + 1) == "is" and _at(toks, i + 2) in BACKGROUNDS:
        return _Item("background", _at(toks, i + 2)), i + 3
    return None


def _read_object(text: str, toks: list, i: int) -> _Step:
    """`[det] [size] [color] noun [in color]`: an object, a count ("two shapes") or nothing in particular ("all the
    objects"). A determiner with a size or colour but no noun is an error."""
    k, det = i, None
    if toks[i] in _DETERMINERS:
        det, k = toks[i], i + 1
    size = _at(toks, k) if _at(toks, k) in SIZES else None
    k += size is not None
    color = _at(toks, k) if _at(toks, k) in COLORS else None
    k += color is not None
    noun = _at(toks, k)
    if not (isinstance(noun, str) and (noun in SHAPES or noun in _SINGULAR or noun in _GENERIC)):
        if det is not None and (size is not None or color is not None):
            raise ValueError(f"cannot parse {text!r}: {' '.join(map(str, toks[i:k + 1]))!r} names no shape")
        return None
    k += 1
    if color is None and _at(toks, k) == "in" and _at(toks, k + 1) in COLORS:
        color, k = _at(toks, k + 1), k + 2
    plural = noun in _SINGULAR or _GENERIC.get(noun, False)
    shape = noun if noun in SHAPES else _SINGULAR.get(noun)
    number = _NUMBERS.get(det) if det is not None else None
    if number is not None and (number > 1) != plural:
        raise ValueError(f"cannot parse {text!r}: {det!r} does not agree with {noun!r}")
    words = _ObjectWords(size, color, shape, number, plural)
    if not words.has_attributes and det in _NUMBERS:
        return _Item("count", words), k  # "two shapes": a summary
    if not words.has_attributes and plural:
        return None, k  # "all the objects": no particular object
    return _Item("object", words), k


def _read_word(text: str, toks: list, i: int) -> _Item | None:
    """One word no reader took: a bare colour, a separator or a filler (None); anything else is an error."""
    t = toks[i]
    if t in COLORS:
        return _Item("color", t)
    if t in BACKGROUNDS:
        raise ValueError(f"cannot parse {text!r}: {t!r} is a background colour, not an object colour")
    if t in _SEPARATORS:
        return _Item("sep")
    if t in SIZES or t in _NUMBERS:
        raise ValueError(f"cannot parse {text!r}: {t!r} does not describe an object")
    if t not in _FILLERS:
        raise ValueError(f"cannot parse {text!r}: unknown word {t!r}")
    return None


def _box_object(words: _ObjectWords, box: tuple[int, int, int, int]) -> SceneObject:
    x0, y0, x1, y1 = box_from_255(box, 256)
    return SceneObject(
        words.shape,
        words.color,
        size_class(max(x1 - x0, y1 - y0) + 1, 256),
        position_of((x0 + x1) / 2, (y0 + y1) / 2, 256),
        offset=None,
        box=box,
    )


def _objects_from_items(text: str, items: list[_Item]) -> tuple[list[SceneObject], list[Relation], list[_Item]]:
    """Bind positions/boxes to objects clause by clause; returns objects, relations and the leftover
    items (background, counts, bare colours)."""
    clauses: list[list[_Item]] = [[]]
    relation_after: dict[int, str] = {}  # clause index → relation to the following clause
    for item in items:
        if item.kind == "sep":
            clauses.append([])
        elif item.kind == "relation":
            relation_after[len(clauses) - 1] = item.value
            clauses.append([])
        else:
            clauses[-1].append(item)
    objects: list[SceneObject] = []
    first_of_clause: dict[int, int] = {}
    last_before: dict[int, int] = {}
    rest: list[_Item] = []
    pending: _Item | None = None
    for c, clause in enumerate(clauses):
        objs = [it for it in clause if it.kind == "object"]
        places = [it for it in clause if it.kind in ("position", "box")]
        rest += [it for it in clause if it.kind not in ("object", "position", "box")]
        if len(objs) > 1:
            raise ValueError(f"cannot parse {text!r}: several objects in one clause; separate them with ',' or 'and'")
        if len(places) > 1:
            raise ValueError(f"cannot parse {text!r}: several positions/boxes in one clause")
        if objs:
            words = objs[0].value
            place = places[0] if places else pending
            pending = None
            n = words.number or 1
            if place is not None and n > 1:
                raise ValueError(f"cannot parse {text!r}: {n} objects cannot share one place")
            first_of_clause[c] = len(objects)
            for _ in range(n):
                if place is not None and place.kind == "box":
                    objects.append(_box_object(words, place.value))
                else:
                    position = place.value if place is not None else None
                    objects.append(SceneObject(words.shape, words.color, words.size, position, offset=None))
        elif places:
            if pending is not None:
                raise ValueError(f"cannot parse {text!r}: position {pending.value!r} is not attached to an object")
            pending = places[0]
        last_before[c] = len(objects) - 1
    if pending is not None:
        raise ValueError(f"cannot parse {text!r}: position {pending.value!r} is not attached to an object")
    relations = []
    for c, name in relation_after.items():
        subject = last_before[c]
        obj = first_of_clause.get(c + 1)
        if subject < 0 or obj is None:
            raise ValueError(f"cannot parse {text!r}: relation {name!r} needs an object on both sides")
        relations.append(Relation(subject, name, obj))
    return objects, relations, rest


def parse_caption(text: str) -> Scene:
    """A caption (any template of `captions`, a spatial prompt with boxes, or free text in the world's
    vocabulary) → the `Scene` it describes, with None for what it does not say. Raises `ValueError` for text
    it cannot read or for a scene no image can show."""
    if not isinstance(text, str):
        raise ValueError(f"parse_caption expects a str, got {type(text).__name__}")
    items = _scan(text)
    objects, relations, rest = _objects_from_items(text, items)
    backgrounds = {it.value for it in rest if it.kind == "background"}
    if len(backgrounds) > 1:
        raise ValueError(f"cannot parse {text!r}: several backgrounds {sorted(backgrounds)}")
    if any(it.kind == "color" for it in rest):
        color = next(it.value for it in rest if it.kind == "color")
        raise ValueError(f"cannot parse {text!r}: colour {color!r} does not describe an object")
    counts = {it.value.number or 1 for it in rest if it.kind == "count"}
    if len(counts) > 1:
        raise ValueError(f"cannot parse {text!r}: contradicting counts {sorted(counts)}")
    if counts:
        (count,) = counts
        if not objects:
            objects = [SceneObject(None, None, None, None, offset=None) for _ in range(count)]
        elif count != len(objects):
            raise ValueError(f"cannot parse {text!r}: it says {count} objects but describes {len(objects)}")
    if not objects and not backgrounds:
        raise ValueError(f"cannot parse {text!r}: it describes neither objects nor a background")
    background = backgrounds.pop() if backgrounds else None
    scene = Scene(background, tuple(objects), tuple(relations))
    try:
        return scene.validate()
    except ValueError as err:
        raise ValueError(f"cannot parse {text!r}: {err}") from None


# ---------------------------------------------------------------------------------------- instructions

_VERBS = {
    ("make",): "recolor", ("paint",): "recolor", ("change",): "recolor", ("turn",): "recolor", ("color",): "recolor",
    ("move",): "move", ("shift",): "move", ("drag",): "move",
    ("remove",): "remove", ("delete",): "remove", ("erase",): "remove", ("take", "away"): "remove",
    ("add",): "add", ("draw",): "add", ("insert",): "add",
}  # fmt: skip


@dataclass(frozen=True)
class Edit:
    """A parsed instruction. `target` is the referenced object (attributes it does not name are None) for
    "recolor"/"move"/"remove", and the new, complete object for "add"; `color` is the new colour of a
    recolour, `position` the destination of a move."""

    op: str
    target: SceneObject
    color: str | None = None
    position: str | None = None


def parse_instruction(text: str) -> Edit:
    """An edit instruction (`captions.edit_instruction` templates, or free text of the same shape) → `Edit`.

    >>> parse_instruction("move the red star at the top left to the bottom right")
    Edit(op='move', target=SceneObject(shape='star', color='red', size=None, position='top left', offset=None, box=None), color=None, position='bottom right')
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_instruction expects a str, got {type(text).__name__}")
    toks = [t for t in _tokens(text) if t not in (".", "!")]
    verb = next((v for v in sorted(_VERBS, key=len, reverse=True) if tuple(toks[: len(v)]) == v), None)
    if verb is None:
        raise ValueError(f"cannot parse instruction {text!r}: it must start with one of {sorted(' '.join(v) for v in _VERBS)}")
    op = _VERBS[verb]
    items = _scan(" ".join(t for t in toks[len(verb) :] if isinstance(t, str)))
    destination = None
    if op == "move":
        dest = [it for it in items if it.kind == "position" and it.prep == "to"]
        if len(dest) != 1:
            raise ValueError(f"cannot parse instruction {text!r}: a move needs one destination 'to the <position>'")
        destination = dest[0].value
        items = [it for it in items if it is not dest[0]]
    new_color = None
    if op == "recolor":
        colors = [it for it in items if it.kind == "color"]
        if len(colors) != 1:
            raise ValueError(f"cannot parse instruction {text!r}: a recolour needs exactly one new colour")
        new_color = colors[0].value
        items = [it for it in items if it is not colors[0]]
    objects, relations, rest = _objects_from_items(text, items)
    if len(objects) != 1 or relations or rest:
        raise ValueError(f"cannot parse instruction {text!r}: it must name exactly one object")
    target = objects[0]
    if op == "add":
        if not target.is_complete:
            raise ValueError(f"cannot parse instruction {text!r}: 'add' needs a size, colour, shape and position")
        target = replace(target, offset=(0.5, 0.5))
    return Edit(op, target, new_color, destination)


def resolve(scene: Scene, reference: SceneObject, text: str = "") -> int:
    """Index of the one object of `scene` that matches every attribute `reference` names."""
    attrs = [a for a in ("shape", "color", "size", "position") if getattr(reference, a) is not None]
    hits = [i for i, o in enumerate(scene.objects) if all(getattr(o, a) == getattr(reference, a) for a in attrs)]
    if len(hits) != 1:
        what = " ".join(str(getattr(reference, a)) for a in attrs) or "object"
        raise ValueError(f"{text or 'reference'!r}: {what!r} matches {len(hits)} objects of the scene, not one")
    return hits[0]


def apply_instruction(scene: Scene, instruction: str | Edit) -> Scene:
    """The scene after the instruction. Raises `ValueError` if it is unreadable, names no single object of
    `scene`, or asks for an occupied cell."""
    edit = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    text = instruction if isinstance(instruction, str) else str(edit)
    objects = list(scene.objects)
    if edit.op == "add":
        objects.append(edit.target)
    else:
        i = resolve(scene, edit.target, text)
        if edit.op == "remove":
            del objects[i]
        elif edit.op == "recolor":
            objects[i] = replace(objects[i], color=edit.color)
        else:
            objects[i] = replace(objects[i], position=edit.position, box=None)
    try:
        return Scene(scene.background, tuple(objects)).validate()
    except ValueError as err:
        raise ValueError(f"cannot apply {text!r}: {err}") from None


# ------------------------------------------------------------------------------------------- questions

_QUESTION = [
    (re.compile(r"^what color is the background$"), "background"),
    (re.compile(r"^what (color|shape|size) is (.+)$"), "attribute"),
    (re.compile(r"^where is (.+)$"), "position"),
    (re.compile(r"^how many (.+) are there$"), "count"),
    (re.compile(r"^is there (.+)$"), "exists"),
    (re.compile(r"^is (.+?) (to the left of|left of|to the right of|right of|above|below|under) (.+)$"), "relation"),
]


def _reference(text: str, question: str) -> SceneObject:
    objects, relations, rest = _objects_from_items(question, _scan(text))
    if len(objects) != 1 or relations or rest:
        raise ValueError(f"cannot parse question {question!r}: {text!r} is not one object")
    return objects[0]


def answer_question(scene: Scene, question: str) -> str:
    """The answer `scene` gives to a question of `captions.make_question`'s forms (same answer words:
    colour/shape/size/position names, number words, "yes"/"no").

    Raises `ValueError` for a question it cannot read or whose object is not exactly one object of `scene`.
    """
    q = " ".join(_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", question.lower()))
    for pattern, kind in _QUESTION:
        m = pattern.match(q)
        if m is None:
            continue
        if kind == "background":
            if scene.background is None:
                raise ValueError("the scene has no background")
            return scene.background
        if kind == "attribute":
            obj = scene.objects[resolve(scene, _reference(m.group(2), question), question)]
            return getattr(obj, m.group(1))
        if kind == "position":
            return scene.objects[resolve(scene, _reference(m.group(1), question), question)].position
        if kind == "count":
            if m.group(1) in _GENERIC:  # "how many objects"
                return NUMBER_WORDS[len(scene.objects)]
            ref = _reference(m.group(1), question)
            attrs = [a for a in ("shape", "color", "size") if getattr(ref, a) is not None]
            return NUMBER_WORDS[sum(all(getattr(o, a) == getattr(ref, a) for a in attrs) for o in scene.objects)]
        if kind == "exists":
            ref = _reference(m.group(1), question)
            attrs = [a for a in ("shape", "color", "size", "position") if getattr(ref, a) is not None]
            return "yes" if any(all(getattr(o, a) == getattr(ref, a) for a in attrs) for o in scene.objects) else "no"
        relation = {"to the left of": "left of", "to the right of": "right of", "under": "below"}.get(m.group(2), m.group(2))
        a = scene.objects[resolve(scene, _reference(m.group(1), question), question)]
        b = scene.objects[resolve(scene, _reference(m.group(3), question), question)]
        return "yes" if relation_holds(a.position, relation, b.position) else "no"
    raise ValueError(f"cannot parse question {question!r}")
