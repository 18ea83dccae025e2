"""Every task of the paper in miniature, as `datasets.DatasetDict`s with one schema.

Tasks (`TASKS`) and their documents (`text`; `<image>` marks where an image goes, in the order of `images`;
`<break>` separates modalities), after CL §4, Table 5 and the figures' prefixes:

- `text_to_image`: "{caption} <break> <image>" (Table 5's COCO template; wording varies in the caption).
- `caption`: "Describe the given picture. {caption} <break> <image>", or a long caption after
  "Describe the given picture in very detail." / "Describe all the objects in the given image in very
  detail." / "Generate a long caption for the given image." (Image Paragraph / Localized Narratives).
- `vqa`: "Question: {q} Answer: {a}. <break> <image>", "Question: {q}\\n{a} <break> <image>",
  "Question: {q} The answer is {a}. <break> <image>" (VQA2 rows).
- `edit`: "Edit the image following the text instruction <break> <image> <break> {instruction} <break>
  <image>" (§4.1) or Table 5's "Edit first image following the instruction ..."; ops recolour, move,
  remove, add (one change each; remove only from 2+ objects, add only to 1–2, so every image has 1–3).
- `spatial`: 'Generate high quality image of {caption} with segmentations {obj} at {box}, ...' (Table 5),
  'Fabricate an image of {caption} with a {obj} at the location {box}, and ...' (Fig 5),
  'Generate high quality image of "{caption}" with {obj} at location {box} and with ...' (Fig 15).
  {caption} is "two shapes on a white background"; boxes are "(x1, y1) -> (x2, y2)", the objects' tight
  pixel boxes on the 0–255 scale, inclusive.
- `structure`: "Make high quality image from canny edge features <break> <image> <break> {caption} <break>
  <image>" or "... from a segmentation map ..." (Table 5), each also with "... and text description"
  (§4.1's wording). Edge maps are one-pixel white outlines on black; segmentation maps fill each object with
  its shape's class colour (Pascal VOC's) on black.
- `infill`: "Fill in the missing region {box} of the image <break> <image> <break> <image>" or "Restore the
  masked region {box} <break> <image> <break> <image>": the first image has `region` filled with
  `render.MASK_COLOR`. The region covers one object's box, widened to the 8×8 patch grid of the image (the
  64² VQ's token grid), so CM3 prompts can mask exactly those image tokens. (Table 5 has no infilling row;
  the template is ours.)

Row schema (`FEATURES`), the same for every task; fields a task does not use are None:
`task`, `text`, `images` (Sequence(Image())), `scene` (JSON of the scene of the last image), `source_scene`
(edit: the first image's scene), `caption` (always a complete caption of `scene`, so CM3 captioning prompts
can be built for any row), `question`/`answer` (vqa), `instruction`/`edit` (edit: text and op),
`condition` ("edge"/"segmentation"), `boxes` (every row: label and 0–255 box of each object of `scene`),
`region` (infill: 0–255 box).

Splits: `train`, `validation`, `test` never show a held-out (shape, colour) pair (`scene.HELDOUT_PAIRS`) in
any image, question or instruction; every `heldout` row shows at least one. Row i of a split comes from its
own generator, `numpy.random.default_rng([seed, task index, split index, i])`, so it is reproducible alone
and the Arrow data do not depend on chunking or `num_proc`. Images are PNG (zlib level 1).

Example:

>>> row = make_row("vqa", "train", 0, seed=0)
>>> row["text"]
'Question: is the large object above the small cross? The answer is no. <break> <image>'
>>> len(row["images"]), row["images"][0].size, row["answer"]
(1, (64, 64), 'no')
>>> ds = build_task("edit", num_train=4, num_validation=2, num_test=2, num_heldout=2)  # doctest: +SKIP
"""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image

from ..layout import EDIT_TEMPLATES, INFILL_TEMPLATES, STRUCTURE_TEMPLATES
from . import captions as C
from .drawing import edge_array, encode_png, masked_array, object_pixel_box, render_array, segmentation_array
from .scene import (
    HELDOUT_PAIRS,
    POSITIONS,
    Scene,
    allowed_colors,
    box_to_255,
    check_resolution,
    sample_object,
    sample_scene,
    sort_objects,
    with_object,
)

TASKS: tuple[str, ...] = ("text_to_image", "caption", "vqa", "edit", "spatial", "structure", "infill")
SPLITS: tuple[str, ...] = ("train", "validation", "test", "heldout")
# Bump when the world's output changes: it is part of the `from_generator` cache fingerprint.
WORLD_VERSION = 1
PATCH_GRID = 8

TEXT_TO_IMAGE_TEMPLATES = ("{caption} <break> <image>",)
CAPTION_TEMPLATES = ("Describe the given picture. {caption} <break> <image>",)
LONG_CAPTION_TEMPLATES = (
    "Describe the given picture in very detail. {caption} <break> <image>",
    "Describe all the objects in the given image in very detail. {caption} <break> <image>",
    "Generate a long caption for the given image. {caption} <break> <image>",
)
VQA_TEMPLATES = (
    "Question: {question} Answer: {answer}. <break> <image>",
    "Question: {question}\n{answer} <break> <image>",
    "Question: {question} The answer is {answer}. <break> <image>",
)

