"""Multi-task instruction-tuning data (CL §4): the paper's task templates as prompt/completion documents, the mixture
balancing, and pre-tokenization through the same resumable path as pretraining (`cm3leon_hf.pretokenized`).

**Formatting.** `format_example(task, row)` writes one row of a task as `(prompt, completion, images)` in the
processor's document format (`<image>` markers, in the order of `images`), from the row's columns
(`TASK_COLUMNS`), with the paper's templates (Table 5 and the figures' prefixes; the same constants the synthetic
world writes its `text` with, `cm3leon_hf.synthetic.tasks`). A `datasets` dataset of a user's with those columns is
formatted by the same function; one lacking a task's columns is refused, naming them (`check_task_columns`).

- **Image outputs** (`text_to_image`, `edit`, `spatial`, `structure`, `infill`): the template as the paper writes it;
  the completion is its last image, then `<eos>`:
  `"Edit the image following the text instruction <break> <image> <break> {instruction} <break>" | "<image> <eos>"`.
- **Text outputs** (`caption`, `vqa`): the paper's templates put the answer *before* the image
  (`"Describe the given picture. {caption} <break> {image}"`), so a left-to-right model cannot answer about an image
  it has not seen. The answer is written as a CM3 infill instead (CM3 §2; CL §2.2 "Image of <mask>: [image]
  <infill>"; PAPER §8.9 option b): `"Describe the given picture. <mask:0> <break> <image> <mask:0>" |
  "{caption} <eoss> <eos>"`. That is the paper's document with its CM3 objective's mask placed on the output, so
  the same prompt works at inference: generate after `<mask:0>` and stop at `<eoss>`.
- The template of a row is drawn from its templates with `numpy.random.default_rng([seed, task index, index])`:
  deterministic per row. A caption of several sentences gets a long-caption instruction ("…in very detail", Image
  Paragraph), a one-sentence caption "Describe the given picture." (COCO).

**Mixture** (CL App. E.1 "threshold of 3/0.3"; the rule is not stated, PAPER §8.10): `mixture_weights` clips each
task's size to within [0.3×, 3×] of the mean task size, and `balanced_rows` samples each task to its clipped size
(without replacement when down-sampling; whole copies plus a sample when up-sampling), deterministically.

**Pre-tokenized output** (`pretokenize_sft`): as `pretokenize`'s (`data/` + `manifest.json`, resumable shards,
`load_pretokenized` reads it and checks the vocabulary), with the columns `source_index`, `task`, `input_ids` (prompt
and completion, `<eos>`-first) and `completion_mask` (1 on the completion's tokens) — the columns TRL's
`SFTTrainer` reads for completion-only loss.

Example:

>>> row = {"caption": "a red star at the top left on a white background", "images": ["IMG"]}
>>> prompt, completion, images = format_example("caption", row)
>>> prompt, completion
('Describe the given picture. <mask:0> <break> <image> <mask:0>', 'a red star at the top left on a white background <eoss> <eos>')
>>> format_example("text_to_image", row)[:2]
('a red star at the top left on a white background <break>', '<image> <eos>')
>>> mixture_weights({"caption": 10_000, "vqa": 1_000, "edit": 100, "infill": 10})  # mean 2,777.5
{'caption': 0.833, 'vqa': 1.0, 'edit': 8.33, 'infill': 83.3}
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, List, Value

from .atomic import atomic_write_json
from .pretokenized import DATA_DIR, FORMAT_VERSION, MANIFEST_FILE, SHARDS_DIR, claim_pretokenized_output, data_files
from .sharded import build_in_shards, save_dataset_atomically
from .synthetic.captions import article
from .synthetic.tasks import (
    CAPTION_TEMPLATES,
    EDIT_TEMPLATES,
    INFILL_TEMPLATES,
    LONG_CAPTION_TEMPLATES,
    STRUCTURE_TEMPLATES,
    TASKS,
    TEXT_TO_IMAGE_TEMPLATES,
    VQA_TEMPLATES,
    box_text,
)

# The columns each task is formatted from; `images` holds the task's images in document order.
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "text_to_image": ("caption", "images"),
    "caption": ("caption", "images"),
    "vqa": ("question", "answer", "images"),
    "edit": ("instruction", "images"),
    "spatial": ("caption", "boxes", "images"),
    "structure": ("caption", "condition", "images"),
    "infill": ("region", "images"),
}
IMAGES_PER_TASK = {"edit": 2, "structure": 2, "infill": 2}
TEXT_OUTPUT_TASKS = ("caption", "vqa")
ANSWER_MASK = "<mask:0>"
MIXTURE_THRESHOLDS = (0.3, 3.0)
SFT_SKIP_REASONS = ("bad_row", "too_long")


def check_task_columns(task: str, column_names: Sequence[str]) -> None:
    """Refuse a dataset that lacks a column `task` is formatted from, naming the missing ones."""
    if task not in TASK_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_COLUMNS)}")
    missing = [c for c in TASK_COLUMNS[task] if c not in column_names]
    if missing:
        raise ValueError(
            f"A {task!r} dataset needs the columns {list(TASK_COLUMNS[task])}; it lacks {missing} (it has "
            f"{list(column_names)}). Rename its columns to these (datasets.Dataset.rename_column)."
        )


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _spatial_text(caption: str, boxes: Sequence[Mapping], rng: np.random.Generator) -> str:
    """The three spatial-grounding forms of the paper (Table 5, Fig 5, Fig 15), as the world writes them."""
    labels = [(b["label"], box_text(b["box"])) for b in boxes]
    form = int(rng.integers(3))
    if form == 0:
        listed = ", ".join(f"{label} at {box}" for label, box in labels)
        return f"Generate high quality image of {caption} with segmentations {listed} <break> <image>"
    if form == 1:
        listed = ", and ".join(f"{article(label)} {label} at the location {box}" for label, box in labels)
        return f"Fabricate an image of {caption} with {listed} <break> <image>"
    listed = " and ".join(f"with {label} at location {box}" for label, box in labels)
    return f'Generate high quality image of "{caption}" {listed} <break> <image>'


def _template_text(task: str, row: Mapping, rng: np.random.Generator) -> tuple[str, str | None]:
    """The paper's document for the row (`<image>` markers) and, for text-output tasks, the answer in it."""
    if task == "text_to_image":
        return _pick(rng, TEXT_TO_IMAGE_TEMPLATES).format(caption=row["caption"]), None
    if task == "caption":
        caption = row["caption"]
        long = ". " in caption.strip().rstrip(".")  # several sentences: Image Paragraph's instructions
        return _pick(rng, LONG_CAPTION_TEMPLATES if long else CAPTION_TEMPLATES).format(caption=caption), caption
    if task == "vqa":
        return _pick(rng, VQA_TEMPLATES).format(question=row["question"], answer=row["answer"]), row["answer"]
    if task == "edit":
        return _pick(rng, EDIT_TEMPLATES).format(instruction=row["instruction"]), None
    if task == "spatial":
        return _spatial_text(row["caption"], row["boxes"], rng), None
    if task == "structure":
        if row["condition"] not in STRUCTURE_TEMPLATES:
            raise ValueError(f"condition must be one of {list(STRUCTURE_TEMPLATES)}, got {row['condition']!r}")
        return _pick(rng, STRUCTURE_TEMPLATES[row["condition"]]).format(caption=row["caption"]), None
    return _pick(rng, INFILL_TEMPLATES).format(region=box_text(row["region"])), None


