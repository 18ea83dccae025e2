"""`cm3leon-hf generate` and `cm3leon-hf demo` on a saved model directory (here a randomly initialised tiny model
with the shipped processor: these tests check the command, not the drawing; `tests/test_bundled_model.py` checks the
bundled model's images)."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon_hf.cli import DEMO_PROMPTS, caption_grid, main
from cm3leon_hf.pretrained import TINY_PATH
from conftest import HUB_CONFIGS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM, Cm3LeonProcessor

    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")).save_pretrained(path)
    Cm3LeonProcessor.from_pretrained(TINY_PATH).save_pretrained(path)
    return path


def test_generate_writes_the_image_itself_with_one_image(model_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert main(["generate", "a red circle at the top left", "-o", str(out), "--model", str(model_dir), "-n", "1", "-q"]) == 0
    assert Image.open(out).size == (64, 64)  # the image, not a captioned grid
    assert capsys.readouterr().out.strip() == f"wrote {out.resolve()}"
    several = tmp_path / "many.png"
    main(["generate", "a red circle at the top left", "-o", str(several), "--model", str(model_dir), "-n", "2", "-q"])
    assert not several.exists()
    first, second = (np.asarray(Image.open(tmp_path / f"many-{i}.png")) for i in (0, 1))
    assert first.shape == second.shape == (64, 64, 3) and not np.array_equal(first, second)


def test_quiet_prints_no_loading_bars(model_dir, tmp_path, capfd):
    main(["generate", "a red circle at the top left", "-o", str(tmp_path / "q.png"), "--model", str(model_dir), "-q"])
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "it/s" not in captured.err and "tok/s" not in captured.err


@pytest.mark.parametrize("make_output,message", [
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: tmp / "out", "give an image file name with a suffix such as .png"),
    (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt" / "out.png", "is a file, not a folder"),
])
def test_the_output_path_is_checked_before_generating(model_dir, tmp_path, make_output, message, monkeypatch):
    from transformers import Pipeline

    monkeypatch.setattr(Pipeline, "__init__", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(SystemExit, match=message):
        main(["generate", "a red circle", "-o", str(make_output(tmp_path)), "--model", str(model_dir), "-q"])


def test_an_unwritable_output_folder_is_named_before_generating(model_dir, tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root)")
        with pytest.raises(SystemExit, match=f"the folder {locked} is not writable"):
            main(["generate", "a red circle", "-o", str(locked / "sub" / "x.png"), "--model", str(model_dir), "-q"])
    finally:
        locked.chmod(0o700)


def test_generate_writes_one_captioned_row_with_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    assert main(["generate", "a red circle at the top left", "-o", str(out), "--model", str(model_dir), "-n", "3", "-q",
                 "--grid"]) == 0
    assert f"wrote {out.resolve()}" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape[1] >= 3 * 128 and grid.shape[0] == 22 + 128 + 2 * 4
    # The same seed gives the same images; another seed other ones.
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    main(["generate", "a red circle at the top left", "-o", str(again), "--model", str(model_dir), "-n", "3", "-q", "--grid"])
    main(["generate", "a red circle at the top left", "-o", str(other), "--model", str(model_dir), "-n", "3", "-q",
          "--seed", "1", "--grid"])
    assert np.array_equal(grid, np.asarray(Image.open(again)))
    assert not np.array_equal(grid, np.asarray(Image.open(other)))


def test_generate_reranks_candidates_with_the_worlds_clip(model_dir, tmp_path):
    out = tmp_path / "out.png"
    main(["generate", "a blue star on the left", "-o", str(out), "--model", str(model_dir), "-n", "1",
          "--num-candidates", "2", "--decoding", "pooled", "-q", "--grid"])
    assert Image.open(out).size[1] == 22 + 128 + 8


def test_demo_loads_the_reranker_once(model_dir, tmp_path, monkeypatch):
    import sentence_transformers

    loads = []
    real = sentence_transformers.SentenceTransformer
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", lambda *a, **k: loads.append(a) or real(*a, **k))
    main(["demo", "-o", str(tmp_path / "demo.png"), "--model", str(model_dir), "-n", "1", "--num-candidates", "2", "-q",
          "--prompts", *DEMO_PROMPTS[:3]])
    assert len(loads) == 1


def test_demo_writes_one_row_per_prompt(model_dir, tmp_path):
    out = tmp_path / "demo.png"
    main(["demo", "-o", str(out), "--model", str(model_dir), "-n", "1", "-q", "--prompts", *DEMO_PROMPTS[:2]])
    assert Image.open(out).size[1] == 2 * (22 + 128 + 4) + 4


def test_demo_adds_one_row_per_task_of_an_instruction_tuned_model(model_dir, tmp_path):
    """After the text-to-image rows, one row per task (`DEMO_TASKS`): the world's input image then the outputs, or the
    image and the model's own words for captions and answers; by default from the bundled instruction-tuned model."""
    from cm3leon_hf.cli import DEMO_TASKS, build_parser, task_rows
    from cm3leon_hf.pretrained import TINY_SFT_PATH
    from cm3leon_hf.synthetic import make_row

    rows = task_rows(model_dir, num_images=2, quiet=True)
    assert [text.split(":")[0] for text, _ in rows] == [label for label, _, _ in DEMO_TASKS]
    assert [len(images) for _, images in rows] == [2, 3, 3, 3, 3, 1, 1]
    edit = make_row("edit", "test", 0)
    assert rows[3][0] == f"edit: {edit['instruction']}"
    assert np.array_equal(np.asarray(rows[3][1][0]), np.asarray(edit["images"][0]))  # the source, then the edits
    assert all(image.size == (64, 64) for _, images in rows for image in images)
    assert rows[6][0].startswith(f"question: {make_row('vqa', 'test', 0)['question']} -> ")
    out = tmp_path / "demo.png"
    main(["demo", "-o", str(out), "--model", str(model_dir), "-n", "1", "--num-candidates", "1", "-q",
          "--tasks-model", str(model_dir)])
    assert Image.open(out).size[1] == (len(DEMO_PROMPTS) + len(DEMO_TASKS)) * (22 + 128 + 4) + 4
    assert build_parser().parse_args(["demo"]).tasks_model == str(TINY_SFT_PATH)
    assert build_parser().parse_args(["demo", "--no-tasks"]).tasks_model is None
    with pytest.raises(SystemExit, match="holds no model"):
        main(["demo", "-o", str(out), "--model", str(model_dir), "-n", "1", "--num-candidates", "1", "-q",
              "--tasks-model", str(tmp_path)])


