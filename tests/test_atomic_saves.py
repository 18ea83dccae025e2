"""Saves are written as a whole: a process killed (SIGKILL) at any point while saving a model or a processor over an
earlier copy leaves a directory that loads as the old copy or the new one, never a mix and never an error."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.atomic import atomic_directory
from cm3leon_hf.pretrained import TINY_PATH
from conftest import HUB_CONFIGS, REPO

# The child alternates between two versions, saving each over the other in a loop, until it is killed.
SAVER = textwrap.dedent(
    """
    import sys
    import torch
    from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM, Cm3LeonProcessor

    kind, path = sys.argv[1], sys.argv[2]
    if kind == "model":  # two versions of other shapes: a mix of their files does not load as either
        config = Cm3LeonConfig.from_pretrained({configs!r} + "/cm3leon-tiny")
        versions = []
        for seed, layers in ((1, 4), (2, 2)):
            torch.manual_seed(seed)
            versions.append(Cm3LeonForCausalLM(Cm3LeonConfig(**{{**config.to_dict(), "num_hidden_layers": layers}})))
    else:
        processor = Cm3LeonProcessor.from_pretrained({tiny!r})
        other = Cm3LeonProcessor.from_pretrained({tiny!r}, prepend_eos=False)  # differs in both of its files
        other.image_tokenizer.resample = "nearest"
        versions = [processor, other]
    print("ready", flush=True)
    i = 0
    while True:
        versions[i % 2].save_pretrained(path)
        i += 1
    """
).format(configs=str(HUB_CONFIGS), tiny=str(TINY_PATH))


def kill_while_saving(kind: str, path, delay: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", SAVER, kind, str(path)], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "processor"])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_copy(kind, tmp_path):
    path = tmp_path / kind
    if kind == "model":
        from cm3leon_hf import Cm3LeonConfig

        config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
        expected = []
        for seed, layers in ((1, 4), (2, 2)):
            torch.manual_seed(seed)
            expected.append(Cm3LeonForCausalLM(Cm3LeonConfig(**{**config.to_dict(), "num_hidden_layers": layers})).state_dict())

        def version_of(directory):
            try:
                loaded = Cm3LeonForCausalLM.from_pretrained(directory).state_dict()
            except Exception:  # noqa: BLE001 - a partial save that does not load counts as neither version
                return []
            return [i for i, state in enumerate(expected)
                    if state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)]
    else:
        def version_of(directory):
            try:
                loaded = Cm3LeonProcessor.from_pretrained(directory)
            except Exception:  # noqa: BLE001 - a partial save that does not load counts as neither version
                return []
            state = (loaded.prepend_eos, loaded.image_tokenizer.resample)
            return [i for i, v in enumerate([(True, "bicubic"), (False, "nearest")]) if v == state]

    seen = set()
    for delay in (0.0, 0.03, 0.07, 0.12, 0.2, 0.3, 0.45, 0.6):  # spread over the phases of the save loop
        kill_while_saving(kind, path, delay)
        if not path.exists():  # killed before the first save finished: nothing was there to keep
            continue
        versions = version_of(path)
        assert len(versions) == 1, f"killed after {delay}s: neither version loads"
        seen.update(versions)
    assert seen, "no save finished in any trial"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != kind]
    with atomic_directory(path) as staging:  # the next write clears what killed writes left behind
        (staging / "x").write_text("x")
    assert not [p.name for p in tmp_path.iterdir() if p.name != kind], leftovers


def test_a_model_saved_beside_a_processor_keeps_it_and_loses_stale_weights(tmp_path):
    from cm3leon_hf import Cm3LeonConfig

    processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    processor.save_pretrained(tmp_path)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"stale")  # an earlier, sharded save
    model = Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny"))
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "image_tokenizer"} <= names
    assert "model-00001-of-00002.safetensors" not in names
    Cm3LeonProcessor.from_pretrained(tmp_path, model_config=Cm3LeonForCausalLM.from_pretrained(tmp_path).config)
    # A new directory gets the mode a plain mkdir gives (not the temporary directory's private 0700).
    model.save_pretrained(tmp_path / "fresh")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "fresh").st_mode & 0o777 == 0o777 & ~umask
    # The model card is written through a temporary file (0600) but lands with open()'s mode, as config.json does
    # (transformers itself writes model.safetensors 0600, for OPT too).
    for name in ("README.md", "config.json"):
        assert os.stat(tmp_path / "fresh" / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_files_in_subdirectories_are_always_kept(tmp_path):
    """A training run saves its final model into the directory that holds its checkpoints."""
    from cm3leon_hf import Cm3LeonConfig

    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"a checkpoint's weights")
    Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")).save_pretrained(tmp_path)
    assert (tmp_path / "checkpoint-6" / "model.safetensors").read_bytes() == b"a checkpoint's weights"
