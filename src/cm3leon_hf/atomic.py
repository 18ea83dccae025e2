"""Files and directories written as a whole: a reader, or a kill, sees the old copy or the new one, never a mix.

Saving a model, a processor or a memory bank writes several files; transformers and `datasets` write them in place, so a
kill in the middle leaves a new `config.json` beside old weights. `atomic_directory` writes into a temporary sibling
and swaps it in; `atomic_file` does the same for one file (a faiss index, a manifest: `atomic_write_json`), as
huggingface_hub downloads into a process-unique `.incomplete` file and renames it. `read_manifest` opens the
`manifest.json` that such a build writes last, as its commit point. Standard library only: the saved models' remote
code imports it.
"""

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`): every reader, and every kill, sees one
    arrangement or the other. Returns False where the OS or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(new: Path, path: Path) -> None:
    """Put the directory `new` at `path` and delete what was there. Where the OS can swap two directories (Linux) this
    is atomic: the old directory or the new one, never a mix and never neither. Elsewhere it takes two renames, and a
    kill between them leaves the old directory beside `path` as `.<name>.old-<pid>`."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
    elif exchange_paths(new, path):
        shutil.rmtree(new)  # now the old content
    else:
        backup = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, backup)
        os.replace(new, path)
        shutil.rmtree(backup)


def _carry_over(source: Path, target: Path, skip: Callable[[str], bool]) -> None:
    """Hard-link (or copy) into `target` every file of `source` that `target` lacks, except the top-level files
    `skip` names (what lies in subdirectories, e.g. a run's checkpoints, is other savers' and always kept)."""
    for root, _, files in os.walk(source):
        relative = Path(root).relative_to(source)
        for name in files:
            if (relative == Path(".") and skip(name)) or (target / relative / name).exists():
                continue
            (target / relative).mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(root) / name, target / relative / name)
            except OSError:
                shutil.copy2(Path(root) / name, target / relative / name)


@contextlib.contextmanager
def atomic_directory(path, keep_existing: bool = True, skip: Callable[[str], bool] = lambda name: False):
    """Write a directory as a whole: yields a temporary sibling of `path` to write into and, when the block ends
    without an error, puts it at `path` with `replace_directory`. With `keep_existing`, files already at `path` that the
    block did not write (e.g. a processor's, when a model is saved beside it) are carried over first, except the
    top-level files `skip` names (e.g. weights of an older save in another layout). A failed or killed write leaves `path` as it was;
    leftovers of killed writes are removed by the next one. A `path` that is a symbolic link (an output folder on
    another disk) stays one: the directory it points to is written.

    Example:

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "model") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> with atomic_directory(root / "model") as tmp:
    ...     _ = (tmp / "weights").write_text("w")
    >>> sorted(p.name for p in (root / "model").iterdir()), sorted(p.name for p in root.iterdir())
    (['config.json', 'weights'], ['model'])
    """
    path = Path(path)
    if path.is_symlink():  # an output folder linked to another disk: write there and keep the user's link
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # killed writes
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    if path.is_dir():
        shutil.copymode(path, tmp)
    else:  # mkdtemp's 0700 would make the saved directory private: give it what a plain mkdir gives
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if keep_existing and path.is_dir():
            _carry_over(path, tmp, skip)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path):
    """Write a file as a whole: yields a temporary sibling path, `.<name>.tmp-<random>`, for the block to create
    (with any writer that takes a path: `faiss.write_index`, `save_file`, `Path.write_text`) and, when the block ends
    without an error, renames it to `path` (`os.replace`: readers see the old file or the new one). The name is unique
    per write, so two writers never write into one file; a failed write removes its file, and leftovers of killed
    writes are removed by the next write of `path`. The file gets the mode its writer gives it.

    Example:

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "index.bin"
    >>> with atomic_file(path) as tmp:
    ...     _ = tmp.write_bytes(b"new")
    >>> path.read_bytes(), [p.name for p in path.parent.iterdir()]
    (b'new', ['index.bin'])
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # killed writes
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_json(path: Path, payload: dict) -> None:
    """Write `payload` to `path` as indented JSON with sorted keys, with `atomic_file`: readers see the old file or
    the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))


def read_manifest(directory, what: str, resume_hint: str, *, format_version: int, name: str,
                  required: tuple = (), redo: str = "Rebuild it.", file_name: str = "manifest.json",
                  partial: str = "shards") -> dict:
    """The manifest of a directory that a resumable build writes last (`atomic_write_json`, its commit point), with
    errors that say what is wrong: the manifest is missing (and, where `directory / partial` exists, that the build is
    unfinished: `resume_hint`), is not a JSON object, is of another `format_version`, or lacks a `required` key.

    Args:
        what: the directory's kind after "is not", with its article (`"a memory bank"`, `"pre-tokenized data"`).
        resume_hint: how to finish an unfinished build (`"an unfinished build: re-run the build to resume"`).
        name: the kind in the other errors (`"memory bank"`: "Unsupported memory bank format ...", "Memory bank DIR:
            ...").
        redo: what to do about a damaged manifest.

    Example:

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp())
    >>> (directory / "shards").mkdir()
    >>> read_manifest(directory, "a memory bank", "an unfinished build: re-run it", format_version=1,
    ...               name="memory bank")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... is not a memory bank: manifest.json is missing (an unfinished build: re-run it).
    >>> atomic_write_json(directory / "manifest.json", {"format_version": 1, "rows": 3})
    >>> read_manifest(directory, "a memory bank", "", format_version=1, name="memory bank", required=("rows",))
    {'format_version': 1, 'rows': 3}
    """
    directory = Path(directory)
    path = directory / file_name
    title = name[:1].upper() + name[1:]
    if not path.exists():
        unfinished = f" ({resume_hint})" if (directory / partial).exists() else ""
        raise ValueError(f"{directory} is not {what}: {file_name} is missing{unfinished}.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{title} {directory}: {file_name} is not valid JSON ({error}). {redo}") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != format_version:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"Unsupported {name} format {version!r} in {directory}.")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ValueError(f"{title} {directory}: {file_name} lacks {missing}. {redo}")
    return manifest


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def claim_output_directory(directory, *, outputs: Callable[[str], bool], signature: tuple, overwrite: bool,
                           what: str, command: str, manifest_file: str = "manifest.json",
                           partial: str = "shards") -> str:
    """Make `directory` ready for a resumable build, deleting nothing that the build did not write.

    The build writes only top-level entries that `outputs` accepts (its data, `partial/` while unfinished, and
    `manifest_file` last, as its commit point); a directory is its own when its manifest is a JSON object holding
    every key of `signature`, or when it holds an unfinished build's `partial/build.json` (a JSON object with a
    `format_version`: `sharded.build_in_shards` writes it first). Returns `"new"` (missing or empty),
    `"unfinished"` (its own unfinished build: resume it) or `"cleared"` (with `overwrite`, its own entries were
    removed, other files left in place). Raises `ValueError`, deleting nothing, for a finished build without
    `overwrite`, and for a non-empty directory that is not its own, with or without `overwrite`.

    Args:
        what: what the build writes, with its article ("pre-tokenized data", "a memory bank").
        command: how to redo it, for the messages ("pass overwrite=True (the `--overwrite` flag of ...)").

    Example:

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp())
    >>> _ = (directory / "precious.csv").write_text("a,b")
    >>> claim_output_directory(directory, outputs=lambda name: name == "data", signature=("format_version",),
    ...                        overwrite=True, what="pre-tokenized data", command="")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... is not empty and does not hold pre-tokenized data ... precious.csv)... Nothing was deleted...
    """
    directory = Path(directory)
    if not directory.exists():
        return "new"
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a folder: choose a folder for {what}.")
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return "new"

    def ours(record: dict | None) -> bool:
        return record is not None and all(key in record for key in signature)

    finished = ours(read_json_object(directory / manifest_file))
    partial_dir = directory / partial
    started = partial_dir.is_dir() and (
        "format_version" in (read_json_object(partial_dir / "build.json") or {})  # `sharded.build_in_shards`'s
        or all(p.name.startswith(".build.json.tmp-") for p in partial_dir.iterdir())  # killed before build.json
    )
    if not finished and not started:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"{directory} is not empty and does not hold {what} written by this command (it holds: {shown}). Nothing was "
            f"deleted: choose a new or empty folder, or move those files away first."
        )
    if finished and not overwrite:
        raise ValueError(f"{directory} already holds {what}; {command} to redo it, or choose another folder.")
    if not overwrite:
        return "unfinished"
    for name in entries:
        leftover = name.startswith(".") and ".tmp-" in name and outputs(name[1:].split(".tmp-")[0])
        if outputs(name) or leftover:
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return "cleared"


__all__ = ["atomic_directory", "atomic_file", "atomic_write_json", "claim_output_directory", "exchange_paths",
           "read_json_object", "read_manifest", "replace_directory"]