def test_demo_draws_best_of_pooled_candidates_and_generate_samples_plainly():
    """`demo` shows the model at its best (the paper's pooled decoding, 32 candidates re-ranked by CLIP, 4 kept);
    `generate` defaults to the model's saved sampling, one sample per image."""
    from cm3leon_hf.cli import build_parser

    demo = build_parser().parse_args(["demo"])
    assert (demo.decoding, demo.num_candidates, demo.num_images) == ("pooled", 32, 4)
    generate = build_parser().parse_args(["generate", "a red circle"])
    assert (generate.decoding, generate.num_candidates, generate.guidance_scale) == ("top-p", None, None)


@pytest.mark.parametrize("prompt,unknown", [("xyzzy quux", "['xyzzy', 'quux']"), ("a cat on a mat", "['cat', 'mat']"),
                                            ("a bleu circle on a white backgorund", "['bleu', 'backgorund']")])
def test_prompt_with_unknown_words_is_refused_naming_them(model_dir, tmp_path, prompt, unknown):
    with pytest.raises(SystemExit, match=re.escape(f"never learned the words {unknown}")) as refused:
        main(["generate", prompt, "-o", str(tmp_path / "x.png"), "--model", str(model_dir), "-q"])
    assert "--allow-unknown-words" in str(refused.value)
    assert not (tmp_path / "x.png").exists()


def test_allow_unknown_words_generates_with_a_warning(model_dir, tmp_path):
    from cm3leon_hf.processing_cm3leon import UnknownWordsWarning

    with pytest.warns(UnknownWordsWarning, match="cat"):
        main(["generate", "a cat on a mat", "-o", str(tmp_path / "x.png"), "--model", str(model_dir), "-q",
              "--allow-unknown-words"])
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def test_upper_case_prompts_are_accepted_and_draw_the_lower_case_image(model_dir, tmp_path):
    main(["generate", DEMO_PROMPTS[0].upper(), "-o", str(tmp_path / "upper.png"), "--model", str(model_dir), "-q"])
    main(["generate", DEMO_PROMPTS[0], "-o", str(tmp_path / "lower.png"), "--model", str(model_dir), "-q"])
    assert (tmp_path / "upper.png").read_bytes() == (tmp_path / "lower.png").read_bytes()


def test_a_directory_without_a_model_is_named(tmp_path):
    with pytest.raises(SystemExit, match="holds no model"):
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--model", str(tmp_path)])