def format_example(task: str, row: Mapping, *, seed: int = 0, index: int = 0) -> tuple[str, str, list]:
    """`(prompt, completion, images)` of one row of `task` (the module docstring gives the forms).

    Args:
        task: one of `TASK_COLUMNS`.
        row: a mapping with the task's columns (`TASK_COLUMNS[task]`); `images` a list of the task's images in
            document order (condition or source image first, then the output image).
        seed, index: the template is drawn from `numpy.random.default_rng([seed, task index, index])`.
    """
    check_task_columns(task, list(row))
    images = list(row["images"] or [])
    if len(images) != IMAGES_PER_TASK.get(task, 1):
        raise ValueError(f"A {task!r} row has {IMAGES_PER_TASK.get(task, 1)} images, this one has {len(images)}.")
    for column in TASK_COLUMNS[task]:
        if row[column] is None or (isinstance(row[column], str) and not row[column].strip()):
            raise ValueError(f"A {task!r} row needs a value in column {column!r}, this one has {row[column]!r}.")
    text, answer = _template_text(task, row, np.random.default_rng([seed, TASKS.index(task), index]))
    if answer is None:  # an image output: the last image is the completion
        cut = text.rindex("<image>")
        return text[:cut].strip(), "<image> <eos>", images
    answer = answer.strip()
    if answer not in text:
        raise ValueError(f"the answer {answer!r} is not in the {task!r} template {text!r}")
    start = text.index(answer)
    end = start + len(answer)
    while end < len(text) and text[end] in ".?!":  # "Answer: {a}." — the full stop belongs to the span
        end += 1
    prompt = f"{text[:start]}{ANSWER_MASK}{text[end:]} {ANSWER_MASK}"
    return prompt, f"{text[start:end]} <eoss> <eos>", images


