"""`cm3leon-hf generate` and `cm3leon-hf demo` on a saved model directory (here a randomly initialised tiny model
with the shipped processor: these tests check the command, not the drawing; `tests/test_bundled_model.py` checks the
bundled model's images)."""

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon_hf.cli import DEMO_PROMPTS, caption_grid, known_words, main
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


def test_generate_writes_one_captioned_row_and_says_where(model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    assert main(["generate", "a red circle at the top left", "-o", str(out), "--model", str(model_dir), "-n", "3", "-q"]) == 0
    assert f"wrote {out.resolve()}" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape[1] >= 3 * 128 and grid.shape[0] == 22 + 128 + 2 * 4
    # The same seed gives the same images; another seed other ones.
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    main(["generate", "a red circle at the top left", "-o", str(again), "--model", str(model_dir), "-n", "3", "-q"])
    main(["generate", "a red circle at the top left", "-o", str(other), "--model", str(model_dir), "-n", "3", "-q",
          "--seed", "1"])
    assert np.array_equal(grid, np.asarray(Image.open(again)))
    assert not np.array_equal(grid, np.asarray(Image.open(other)))


def test_generate_reranks_candidates_with_the_worlds_clip(model_dir, tmp_path):
    out = tmp_path / "out.png"
    main(["generate", "a blue star on the left", "-o", str(out), "--model", str(model_dir), "-n", "1",
          "--num-candidates", "2", "--decoding", "pooled", "-q"])
    assert Image.open(out).size[1] == 22 + 128 + 8


def test_demo_writes_one_row_per_prompt(model_dir, tmp_path):
    out = tmp_path / "demo.png"
    main(["demo", "-o", str(out), "--model", str(model_dir), "-n", "1", "-q", "--prompts", *DEMO_PROMPTS[:2]])
    assert Image.open(out).size[1] == 2 * (22 + 128 + 4) + 4


def test_demo_draws_best_of_pooled_candidates_and_generate_samples_plainly():
    """`demo` shows the model at its best (the paper's pooled decoding, 32 candidates re-ranked by CLIP, 4 kept);
    `generate` defaults to the model's saved sampling, one sample per image."""
    from cm3leon_hf.cli import build_parser

    demo = build_parser().parse_args(["demo"])
    assert (demo.decoding, demo.num_candidates, demo.num_images) == ("pooled", 32, 4)
    generate = build_parser().parse_args(["generate", "a red circle"])
    assert (generate.decoding, generate.num_candidates, generate.guidance_scale) == ("top-p", None, None)


def test_prompt_without_a_known_word_is_refused_with_the_reason(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="none of the words of 'xyzzy quux'"):
        main(["generate", "xyzzy quux", "-o", str(tmp_path / "x.png"), "--model", str(model_dir), "-q"])
    assert not (tmp_path / "x.png").exists()


def test_a_directory_without_a_model_is_named(tmp_path):
    with pytest.raises(SystemExit, match="holds no model"):
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--model", str(tmp_path)])


def test_known_words_are_whole_tokens(model_dir):
    from cm3leon_hf import Cm3LeonProcessor

    tokenizer = Cm3LeonProcessor.from_pretrained(TINY_PATH).tokenizer
    assert known_words(tokenizer, "A Red xyzzy circle") == ["a", "red", "circle"]
    assert known_words(tokenizer, "日本 qqq") == []


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
])
def test_counts_and_scales_out_of_range_are_usage_errors(flags, message, capsys):
    """Checked before anything loads: a usage error that names the flag, not a traceback from the pipeline."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red star", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
