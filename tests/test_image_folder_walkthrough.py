"""Issue 26 item 4: README's "Your own pictures" walk-through, run as written on a fresh clone of this repository.

Its Python block draws a folder of pictures (any size, captions in `metadata.jsonl`) and saves a random-weights Janus
VQ-VAE; its shell block converts that VQ-VAE into a processor and config, pre-tokenizes the folder as a `datasets`
imagefolder, pretrains a few steps and generates a picture with the CLI. Every command runs for real in the clone's
root (the README's `python training/...` commands are otherwise only checked against their `--help`).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

SECTION = "## Your own pictures, with a public image tokenizer"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def section_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text[start:end if end >= 0 else None])]


def fresh_clone(target):
    """The repository as a user clones it: git's committed files (a checkout without git: its tracked folders)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True)
    else:
        for folder in ("src", "training", "hub_configs"):
            shutil.copytree(REPO / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_the_image_folder_walkthrough_runs_as_written(tmp_path):
    blocks = section_blocks()
    assert [language for language, _ in blocks] == ["python", "bash"]
    clone = tmp_path / "clone"
    fresh_clone(clone)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}")
    (clone / "block.py").write_text(blocks[0][1])
    result = subprocess.run([sys.executable, "block.py"], cwd=clone, env={**env, "PYTHONPATH": str(clone / "src")},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    joined = re.sub(r"\\\n\s*", " ", blocks[1][1])
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    for words in filter(None, commands):
        if words[0] == "export":
            env.update(word.split("=", 1) for word in words[1:])
            continue
        if words[0] == "python":
            words = [sys.executable, *words[1:]]
        else:
            assert words[0] == "cm3leon-hf", words  # the CLI, as the package installs it, from the clone's code
            words = [sys.executable, "-c", "import sys; from cm3leon_hf.cli import main; sys.exit(main())", *words[1:]]
        run_env = {**env, "PYTHONPATH": str(clone / env["PYTHONPATH"])} if "PYTHONPATH" in env else env
        result = subprocess.run(words, cwd=clone, env=run_env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-4000:]}"

    config = json.loads((clone / "my-picture-model" / "config.json").read_text())
    assert (config["image_vocab_size"], config["image_seq_length"]) == (256, 64)
    manifest = json.loads((clone / "my-picture-tokens" / "manifest.json").read_text())
    assert manifest["num_examples"] == 48
    saved = json.loads((clone / "my-picture-model" / "image_tokenizer" /
                        "transformers_image_tokenizer_config.json").read_text())
    assert saved["vq_model_class"] == "JanusVQVAE"
    with Image.open(clone / "my-red-circle.png") as picture:
        assert min(picture.size) >= 32  # the 32x32 picture (with its caption, as the CLI writes one image)
