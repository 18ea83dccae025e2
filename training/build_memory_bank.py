"""Build a CM3Leon memory bank: CLIP document embeddings in Arrow + a faiss inner-product index.

Commands:

```bash
# The synthetic world's caption-image pairs (text-to-image train split) with the world's CLIP (shipped in the package,
# cm3leon_hf.pretrained.CLIP_PATH, the default --encoder)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/build_memory_bank.py \
    --synthetic-task text_to_image --synthetic-rows 20000 --output-dir outputs/memory-bank

# Any dataset saved with `save_to_disk` (or a `datasets` name), columns "text" and "image"
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/build_memory_bank.py \
    --dataset path/to/dataset --split train --encoder path/to/clip --output-dir path/to/bank

# A large bank: IVF with 4-bit fast-scan PQ, trained on a 262,144-row sample, 128 of 16,384 lists searched
... --index-factory "IVF16384,PQ64x4fs" --search-parameters nprobe=128 --train-size 262144

# Interrupted? Run the same command again: finished shards are skipped. --overwrite starts over.
```

The bank is `output_dir/rows` (Arrow, `load_from_disk`), `output_dir/index.faiss` and `output_dir/manifest.json`;
open it with `cm3leon_hf.memory_bank.Cm3LeonMemoryBank.load(output_dir)`. The default index depends on the bank size
(`cm3leon_hf.memory_bank.default_index_factory`).
"""

import argparse
import json
import sys
from pathlib import Path

import faiss
import torch
from sentence_transformers import SentenceTransformer

from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
from cm3leon_hf.pretrained import CLIP_PATH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretokenize import add_source_arguments, load_source  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--encoder", default=None,
                        help="a sentence-transformers CLIP folder or name (default: the shipped synthetic-world CLIP)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--index-factory", default=None, help="faiss factory string (default: by bank size)")
    parser.add_argument("--search-parameters", default=None, help='e.g. "nprobe=32" or "efSearch=128"')
    parser.add_argument("--train-size", type=int, default=None, help="rows sampled to train IVF/PQ indexes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per resumable shard")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and faiss threads (1: on a shared 2-core machine 2 threads spin-wait, 11x slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the index training sample")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("batch_size", "shard_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    dataset, text_column, image_column = load_source(args)
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
