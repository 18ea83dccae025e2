"""Every code block of README.md, as written, from a directory outside the repository, offline.

- Python blocks run in order in one fresh interpreter and one namespace (a reader going down the page), in a temporary
  directory: a block may use what an earlier one defined or wrote there, never a file of the repository. A failure
  names the block's line in README.md.
- Shell blocks run after them, command by command: `cm3leon-hf ...` for real (in the same temporary directory, so
  `--model my-cm3leon` is the folder a Python block saved; a model that the README's training commands make is left
  to `tests/test_image_folder_walkthrough.py`, which runs those commands for real); `make <target>` as a dry run (`make -n`: the recipe
  exists; `make test` is this suite); `python training/<script>.py ...` and other repository scripts, which train for
  minutes to hours, are checked against their own `--help`: the script exists and accepts every flag the README
  gives it. Any other command fails the test until this file learns how to check it.
"""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """`(line, code)` of every fenced block in `language`, in order; `line` is the block's first line in README.md."""
    text = README.read_text()
    return [(text[: m.start(2)].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


RUNNER = textwrap.dedent(
    """
    import json, sys
    blocks = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__main__"}
    for line, code in blocks:
        print(f"--- README.md:{line}", flush=True)
        # Padded so that a traceback's line numbers are README.md's.
        exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
    print("--- all blocks ran", flush=True)
    """
)


def user_environment() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return env


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """Where the user runs the README: outside the repository, its Python blocks' outputs left there."""
    import json

    directory = tmp_path_factory.mktemp("readme-user")
    assert REPO not in directory.parents
    blocks = readme_blocks("python")
    (directory / "blocks.json").write_text(json.dumps(blocks))
    (directory / "runner.py").write_text(RUNNER)
    result = subprocess.run([sys.executable, "runner.py", "blocks.json"], cwd=directory, env=user_environment(),
                            capture_output=True, text=True, timeout=1200)
    directory.joinpath("python.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0 and "--- all blocks ran" in result.stdout, (
        f"a README Python block failed (the last '--- README.md:N' is the block):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return directory


def test_the_readme_has_python_and_shell_blocks():
    assert len(readme_blocks("python")) >= 8 and len(readme_blocks("bash")) >= 4


def test_every_python_block_runs_as_written(user_dir):
    assert "--- all blocks ran" in (user_dir / "python.log").read_text()


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: comments dropped, continuation lines joined, each split as the shell would."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


SHELL_COMMANDS = [(line, words) for line, code in readme_blocks("bash") for words in shell_commands(code)]
# What the README's training commands write (`python training/... --output_dir X`).
TRAINED_BY_README = {words[words.index("--output_dir") + 1] for _, words in SHELL_COMMANDS
                     if words[0] == "python" and "--output_dir" in words}
WALKTHROUGH_TEST = REPO / "tests" / "test_image_folder_walkthrough.py"


@pytest.mark.parametrize("line,words", SHELL_COMMANDS, ids=[f"README.md:{line}:{' '.join(w)[:60]}" for line, w in SHELL_COMMANDS])
def test_every_shell_command_is_as_written(line, words, user_dir):
    env = user_environment()
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value command ...
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "export":
        assert all(re.fullmatch(r"[A-Z_]+=\S*", w) for w in words[1:]), words
        return
    if words[0] == "make":
        assert len(words) == 2, words
        result = subprocess.run(["make", "-n", words[1]], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return
    if words[0] == "cm3leon-hf":
        if "--model" in words and words[words.index("--model") + 1] in TRAINED_BY_README:
            # a model the README's own training commands make: tests/test_image_folder_walkthrough.py runs those
            # commands for real and then this one
            assert WALKTHROUGH_TEST.is_file()
            return
        result = subprocess.run(words, cwd=user_dir, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        if "-o" in words:
            output = user_dir / words[words.index("-o") + 1]
            assert output.is_file() and output.stat().st_size > 0
        return
    if words[0] in ("python", "torchrun") or words[:2] == ["accelerate", "launch"]:
        scripts = [w for w in words if w.endswith(".py")]
        assert len(scripts) == 1, f"README.md:{line}: which script? {words}"
        script = REPO / scripts[0]
        assert script.is_file(), f"README.md:{line}: {scripts[0]} is not in the repository"
        env["PYTHONPATH"] = str(REPO / "src")
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        flags = {w.split("=", 1)[0] for w in words[words.index(scripts[0]) + 1:] if w.startswith("--")}
        unknown = sorted(flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout))
        assert not unknown, f"README.md:{line}: {scripts[0]} does not take {unknown}"
        for argument in words[words.index(scripts[0]) + 1:]:  # files the command reads from the repository
            if re.fullmatch(r"training/recipes/\S+\.ya?ml", argument):
                assert (REPO / argument).is_file(), f"README.md:{line}: {argument} does not exist"
        return
    pytest.fail(f"README.md:{line}: the README test does not know how to check {words[0]!r}; teach it")
