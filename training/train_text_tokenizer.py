"""Train the text BPE of CM3Leon's vocabulary (CL §2.1) on any `datasets` text column.

The special tokens and the vocabulary size come from a model config (`Cm3LeonConfig`), so the paper's 56,320-id
tokenizer and the tiny one come from the same code (`cm3leon_hf.tokenization_cm3leon.train_text_tokenizer`). Markers
in the texts (`<break>`, `<image>`, `<mask:i>`…) are cut out before training, as the processor does before encoding.

Commands:

```bash
# The shipped tiny tokenizer: every task's documents of the synthetic world, the vocabulary of cm3leon-tiny:
python training/train_text_tokenizer.py --model_config hub_configs/cm3leon-tiny --output_dir runs/text_tokenizer_tiny

# The paper's size on your own corpus, streamed:
python training/train_text_tokenizer.py --model_config hub_configs/cm3leon-7b --dataset user/corpus \
    --text_column text --streaming --output_dir runs/text_tokenizer
```

The output directory is a `PreTrainedTokenizerFast` (`tokenizer.json`, `tokenizer_config.json`), loadable with
`AutoTokenizer.from_pretrained`; `training/build_processor.py` bundles it with the VQ.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.tokenization_cm3leon import train_text_tokenizer


@dataclass
class TextTokenizerArguments:
    """The config whose vocabulary the BPE fills, the texts, and where the tokenizer goes."""

    model_config: str = field(metadata={"help": "Directory of a Cm3LeonConfig (config.json)."})
    output_dir: str = field(metadata={"help": "Where the tokenizer is saved."})
    dataset: str | None = field(
        default=None, metadata={"help": "Hub id or `save_to_disk` directory; default: the synthetic world."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    split: str = field(default="train", metadata={"help": "The split to read."})
    text_column: str = field(default="text", metadata={"help": "The column of texts."})
    streaming: bool = field(default=False, metadata={"help": "Stream a Hub dataset instead of downloading it."})
    max_texts: int | None = field(default=None, metadata={"help": "Read at most this many texts."})
    synthetic_rows: int = field(default=5000, metadata={"help": "Synthetic world: train rows per task."})
    min_frequency: int = field(default=2, metadata={"help": "Merges seen fewer times are not learned."})

    def __post_init__(self):
        for name in ("max_texts", "synthetic_rows", "min_frequency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value} (a tokenizer trained on nothing)")


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser(TextTokenizerArguments, description=__doc__.split("\n\n")[0], epilog=epilog)


def parse_args(argv=None) -> TextTokenizerArguments:
    """The arguments; a bad value exits with a message naming the flag."""
    parser = make_parser()
    try:
        return parser.parse_args_and_config(argv)[0]
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))


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
    args = parse_args(argv)
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
