"""Task builders: schema, determinism, splits, and that every row says what its images show."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from cm3leon_hf.synthetic import drawing as R
from cm3leon_hf.synthetic.evaluator import read_scene, score
from cm3leon_hf.synthetic.parsing import answer_question, apply_instruction, parse_caption, parse_instruction
from cm3leon_hf.synthetic.scene import Scene
from cm3leon_hf.synthetic.tasks import (
    FEATURES,
    SPLITS,
    TASKS,
    build_row,
    build_task,
    build_tasks,
    contains_heldout,
    make_row,
    row_scenes,
)

ROWS_PER_TASK = 2000  # the "≥ 2,000 random scenes of every task"


def _rows(task, n=ROWS_PER_TASK, resolution=64):
    """n rows cycling through the four splits."""
    return [build_row(task, SPLITS[i % 4], i // 4, seed=7, resolution=resolution) for i in range(n)]


@pytest.fixture(scope="module")
def rows():
    return {task: _rows(task) for task in TASKS}


def _table_bytes(ds: datasets.Dataset) -> bytes:
    sink = io.BytesIO()
    import pyarrow as pa

    with pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
        writer.write_table(ds.data.table)
    return sink.getvalue()


# ------------------------------------------------------------------------------------ schema and splits


def test_every_task_builds_a_datasetdict_with_the_shared_schema(tmp_path):
    built = build_tasks(num_train=3, num_validation=2, num_test=2, num_heldout=2, cache_dir=str(tmp_path))
    assert set(built) == set(SPLITS)
    for split, ds in built.items():
        assert ds.features == FEATURES
        assert sorted(set(ds["task"])) == sorted(TASKS)
        for row in ds:
            assert row["text"].count("<image>") == len(row["images"]) >= 1
            assert " <break> " in row["text"]
            assert all(im.mode == "RGB" and im.size == (64, 64) for im in row["images"])
            assert parse_caption(row["caption"]).key() == Scene.from_json(row["scene"]).key()
            assert len(row["boxes"]) == len(Scene.from_json(row["scene"]).objects)


def test_text_follows_the_paper_templates(rows):
    prefixes = {
        "caption": ("Describe the given picture. ", "Describe the given picture in very detail. ",
                    "Describe all the objects in the given image in very detail. ",
                    "Generate a long caption for the given image. "),
        "vqa": ("Question: ",),
        "edit": ("Edit the image following the text instruction <break> <image> <break> ",
                 "Edit first image following the instruction <break> <image> <break> "),
        "spatial": ("Generate high quality image of ", "Fabricate an image of "),
        "structure": ("Make high quality image from canny edge features", "Make high quality image from a segmentation map"),
        "infill": ("Fill in the missing region (", "Restore the masked region ("),
    }  # fmt: skip
    for task, starts in prefixes.items():
        texts = [r["text"] for r in rows[task][:400]]
        assert all(t.startswith(starts) for t in texts)
        assert {next(s for s in starts if t.startswith(s)) for t in texts} == set(starts)  # every template used
    for r in rows["text_to_image"][:200]:
        assert r["text"] == f"{r['caption']} <break> <image>"
    vqa_forms = {"Answer: ", "The answer is ", "\n"}
    assert {next(f for f in vqa_forms if f in r["text"]) for r in rows["vqa"][:200]} == vqa_forms
    for r in rows["vqa"][:200]:
        assert r["question"] in r["text"] and r["answer"] in r["text"]


def test_fields_a_task_does_not_use_are_none():
    used = {
        "text_to_image": set(), "caption": set(), "vqa": {"question", "answer"},
        "edit": {"source_scene", "instruction", "edit"}, "spatial": set(), "structure": {"condition"},
        "infill": {"region"},
    }  # fmt: skip
    optional = {"source_scene", "question", "answer", "instruction", "edit", "condition", "region"}
    for task in TASKS:
        row = make_row(task, "train", 3)
        assert {k for k in optional if row[k] is not None} == used[task]


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_arrow_data_whatever_the_chunking(tmp_path):
    kwargs = dict(num_train=25, num_validation=5, num_test=5, num_heldout=5, seed=3)
    a = build_task("edit", cache_dir=str(tmp_path / "a"), **kwargs)
    b = build_task("edit", cache_dir=str(tmp_path / "b"), shard_size=4, **kwargs)
    c = build_task("edit", cache_dir=str(tmp_path / "c"), seed=4, **{k: v for k, v in kwargs.items() if k != "seed"})
    for split in SPLITS:
        assert _table_bytes(a[split]) == _table_bytes(b[split])
        assert _table_bytes(a[split]) != _table_bytes(c[split])
    # row i is reproducible on its own
    for i in (0, 13, 24):
        alone = make_row("edit", "train", i, seed=3)
        stored = a["train"][i]
        assert stored["text"] == alone["text"] and stored["scene"] == alone["scene"]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(stored["images"], alone["images"]))


def test_different_seeds_and_splits_differ():
    assert make_row("vqa", "train", 0, seed=0)["scene"] != make_row("vqa", "train", 0, seed=1)["scene"]
    assert make_row("vqa", "train", 0)["scene"] != make_row("vqa", "test", 0)["scene"]
    assert make_row("vqa", "train", 0)["scene"] != make_row("caption", "train", 0)["scene"]


def test_builder_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        build_row("poetry", "train", 0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_row("vqa", "dev", 0)
    with pytest.raises(ValueError, match="resolution 48 is below the minimum 64"):
        build_task("vqa", num_train=1, resolution=48)
    with pytest.raises(ValueError, match="num_test must be a non-negative int"):
        build_task("vqa", num_train=1, num_test=-1)


def test_heldout_combinations_never_reach_train_validation_test(rows):
    for task in TASKS:
        for i, row in enumerate(rows[task]):
            assert contains_heldout(row) == (SPLITS[i % 4] == "heldout"), (task, i)


# ------------------------------------------------------------------------------------ evaluator exactness


@pytest.mark.parametrize("task", TASKS)
def test_evaluator_reads_every_image_of_every_task_exactly(rows, task):
    checked = 0
    for row in rows[task]:
        for image, scene in zip(row["images"], row_scenes(row)):
            if scene is not None:
                assert read_scene(image).key() == scene.key()
                checked += 1
        # the stored scene JSON re-renders the target image bit for bit
        assert np.array_equal(R.render_array(Scene.from_json(row["scene"]), 64), row["images"][-1])
    assert checked >= ROWS_PER_TASK


@pytest.mark.parametrize("task", TASKS)
def test_evaluator_is_exact_at_256(task):
    for row in _rows(task, n=40, resolution=256):
        for image, scene in zip(row["images"], row_scenes(row)):
            assert image.shape == (256, 256, 3)
            if scene is not None:
                assert read_scene(image).key() == scene.key()


def _diff(before: Scene, after: Scene) -> tuple:
    """What changed between two read-back scenes, as (op, details)."""
    a = {o.position: o for o in before.objects}
    b = {o.position: o for o in after.objects}
    if len(b) == len(a) + 1:
        (new,) = set(b) - set(a)
        return ("add", b[new].shape, b[new].color, b[new].size, new)
    if len(b) == len(a) - 1:
        (gone,) = set(a) - set(b)
        return ("remove", a[gone].shape, a[gone].color, a[gone].size, gone)
    if set(a) == set(b):
        changed = [p for p in a if a[p] != b[p]]
        assert len(changed) == 1 and (a[changed[0]].shape, a[changed[0]].size) == (b[changed[0]].shape, b[changed[0]].size)
        return ("recolor", b[changed[0]].color, changed[0])
    (src,), (dst,) = set(a) - set(b), set(b) - set(a)
    assert (a[src].shape, a[src].color, a[src].size) == (b[dst].shape, b[dst].color, b[dst].size)
    return ("move", src, dst)


def test_edits_are_exactly_what_the_instruction_says(rows):
    ops = set()
    for row in rows["edit"]:
        before, after = (read_scene(image) for image in row["images"])
        edit = parse_instruction(row["instruction"])
        assert edit.op == row["edit"]
        ops.add(edit.op)
        change = _diff(before, after)
        assert change[0] == edit.op
        if edit.op == "recolor":
            assert change[1] == edit.color
            target = before.objects[[o.position for o in before.objects].index(change[2])]
        elif edit.op == "move":
            assert change[2] == edit.position
            target = before.objects[[o.position for o in before.objects].index(change[1])]
        elif edit.op == "remove":
            target = before.objects[[o.position for o in before.objects].index(change[4])]
        else:
            target = edit.target
            assert change[1:] == (target.shape, target.color, target.size, target.position)
        for attr in ("shape", "color", "size", "position"):  # the instruction names the changed object
            assert getattr(edit.target, attr) in (None, getattr(target, attr))
        assert apply_instruction(before, row["instruction"]).key() == after.key()
    assert ops == {"recolor", "move", "remove", "add"}


def test_vqa_answers_are_what_the_image_shows(rows):
    kinds = set()
    for row in rows["vqa"]:
        assert answer_question(read_scene(row["images"][0]), row["question"]) == row["answer"]
        kinds.add(row["question"].split()[0] + " " + row["question"].split()[1])
    assert {"what colour", "what shape", "what size", "where is", "how many", "is there"} <= kinds


def test_spatial_prompts_parse_to_the_scene_and_boxes_match(rows):
    for row in rows["spatial"][:500]:
        prompt = row["text"].split(" <break> ")[0]
        target = parse_caption(prompt)
        assert target.key() == Scene.from_json(row["scene"]).key()
        result = score(Image.fromarray(row["images"][0]), prompt)
        assert result["scene_correct"] and result["box_iou"] == 1.0


def test_structure_conditions_and_infill_regions(rows):
    conditions = set()
    for row in rows["structure"][:300]:
        scene = Scene.from_json(row["scene"])
        expected = (R.edge_array if row["condition"] == "edge" else R.segmentation_array)(scene, 64)
        assert np.array_equal(row["images"][0], expected)
        conditions.add(row["condition"])
    assert conditions == {"edge", "segmentation"}
    for row in rows["infill"][:300]:
        x0, y0, x1, y1 = row["region"]
        assert x0 % 32 == y0 % 32 == 0 and (x1 + 1) % 32 == (y1 + 1) % 32 == 0
        masked, full = row["images"]
        region = np.zeros((64, 64), bool)
        region[y0 // 4 : (y1 + 1) // 4, x0 // 4 : (x1 + 1) // 4] = True
        assert np.all(masked[region] == R.MASK_COLOR) and np.array_equal(masked[~region], full[~region])
        # the region covers at least one whole object
        boxes = [b["box"] for b in row["boxes"]]
        assert any(x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1 for b in boxes)