def format_messages(task: str, row: Mapping, *, seed: int = 0, index: int = 0) -> dict:
    """The row as TRL's vision-language SFT recipe takes it, `{"messages": [user, assistant], "images": [...]}`:
    `format_example`'s document as a conversation, which the processor's chat template
    (`layout.INFILL_CHAT_TEMPLATE`) renders back into the same ids. So `SFTTrainer(model, processing_class=processor,
    train_dataset=<rows of this>)` trains what `training/sft.py` trains on pre-tokenized data.

    >>> row = {"caption": "a red star at the top left on a white background", "images": ["IMG"]}
    >>> format_messages("caption", row)["messages"]  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': [{'type': 'text', 'text': 'Describe the given picture.'}, {'type': 'image'}]},
     {'role': 'assistant', 'content': [{'type': 'text', 'text': 'a red star at the top left on a white background'}]}]
    """
    prompt, completion, images = format_example(task, row, seed=seed, index=index)
    if task in TEXT_OUTPUT_TASKS:
        before = prompt.split(ANSWER_MASK)[0].strip()
        user = [{"type": "text", "text": before}] + [{"type": "image"}] * prompt.count("<image>")
        answer = completion.removesuffix("<eoss> <eos>").strip()
        assistant = [{"type": "text", "text": answer}]
    else:
        parts = [part.strip() for part in prompt.split("<break>") if part.strip()]
        user = [{"type": "image"} if part == "<image>" else {"type": "text", "text": part} for part in parts]
        assistant = [{"type": "image"}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "images": images}


def mixture_weights(sizes: Mapping[str, int], thresholds: tuple[float, float] = MIXTURE_THRESHOLDS) -> dict[str, float]:
    """Each task's sampling rate: its size clipped to within `[low, high] ×` the mean task size, over its size
    (CL App. E.1's "threshold of 3/0.3"; < 1 down-samples, > 1 up-samples), rounded to 3 significant digits."""
    low, high = thresholds
    if not 0 < low <= 1 <= high:
        raise ValueError(f"thresholds must satisfy 0 < low <= 1 <= high, got {thresholds}")
    if not sizes or any(int(n) < 1 for n in sizes.values()):
        raise ValueError(f"every task needs at least one row, got {dict(sizes)}")
    mean = sum(sizes.values()) / len(sizes)
    return {task: float(f"{min(max(n, low * mean), high * mean) / n:.3g}") for task, n in sizes.items()}


