"""Directories written as a whole: a reader, or a kill, sees the old directory or the new one, never a mix.

Saving a model, a processor or a memory bank writes several files; transformers and `datasets` write them in place, so a
kill in the middle leaves a new `config.json` beside old weights. `atomic_directory` writes into a temporary sibling
and swaps it in. Standard library only: the saved models' remote code imports it.
"""

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
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
    leftovers of killed writes are removed by the next one.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # killed writes
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


__all__ = ["atomic_directory", "exchange_paths", "replace_directory"]