FEATURES = datasets.Features(
    {
        "task": datasets.Value("string"),
        "text": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image()),
        "scene": datasets.Value("string"),
        "source_scene": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "instruction": datasets.Value("string"),
        "edit": datasets.Value("string"),
        "condition": datasets.Value("string"),
        "boxes": datasets.List({"label": datasets.Value("string"), "box": datasets.List(datasets.Value("int32"), length=4)}),
        "region": datasets.List(datasets.Value("int32"), length=4),
    }
)


def box_text(box: tuple[int, int, int, int]) -> str:
    """'(x1, y1) -> (x2, y2)'."""
    return f"({box[0]}, {box[1]}) -> ({box[2]}, {box[3]})"


def scene_boxes(scene: Scene, resolution: int) -> list[dict]:
    """[{'label': 'red star', 'box': [x1, y1, x2, y2]}, ...]: tight boxes on the 0–255 scale."""
    return [
        {"label": f"{o.color} {o.shape}", "box": list(box_to_255(object_pixel_box(o, resolution), resolution))}
        for o in scene.objects
    ]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _edit(scene: Scene, rng: np.random.Generator, heldout: bool) -> tuple[str, Scene, str]:
    """(op, scene after, instruction) for one random edit of `scene`."""
    n = len(scene.objects)
    ops = [op for op in C.EDIT_OPS if not (op == "remove" and n < 2) and not (op == "add" and n > 2)]
    op = _pick(rng, ops)
    free = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
    if op == "add":
        new = sample_object(rng, _pick(rng, free), heldout_ok=heldout)
        after = Scene(scene.background, scene.objects + (new,))
        return op, sort_objects(after), C.edit_instruction(op, scene, -1, new, rng)
    i = int(rng.integers(n))
    o = scene.objects[i]
    if op == "recolor":
        value = _pick(rng, [c for c in allowed_colors(o.shape, heldout) if c != o.color])
        after = with_object(scene, i, color=value)
    elif op == "move":
        value = _pick(rng, free)
        after = sort_objects(with_object(scene, i, position=value))
    else:
        value = None
        after = Scene(scene.background, scene.objects[:i] + scene.objects[i + 1 :])
    return op, after, C.edit_instruction(op, scene, i, value, rng)