def balanced_rows(sizes: Mapping[str, int], weights: Mapping[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Row numbers of each task after balancing: `round(size × weight)` rows, drawn without replacement when
    down-sampling and as whole copies plus a sample when up-sampling, from `default_rng([seed, task index])`."""
    out = {}
    for k, (task, n) in enumerate(sizes.items()):
        target = max(1, round(n * weights[task]))
        rng = np.random.default_rng([seed, k])
        copies, rest = divmod(target, n)
        out[task] = np.sort(np.concatenate([np.tile(np.arange(n), copies), rng.choice(n, rest, replace=False)]))
    return out


def _encode_shard(part: Dataset, start: int, processor, task_column: str | None, task: str | None, seed: int,
                  max_length: int | None, batch_size: int, progress) -> tuple[Dataset, dict]:
    columns = {"source_index": [], "task": [], "input_ids": [], "completion_mask": []}
    skipped = dict.fromkeys(SFT_SKIP_REASONS, 0)
    for offset in range(0, len(part), batch_size):
        rows = part[offset : offset + batch_size]
        n = len(next(iter(rows.values())))
        first = start + offset
        prompts, completions, images, tasks, keep = [], [], [], [], []
        for j in range(n):
            row = {c: rows[c][j] for c in rows}
            row_task = task or row[task_column]
            try:
                prompt, completion, row_images = format_example(row_task, row, seed=seed, index=first + j)
            except (ValueError, KeyError, TypeError):
                skipped["bad_row"] += 1
                tasks.append(row_task if isinstance(row_task, str) else "")
                continue
            prompts.append(prompt)
            completions.append(completion)
            images.append(row_images)
            tasks.append(row_task)
            keep.append(j)
        prompt_ids = processor(prompts, images=[i[:-1] if c.startswith("<image>") else i for i, c in
                                                zip(images, completions)], padding=False)["input_ids"] if keep else []
        completion_ids = processor(completions, images=[i[-1:] if c.startswith("<image>") else [] for i, c in
                                                        zip(images, completions)], prepend_eos=False,
                                   padding=False)["input_ids"] if keep else []
        ids, masks = [[] for _ in range(n)], [[] for _ in range(n)]
        for j, p, c in zip(keep, prompt_ids, completion_ids):
            if max_length is not None and len(p) + len(c) > max_length:
                skipped["too_long"] += 1
                continue
            ids[j], masks[j] = p + c, [0] * len(p) + [1] * len(c)
        columns["source_index"] += range(first, first + n)
        columns["task"] += tasks
        columns["input_ids"] += ids
        columns["completion_mask"] += masks
        progress.update(n)
    features = {"source_index": Value("int64"), "task": Value("string"), "input_ids": List(Value("int32")),
                "completion_mask": List(Value("int8"))}
    return Dataset.from_dict(columns, features=datasets.Features(features)), skipped


def pretokenize_sft(dataset: Dataset, processor, output_dir: str | os.PathLike, *, task: str | None = None,
                    task_column: str = "task", max_length: int | None = None, seed: int = 0, batch_size: int = 64,
                    shard_size: int = 10_000, overwrite: bool = False, show_progress_bar: bool = True) -> Dataset:
    """Format (`format_example`) and tokenize `dataset`'s rows into `output_dir`; returns the `data` dataset.
    Resumable (finished shards are kept), written atomically; `load_pretokenized(output_dir)` reads it.

    Args:
        dataset: rows of one task (`task`) or of several (each row's task in `task_column`, as the synthetic world's
            `build_tasks` writes it), with the columns of `TASK_COLUMNS`.
        processor: the `Cm3LeonProcessor` of the model to fine-tune.
        max_length: skip (and count) examples longer than this.
        seed: the templates' seed (`format_example`).
        overwrite: delete what `output_dir` holds and start over.

    A row that cannot be formatted (a missing value, a wrong number of images) is skipped and counted as `bad_row`
    in the manifest's `num_skipped`, its ids left empty, like pretraining's skipped rows.
    """
    output_dir = Path(output_dir)
    if len(dataset) == 0:
        raise ValueError("Cannot pre-tokenize an empty dataset.")
    if task is None:
        if task_column not in dataset.column_names:
            raise ValueError(f"Give `task`, or a `task_column` ({task_column!r} is not a column of the dataset).")
        for name in sorted(set(dataset.unique(task_column))):
            check_task_columns(name, dataset.column_names)
    else:
        check_task_columns(task, dataset.column_names)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive.")
    claim_pretokenized_output(output_dir, overwrite, "training/pretokenize_sft.py")
    settings = {
        "format_version": FORMAT_VERSION, "kind": "sft", "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "num_source_rows": len(dataset), "task": task, "task_column": None if task else task_column, "seed": seed,
        "vocabulary": processor.model_config_fields(), "max_length": max_length, "batch_size": batch_size,
        "shard_size": shard_size, "retrieval": None,
    }

    def encode(part, start, progress):
        return _encode_shard(part, start, processor, task_column, task, seed, max_length, batch_size, progress)

    shards_dir = output_dir / SHARDS_DIR
    data, infos = build_in_shards(dataset, shards_dir, settings, encode, shard_size=shard_size,
                                  what="SFT pre-tokenization", desc="pre-tokenizing", unit="example",
                                  show_progress_bar=show_progress_bar)
    skipped = {reason: sum(info[reason] for info in infos) for reason in SFT_SKIP_REASONS}
    if sum(skipped.values()) == len(dataset):
        raise ValueError(f"SFT pre-tokenization kept no example: all {len(dataset)} rows were skipped ({skipped}; "
                         f"bad_row: a row missing a value or with the wrong number of images, too_long: longer than "
                         f"max_length={max_length}). Nothing was written.")
    data = save_dataset_atomically(data, output_dir / DATA_DIR)
    lengths = pc.list_value_length(data.data.column("input_ids"))
    counts = {}
    for name, length in zip(data["task"], lengths.to_pylist()):
        if length:
            counts[name] = counts.get(name, 0) + 1
    manifest = {
        **{k: v for k, v in settings.items() if k not in ("batch_size", "shard_size")},
        "num_rows": len(data), "num_examples": int(pc.sum(pc.greater(lengths, 0)).as_py() or 0),
        "num_examples_per_task": dict(sorted(counts.items())), "num_skipped": skipped,
        "num_tokens": int(pc.sum(lengths).as_py() or 0), "files": data_files(output_dir),
    }
    atomic_write_json(output_dir / MANIFEST_FILE, manifest)  # the commit point
    shutil.rmtree(shards_dir)
    return data


def balance(examples: Dataset, thresholds: tuple[float, float] = MIXTURE_THRESHOLDS, seed: int = 0,
            verbose: bool = True) -> Dataset:
    """`examples` (pre-tokenized, with a `task` column) re-sampled to the balanced mixture (`mixture_weights`,
    `balanced_rows`); prints each task's rows and weight when `verbose`. A `select` (indices), so nothing is copied."""
    tasks = np.asarray(examples["task"])
    names = sorted(set(tasks.tolist()))
    positions = {name: np.flatnonzero(tasks == name) for name in names}
    sizes = {name: len(positions[name]) for name in names}
    weights = mixture_weights(sizes, thresholds)
    rows = balanced_rows(sizes, weights, seed)
    if verbose:
        width = max(map(len, names))
        print("SFT mixture (task: rows -> rows after balancing, weight):")
        for name in names:
            print(f"  {name:<{width}}  {sizes[name]:>8,} -> {len(rows[name]):>8,}  x{weights[name]}")
    order = np.concatenate([positions[name][rows[name]] for name in names])
    return examples.select(np.sort(order))


__all__ = [
    "TASK_COLUMNS", "balance", "balanced_rows", "check_task_columns", "format_example", "format_messages",
    "mixture_weights",
    "pretokenize_sft",
]
