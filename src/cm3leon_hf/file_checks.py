"""Is a saved folder whole? Cheap checks, before a library reads it, that turn a truncated or missing file into an error
that names the file and what to do (instead of safetensors' "incomplete metadata", a bare `JSONDecodeError`, or
transformers silently loading defaults in place of a damaged `generation_config.json`).

- JSON files: parse.
- safetensors files: the header parses and the data it describes ends exactly at the end of the file (no tensor
  is read).
- torch `.pt`/`.pth` files (a Trainer checkpoint's optimizer, scheduler, RNG states): the zip archive `torch.save`
  writes is whole (its CRCs, `zipfile.testzip`).

Standard library only: the saved models' remote code imports it (`hub.py`).

Example:

>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "config.json").write_text('{"a": ')
>>> file_problems(folder)
['config.json is not valid JSON (Expecting value: line 1 column 7 (char 6))']
"""

import json
import os
import struct
import zipfile
from pathlib import Path

JSON_SUFFIXES = (".json",)
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (None when whole): a header that does not parse, or data that
    does not end where the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{path.name} has {size} bytes, too few for a safetensors header"
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                return f"{path.name} has {size} bytes, fewer than its header says ({length + 8} or more)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"{path.name}: its safetensors header does not parse ({error})"
    if not isinstance(header, dict):
        return f"{path.name}: its safetensors header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{path.name} has {size} bytes, its header describes {expected}"
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{path.name} is not valid JSON ({error})"
    return None


def torch_archive_problem(path: Path) -> str | None:
    """A `torch.save` zip archive that is cut short or has a flipped byte (files of torch's legacy format pass)."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None  # not a zip archive: torch's legacy format, not checked here
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as error:
        return f"{path.name} is not a whole torch file ({error})"
    return f"{path.name} is damaged (its entry {bad} fails its CRC)" if bad else None


def file_problems(folder: str | os.PathLike, names=None, torch_files: bool = False) -> list[str]:
    """What is damaged among the files of `folder` (its top level; `names`, when given, limits the check to those):
    JSON files that do not parse, safetensors files whose size is not the one their header describes and, with
    `torch_files` (this reads them whole), torch zip archives that do not pass their CRCs. Empty when all are
    whole."""
    folder = Path(folder)
    paths = [folder / n for n in names] if names is not None else sorted(folder.iterdir())
    problems = []
    for path in paths:
        if not path.is_file():
            continue
        if path.name.endswith(JSON_SUFFIXES):
            problem = json_problem(path)
        elif path.name.endswith(SAFETENSORS_SUFFIX):
            problem = safetensors_problem(path)
        elif torch_files and path.name.endswith(TORCH_SUFFIXES):
            problem = torch_archive_problem(path)
        else:
            problem = None
        if problem:
            problems.append(problem)
    return problems


def looks_local(path) -> bool:
    """Whether `from_pretrained`'s argument names a local path rather than a Hub repository id (`name` or
    `namespace/name`): it exists, is absolute, starts with `.` or `~`, or has more than two parts."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    return (os.path.exists(text) or os.path.isabs(text) or text.startswith((".", "~"))
            or len(Path(text).parts) > 2 or os.sep != "/" and os.sep in text)


def check_pretrained_folder(path, subfolder: str | None = None, *, what: str = "model") -> None:
    """Before `from_pretrained` reads a local folder: refuse a missing one (transformers answers "Repo id must be in
    the form ...") and a damaged file, naming it. Hub repository ids pass through unchecked (the Hub client checks
    its downloads).

    Raises:
        FileNotFoundError: `path` looks local (`looks_local`) and does not exist.
        OSError: a file of the folder is damaged (`file_problems`).
    """
    if not looks_local(path):
        return
    text = os.path.expanduser(os.fspath(path))
    if not os.path.exists(text):
        raise FileNotFoundError(
            f"{text}: no such folder. Give a folder saved with save_pretrained (or a Hub repository id, "
            f"'namespace/name') to load the {what} from."
        )
    folder = Path(text, subfolder or "")
    if not folder.is_dir():
        return  # a single file (e.g. a GGUF or a config), which the library reads itself
    problems = file_problems(folder)
    if problems:
        raise OSError(
            f"The {what} in {folder} is damaged: {'; '.join(problems)}. The copy was cut short or changed (an "
            f"interrupted save, download or copy): save or download it again."
        )


__all__ = ["check_pretrained_folder", "file_problems", "looks_local", "safetensors_problem"]
