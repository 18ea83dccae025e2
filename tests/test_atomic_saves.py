"""Saves are written as a whole: a process killed (SIGKILL) at any point while saving a model, a processor or a memory
bank over an earlier copy leaves a directory that loads as the old copy or the new one, never a mix and never an
error."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.atomic import atomic_directory, atomic_file, atomic_write_json, read_manifest
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
    elif kind == "bank":  # banks of 16 and 24 pairs: `len` of what loads says which one it is
        import datasets
        from sentence_transformers import SentenceTransformer
        from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
        from cm3leon_hf.pretrained import CLIP_PATH

        pairs = datasets.load_from_disk(sys.argv[3])
        encoder = SentenceTransformer(str(CLIP_PATH))

        class Bank:
            def __init__(self, rows):
                self.rows = pairs.select(range(rows))

            def save_pretrained(self, path):
                Cm3LeonMemoryBank.build(self.rows, encoder, path, text_column="caption", image_column="images",
                                        overwrite=True, show_progress_bar=False)

        versions = [Bank(16), Bank(24)]
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


def kill_while_saving(kind: str, path, delay: float, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", SAVER, kind, str(path), *extra], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "processor", "bank"])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_copy(kind, tmp_path):
    path = tmp_path / kind
    extra = []
    delays = (0.0, 0.03, 0.07, 0.12, 0.2, 0.3, 0.45, 0.6)  # spread over the phases of the save loop
    if kind == "bank":
        from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
        from cm3leon_hf.synthetic import build_task

        pairs_dir = tmp_path.parent / f"{tmp_path.name}-pairs"  # outside tmp_path: only the bank's files are in it
        build_task("text_to_image", num_train=24, num_validation=0, num_test=0, num_heldout=0)["train"].save_to_disk(pairs_dir)
        extra = [str(pairs_dir)]
        delays = (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.7, 1.0, 1.4)  # a build takes longer than a model's save

        def version_of(directory):
            try:
                loaded = Cm3LeonMemoryBank.load(directory, verify=True)
            except Exception:  # noqa: BLE001 - a partial build that does not load counts as neither version
                return []
            return [i for i, rows in enumerate((16, 24)) if len(loaded) == rows]
    elif kind == "model":
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
    for delay in delays:
        kill_while_saving(kind, path, delay, *extra)
        # Killed before the first save finished: nothing was there to keep (a bank's first build leaves its shards to
        # resume from, without a manifest; loading says so).
        if not seen and (not path.exists() or (kind == "bank" and not (path / "manifest.json").exists())):
            continue
        versions = version_of(path)
        assert len(versions) == 1, f"killed after {delay}s: neither version loads"
        seen.update(versions)
    assert seen, "no save finished in any trial"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != kind]
    if kind == "bank":  # the next build over it resumes or clears what killed builds left behind
        import datasets
        from sentence_transformers import SentenceTransformer

        from cm3leon_hf.pretrained import CLIP_PATH

        Cm3LeonMemoryBank.build(datasets.load_from_disk(pairs_dir), SentenceTransformer(str(CLIP_PATH)), path,
                                text_column="caption", image_column="images", overwrite=True, show_progress_bar=False)
        assert len(Cm3LeonMemoryBank.load(path)) == 24
    else:
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


def test_an_output_folder_linked_to_another_disk_stays_a_link(tmp_path):
    """A run's output folder that is a symbolic link (e.g. onto a bigger disk): the final save writes into the folder it
    points to and keeps the link (it failed before: the swap tried to delete the link as a directory)."""
    from cm3leon_hf import Cm3LeonConfig

    (tmp_path / "disk" / "run" / "checkpoint-6").mkdir(parents=True)
    (tmp_path / "disk" / "run" / "checkpoint-6" / "model.safetensors").write_bytes(b"a checkpoint's weights")
    (tmp_path / "run").symlink_to(tmp_path / "disk" / "run")
    model = Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny"))
    model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run").is_symlink() and (tmp_path / "disk" / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-6" / "model.safetensors").read_bytes() == b"a checkpoint's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "run"]  # nothing left beside the link
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["run"]
    Cm3LeonForCausalLM.from_pretrained(tmp_path / "run")


def test_a_file_written_atomically_is_the_old_one_until_its_writer_succeeds(tmp_path):
    """`atomic_file` (the memory bank's index, the builds' JSON): a failed writer leaves the old file and nothing else,
    a killed writer's leftover goes with the next write, and the file gets the mode open() gives."""
    path = tmp_path / "index.faiss"
    path.write_bytes(b"old")
    (tmp_path / ".index.faiss.tmp-0123456789ab").write_bytes(b"half")  # what a killed write leaves
    with pytest.raises(RuntimeError, match="the writer failed"), atomic_file(path) as tmp:
        tmp.write_bytes(b"half of the new one")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["index.faiss"]
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["index.faiss"]
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_json(tmp_path / "manifest.json", {"b": 1, "a": [2]})
    assert (tmp_path / "manifest.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}'
    assert os.stat(tmp_path / "manifest.json").st_mode & 0o777 == 0o666 & ~umask


def test_read_manifest_says_what_is_wrong(tmp_path):
    """The manifest a resumable build writes last: missing (unfinished when its shards are there), not JSON, another
    format, a key missing; each error names the directory's kind."""
    def read(**kwargs):
        return read_manifest(tmp_path, "pre-tokenized data", "an unfinished run: re-run the command to resume",
                             format_version=2, name="pre-tokenized", redo="Redo it.", **kwargs)

    with pytest.raises(ValueError, match=r"is not pre-tokenized data: manifest.json is missing\.$"):
        read()
    (tmp_path / "shards").mkdir()
    with pytest.raises(ValueError, match=r"missing \(an unfinished run: re-run the command to resume\)\.$"):
        read()
    for text, message in [("{", r"^Pre-tokenized .*: manifest.json is not valid JSON \(.*\)\. Redo it\.$"),
                          ("[]", "^Unsupported pre-tokenized format None in "),
                          ('{"format_version": 1}', "^Unsupported pre-tokenized format 1 in "),
                          ('{"format_version": 2}', r"manifest.json lacks \['num_rows'\]\. Redo it\.$")]:
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            read(required=("num_rows",))
    assert read() == {"format_version": 2}
