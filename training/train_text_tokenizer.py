"""Train the text BPE of CM3Leon's vocabulary (CL §2.1) on any `datasets` text column.

The special tokens and the vocabulary size come from a model config (`Cm3LeonConfig`), so the paper's 56,320-id
tokenizer and the tiny one come from the same code (`cm3leon_hf.tokenization_cm3leon.train_text_tokenizer`). Markers
in the texts (`<break>`, `<image>`, `<mask:i>`…) are cut out before training, as the processor does before encoding.

Commands:

```bash
# The shipped tiny tokenizer: every task's documents of the synthetic world, the vocabulary of cm3leon-tiny:
python training/train_text_tokenizer.py --model-config hub_configs/cm3leon-tiny --output-dir runs/text_tokenizer_tiny

# The paper's size on your own corpus, streamed:
python training/train_text_tokenizer.py --model-config hub_configs/cm3leon-7b --dataset user/corpus \
    --text-column text --streaming --output-dir runs/text_tokenizer
```

The output directory is a `PreTrainedTokenizerFast` (`tokenizer.json`, `tokenizer_config.json`), loadable with
`AutoTokenizer.from_pretrained`; `training/build_processor.py` bundles it with the VQ.
"""

import argparse
import json
from pathlib import Path

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.tokenization_cm3leon import train_text_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-config", type=Path, required=True, help="Directory of a Cm3LeonConfig (config.json).")
    parser.add_argument("--dataset", help="Hub id or `save_to_disk` directory; default: the synthetic world.")
    parser.add_argument("--dataset-config", help="Configuration name of a Hub dataset.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--max-texts", type=int, help="Read at most this many texts.")
    parser.add_argument("--synthetic-rows", type=int, default=5000, help="Synthetic world: train rows per task.")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, required=True)
    return parser


def load_texts(args):
    import datasets

    if args.dataset is None:
        from cm3leon_hf.synthetic import build_tasks

        world = build_tasks(num_train=args.synthetic_rows, num_validation=0, num_test=0, num_heldout=0)
        dataset = world[args.split]
    elif Path(args.dataset).is_dir():
        dataset = datasets.load_from_disk(args.dataset)[args.split]
    else:
        dataset = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split, streaming=args.streaming)
    if dataset.column_names is not None and args.text_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {args.text_column!r} (columns: {dataset.column_names}).")
    dataset = dataset.select_columns([args.text_column])
    length = len(dataset) if hasattr(dataset, "__len__") else None
    if args.max_texts is not None:
        dataset = dataset.take(args.max_texts)
        length = args.max_texts if length is None else min(length, args.max_texts)
    return (row[args.text_column] for row in dataset), length


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_texts", "synthetic_rows", "min_frequency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value} (a tokenizer trained on nothing)")
    config = Cm3LeonConfig.from_pretrained(args.model_config)
    texts, length = load_texts(args)
    tokenizer = train_text_tokenizer(
        texts, config, min_frequency=args.min_frequency, length=length, show_progress=length is not None
    )
    tokenizer.save_pretrained(args.output_dir)
    summary = {"vocabulary": len(tokenizer), "text_vocab_size": config.text_vocab_size, "output_dir": str(args.output_dir)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
