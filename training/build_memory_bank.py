"""Build a CM3Leon memory bank: CLIP document embeddings in Arrow + a faiss inner-product index.

Commands:

```bash
# The synthetic world's caption-image pairs (text-to-image train split) with the world's CLIP (shipped in the package,
# cm3leon_hf.pretrained.CLIP_PATH, the default --encoder)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/build_memory_bank.py \
    --synthetic_task text_to_image --synthetic_rows 20000 --output_dir outputs/memory-bank

# Any dataset saved with `save_to_disk` (or a `datasets` name), columns "text" and "image"
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/build_memory_bank.py \
    --dataset path/to/dataset --split train --encoder path/to/clip --output_dir path/to/bank

# A large bank: IVF with 4-bit fast-scan PQ, trained on a 262,144-row sample, 128 of 16,384 lists searched
... --index_factory "IVF16384,PQ64x4fs" --search_parameters nprobe=128 --train_size 262144

# Interrupted? Run the same command again: finished shards are skipped. --overwrite starts over.
```

The bank is `output_dir/rows` (Arrow, `load_from_disk`), `output_dir/index.faiss` and `output_dir/manifest.json`;
open it with `cm3leon_hf.memory_bank.Cm3LeonMemoryBank.load(output_dir)`. The default index depends on the bank size
(`cm3leon_hf.memory_bank.default_index_factory`). The dataset flags are `cm3leon_hf.pretokenized.DataSourceArguments`,
shared with `training/pretokenize.py` so that both read the same rows.

Flags are dataclass fields parsed with `trl.TrlParser`: `--config FILE.yaml` supplies any of them, and each takes
dashes or underscores (`--output-dir` = `--output_dir`).
"""

import json
from dataclasses import dataclass, field

import faiss
import torch
from sentence_transformers import SentenceTransformer

from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
from cm3leon_hf.pretokenized import DataSourceArguments, load_source
from cm3leon_hf.pretrained import CLIP_PATH


@dataclass
class MemoryBankArguments:
    """Where the bank goes, its encoder and index, and the run's settings."""

    output_dir: str = field(metadata={"help": "where the bank is written"})
    encoder: str | None = field(
        default=None,
        metadata={"help": "a sentence-transformers CLIP folder or name (default: the shipped synthetic-world CLIP)"},
    )
    index_factory: str | None = field(default=None, metadata={"help": "faiss factory string (default: by bank size)"})
    search_parameters: str | None = field(default=None, metadata={"help": 'e.g. "nprobe=32" or "efSearch=128"'})
    train_size: int | None = field(default=None, metadata={"help": "rows sampled to train IVF/PQ indexes"})
    batch_size: int = field(default=64, metadata={"help": "pairs per encoder call"})
    shard_size: int = field(default=10_000, metadata={"help": "rows per resumable shard"})
    threads: int = field(
        default=1,
        metadata={"help": "torch and faiss threads (1: on a shared 2-core machine 2 threads spin-wait, 11x slower)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the index training sample"})
    overwrite: bool = field(default=False, metadata={"help": "build a new bank in place of the one there"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser((DataSourceArguments, MemoryBankArguments), description=__doc__.split("\n")[0], epilog=epilog)


def parse_args(argv=None) -> tuple[DataSourceArguments, MemoryBankArguments]:
    """The source and the build's arguments; a bad value exits with a message naming the flag."""
    parser = make_parser()
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))


def main(argv=None):
    source, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    dataset, text_column, image_column = load_source(source)
    encoder = SentenceTransformer(str(args.encoder or CLIP_PATH))
    bank = Cm3LeonMemoryBank.build(
        dataset, encoder, args.output_dir, text_column=text_column, image_column=image_column,
        index_factory=args.index_factory, search_parameters=args.search_parameters, train_size=args.train_size,
        batch_size=args.batch_size, shard_size=args.shard_size, overwrite=args.overwrite,
        show_progress_bar=not args.no_progress, seed=args.seed,
    )
    summary = {k: bank.manifest[k] for k in ("num_rows", "num_skipped", "index_factory", "search_parameters")}
    print(json.dumps({"output_dir": str(args.output_dir), **summary, "encoder": bank.manifest["encoder"]["name"]}))
    return bank


if __name__ == "__main__":
    main()