def test_help_says_which_decoding_draws_better(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "10 of 24" in text and "17 of 24" in text and "--allow-unknown-words" in text and "--grid" in text


def test_caption_grid_keeps_pixels_sharp():
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]] * 2, np.uint8))  # 2x2: red | blue columns
    grid = np.asarray(caption_grid([("x", [image])], cell=8))
    cell = grid[22 + 4 : 22 + 4 + 8, 4 : 4 + 8]
    assert (cell[:, :4] == [255, 0, 0]).all() and (cell[:, 4:] == [0, 0, 255]).all()  # nearest, no blur


@pytest.mark.parametrize("flags,message", [
    (["-n", "0"], "--num-images must be at least 1, got 0"),
    (["--num-candidates", "-2"], "--num-candidates must be at least 1"),
    (["--guidance-scale", "nan"], "`--guidance-scale` must be a finite number >= 0"),  # the library's one check
    (["--guidance-scale", "-1"], "`--guidance-scale` must be a finite number >= 0"),
    (["--guidance-scale", "x"], "--guidance-scale must be a number, got 'x'"),
    (["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--retrieve", "-1"], "--retrieve must be at least 0"),
    (["--threads", "two"], "--threads must be an integer, got 'two'"),
    (["--seed", str(2**70)], f"--seed must be at least 0 and at most {2**64 - 1}, got {2**70}"),
    (["--seed", "-1"], "--seed must be at least 0"),
])
def test_counts_and_scales_out_of_range_are_usage_errors(flags, message, capsys):
    """Checked before anything loads: a usage error that names the flag, not a traceback from the pipeline."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red star", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command,flags,message", [
    ("demo", ["-n", "2", "--num-candidates", "1"], "--num-candidates (1) must be at least -n/--num-images (2)"),
    ("generate", ["-n", "3", "--num-candidates", "2"], "--num-candidates (2) must be at least -n/--num-images (3)"),
    ("generate", ["-n", "2", "--num-candidates", "5000"], "re-ranking generates all 5000 candidates"),
    ("generate", ["-n", "2000", "--rerank"], "at most 1024"),
    ("generate", ["-n", "65", "--grid"], "--grid puts all images in one row: at most 64, got -n 65"),
])
def test_image_counts_that_cannot_work_are_refused_before_loading(command, flags, message, monkeypatch, tmp_path):
    """The demo used to keep 2 of "1 candidate" silently; a million re-ranked candidates tried to fill the memory."""
    from transformers import Pipeline

    monkeypatch.setattr(Pipeline, "__init__", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    argv = [command, *(["a red star"] if command == "generate" else []), "-o", str(tmp_path / "o.png"), *flags]
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(argv)


def test_many_images_are_drawn_in_batches_and_the_first_batch_is_unchanged(model_dir, tmp_path, monkeypatch):
    """Without re-ranking, -n N draws 16 images per batch and writes each batch's files before the next: memory does
    not grow with N, and up to 16 images are the one batch they always were."""
    import cm3leon_hf.cli as cli
    from transformers import Pipeline

    monkeypatch.setattr(cli, "CHUNK", 2)
    batches = []
    call = Pipeline.__call__
    monkeypatch.setattr(Pipeline, "__call__", lambda self, *a, **k: batches.append(k["num_images_per_prompt"]) or call(self, *a, **k))
    prompt = "a red circle at the top left"
    main(["generate", prompt, "-o", str(tmp_path / "m.png"), "--model", str(model_dir), "-n", "5", "-q", "--seed", "3"])
    assert batches == [2, 2, 1]
    main(["generate", prompt, "-o", str(tmp_path / "two.png"), "--model", str(model_dir), "-n", "2", "-q", "--seed", "3"])
    images = [np.asarray(Image.open(tmp_path / f"m-{i}.png")) for i in range(5)]
    assert all(np.array_equal(images[i], np.asarray(Image.open(tmp_path / f"two-{i}.png"))) for i in (0, 1))
    assert len({image.tobytes() for image in images}) == 5  # the generator carries on: no batch repeats another


def test_a_prompt_that_is_not_utf8_is_named(model_dir, tmp_path):
    prompt = b"a red \xff star".decode("utf-8", errors="surrogateescape")  # what Python makes of such argv bytes
    with pytest.raises(SystemExit, match="not UTF-8 text: the byte 0xff at character 6"):
        main(["generate", prompt, "-o", str(tmp_path / "o.png"), "--model", str(model_dir), "-q"])


def test_the_largest_seed_draws(model_dir, tmp_path):
    out = tmp_path / "s.png"
    assert main(["generate", "a red star", "-o", str(out), "--model", str(model_dir), "-q", "--seed", str(2**64 - 1)]) == 0
    assert Image.open(out).size == (64, 64)