def _infill_region(scene: Scene, rng: np.random.Generator, resolution: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = object_pixel_box(scene.objects[int(rng.integers(len(scene.objects)))], resolution)
    unit = 256 // PATCH_GRID
    cell = lambda v: v * PATCH_GRID // resolution  # noqa: E731
    return cell(x0) * unit, cell(y0) * unit, (cell(x1) + 1) * unit - 1, (cell(y1) + 1) * unit - 1


def build_row(task: str, split: str, index: int, *, seed: int = 0, resolution: int = 64) -> dict:
    """Row `index` of `split` of `task`, with images as uint8 arrays (H, W, 3). Deterministic in its
    arguments alone."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    resolution = check_resolution(resolution)
    rng = np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split), index])
    heldout = split == "heldout"
    scene = sample_scene(rng, heldout=heldout)
    row = dict.fromkeys(FEATURES, None)
    row["task"] = task
    image = render_array(scene, resolution)
    if task == "text_to_image":
        row["caption"] = C.caption(scene, rng)
        row["text"] = _pick(rng, TEXT_TO_IMAGE_TEMPLATES).format(caption=row["caption"])
        images = [image]
    elif task == "caption":
        if rng.random() < 0.5:
            row["caption"] = C.caption(scene, rng)
            row["text"] = _pick(rng, CAPTION_TEMPLATES).format(caption=row["caption"])
        else:
            row["caption"] = C.long_caption(scene, rng)
            row["text"] = _pick(rng, LONG_CAPTION_TEMPLATES).format(caption=row["caption"])
        images = [image]
    elif task == "vqa":
        row["question"], row["answer"] = C.make_question(scene, rng, heldout_ok=heldout)
        row["text"] = _pick(rng, VQA_TEMPLATES).format(question=row["question"], answer=row["answer"])
        images = [image]
    elif task == "edit":
        row["edit"], after, row["instruction"] = _edit(scene, rng, heldout)
        row["text"] = _pick(rng, EDIT_TEMPLATES).format(instruction=row["instruction"])
        row["source_scene"] = scene.to_json()
        images = [image, render_array(after, resolution)]
        scene = after
    elif task == "spatial":
        short = C.short_caption(scene, rng)
        order = rng.permutation(len(scene.objects))
        boxes = scene_boxes(scene, resolution)
        labels = [(boxes[i]["label"], box_text(boxes[i]["box"])) for i in order]
        form = int(rng.integers(3))
        if form == 0:
            listed = ", ".join(f"{label} at {box}" for label, box in labels)
            row["text"] = f"Generate high quality image of {short} with segmentations {listed} <break> <image>"
        elif form == 1:
            listed = ", and ".join(f"{C.article(label)} {label} at the location {box}" for label, box in labels)
            row["text"] = f"Fabricate an image of {short} with {listed} <break> <image>"
        else:
            listed = " and ".join(f"with {label} at location {box}" for label, box in labels)
            row["text"] = f'Generate high quality image of "{short}" {listed} <break> <image>'
        images = [image]
    elif task == "structure":
        row["condition"] = _pick(rng, list(STRUCTURE_TEMPLATES))
        condition = (edge_array if row["condition"] == "edge" else segmentation_array)(scene, resolution)
        row["caption"] = C.caption(scene, rng)
        row["text"] = _pick(rng, STRUCTURE_TEMPLATES[row["condition"]]).format(caption=row["caption"])
        images = [condition, image]
    else:  # infill
        region = _infill_region(scene, rng, resolution)
        row["region"] = list(region)
        row["text"] = _pick(rng, INFILL_TEMPLATES).format(region=box_text(region))
        images = [masked_array(image, region), image]
    if row["caption"] is None:
        row["caption"] = C.caption(scene, rng)
    row["scene"] = scene.to_json()
    row["boxes"] = scene_boxes(scene, resolution)
    row["images"] = images
    return row


def make_row(task: str, split: str, index: int, *, seed: int = 0, resolution: int = 64) -> dict:
    """`build_row` with PIL images: the row as `build_task` stores it, decoded."""
    row = build_row(task, split, index, seed=seed, resolution=resolution)
    row["images"] = [Image.fromarray(a, mode="RGB") for a in row["images"]]
    return row


def _generate(task: str, split: str, ranges: list, seed: int, resolution: int, world_version: int):
    for start, stop in ranges:
        for i in range(start, stop):
            row = build_row(task, split, i, seed=seed, resolution=resolution)
            row["images"] = [{"bytes": encode_png(a), "path": None} for a in row["images"]]
            yield row


def build_task(
    task: str,
    *,
    num_train: int = 10_000,
    num_validation: int = 500,
    num_test: int = 500,
    num_heldout: int = 500,
    seed: int = 0,
    resolution: int = 64,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    shard_size: int = 1000,
    keep_in_memory: bool = False,
) -> datasets.DatasetDict:
    """One task's `DatasetDict` with splits `train`, `validation`, `test`, `heldout`.

    Rows are written to Arrow in chunks by `datasets.Dataset.from_generator` (with its progress bar and
    cache, under `cache_dir`); with `num_proc`, shards of `shard_size` rows are generated in parallel. The
    same seed and sizes give byte-identical data whatever `num_proc` and `shard_size`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    check_resolution(resolution)
    sizes = {"train": num_train, "validation": num_validation, "test": num_test, "heldout": num_heldout}
    out = {}
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
        if n == 0:
            out[split] = datasets.Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)
            continue
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
        out[split] = datasets.Dataset.from_generator(
            _generate,
            features=FEATURES,
            cache_dir=cache_dir,
            keep_in_memory=keep_in_memory,
            num_proc=num_proc if num_proc and len(ranges) > 1 else None,
            split=datasets.NamedSplit(split),
            gen_kwargs={
                "task": task,
                "split": split,
                "ranges": ranges,
                "seed": seed,
                "resolution": resolution,
                "world_version": WORLD_VERSION,
            },
        )
    return datasets.DatasetDict(out)


def build_tasks(tasks: tuple[str, ...] = TASKS, **kwargs) -> datasets.DatasetDict:
    """Several tasks' `build_task` outputs concatenated split by split (same sizes per task; mixing ratios
    are the SFT recipe's business)."""
    built = [build_task(t, **kwargs) for t in tasks]
    return datasets.DatasetDict({s: datasets.concatenate_datasets([b[s] for b in built]) for s in SPLITS})


def row_scenes(row: dict) -> list[Scene | None]:
    """The scene of each image of a row, None for condition/masked images: what the evaluator should
    read from them."""
    scene = Scene.from_json(row["scene"])
    if row["task"] == "edit":
        return [Scene.from_json(row["source_scene"]), scene]
    if row["task"] in ("structure", "infill"):
        return [None, scene]
    return [scene]


def contains_heldout(row: dict) -> bool:
    """Whether any image, question or instruction of the row shows a held-out (shape, colour) pair."""
    scenes = [s for s in row_scenes(row) if s is not None]
    if any((o.shape, o.color) in HELDOUT_PAIRS for s in scenes for o in s.objects):
        return True
    text = (row.get("question") or "") + " " + (row.get("instruction") or "")
    return any(f"{color} {shape}" in text for shape, color in HELDOUT_PAIRS)
