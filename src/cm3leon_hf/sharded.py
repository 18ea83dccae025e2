"""Resumable, sharded builds of Arrow datasets, written atomically: what the memory bank and pre-tokenization share.

`datasets.Dataset.map` caches a finished result but starts over after a kill. A build here maps a dataset shard by
shard into `shards_dir/shard-00000`, … (each written as a whole: `atomic.atomic_directory`), so that re-running the same
build skips the finished shards; `shards_dir/build.json` records the settings, and a re-run with other settings is an
error instead of a silent mix of two builds.
"""

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from .atomic import atomic_directory, atomic_write_json

BUILD_FILE = "build.json"
SHARD_INFO_FILE = "shard.json"


@contextlib.contextmanager
def datasets_progress_bars_off():
    """Silence `datasets`' own bars (saving, flattening) while a build shows one bar for the whole job."""
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def save_dataset(dataset: Dataset, path: Path) -> None:
    """`save_to_disk` without `datasets`' progress bar (one file for an empty dataset, which `datasets` needs)."""
    with datasets_progress_bars_off():
        dataset.save_to_disk(str(path), num_shards=1 if len(dataset) == 0 else None)


def save_dataset_atomically(dataset: Dataset, path: Path) -> Dataset:
    """`save_to_disk` into `path` as a whole (`atomic_directory`: a kill leaves the earlier copy, not a mix); returns
    the saved dataset, memory-mapped."""
    with atomic_directory(path, keep_existing=False) as tmp:
        save_dataset(dataset, tmp)
    return load_from_disk(str(path))


def build_in_shards(
    dataset: Dataset,
    shards_dir: Path,
    settings: dict,
    encode_shard: Callable,
    *,
    shard_size: int,
    what: str,
    desc: str,
    unit: str,
    show_progress_bar: bool = True,
    same_settings: Callable[[dict, dict], bool] | None = None,
) -> tuple[Dataset, list[dict]]:
    """Map `dataset` shard by shard, resumably; return the concatenated result and each shard's info dict.

    Args:
        encode_shard: `(part, start, progress) -> Dataset | (Dataset, dict)`; `part` is rows `[start, start +
            shard_size)`, `progress` a tqdm bar to advance by the rows done; the optional dict is saved with the shard.
        settings: what must not change between a build and its resumption (JSON); compared with `same_settings`
            (default: equality after a JSON round trip).
        what: the build's name in the error about other settings (e.g. "build", "pre-tokenization").
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}.")
    settings = json.loads(json.dumps(settings))
    build_file = shards_dir / BUILD_FILE
    if build_file.exists():
        same = same_settings or (lambda a, b: a == b)
        if not same(json.loads(build_file.read_text()), settings):
            raise ValueError(
                f"{shards_dir.parent} holds an unfinished {what} with other settings (one of: {', '.join(settings)}); "
                f"pass overwrite=True (the scripts' `--overwrite` flag) to start over."
            )
    else:
        shards_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(build_file, settings)

    paths = [shards_dir / f"shard-{i:05d}" for i in range(math.ceil(len(dataset) / shard_size))]
    done = sum(min(shard_size, len(dataset) - i * shard_size) for i, p in enumerate(paths) if p.exists())
    progress = tqdm(total=len(dataset), initial=done, desc=desc, unit=unit, disable=not show_progress_bar)
    for i, path in enumerate(paths):
        if path.exists():
            continue
        start = i * shard_size
        result = encode_shard(dataset.select(range(start, min(len(dataset), start + shard_size))), start, progress)
        shard, info = result if isinstance(result, tuple) else (result, {})
        with atomic_directory(path, keep_existing=False) as tmp:
            save_dataset(shard, tmp)
            atomic_write_json(tmp / SHARD_INFO_FILE, info)
    progress.close()
    infos = [json.loads((p / SHARD_INFO_FILE).read_text()) for p in paths]
    return concatenate_datasets([load_from_disk(str(p)) for p in paths]), infos
