"""Pre-tokenize multi-task instruction-tuning data for `training/sft.py`, once: each row formatted with the paper's task
templates as prompt + completion, tokenized (text BPE + VQ codes), with a `completion_mask`. The library is
`cm3leon_hf.sft_data` (the formats, the mixture balancing, the output).

Commands:

```bash
# Every task of the synthetic world (text_to_image, caption, vqa, edit, spatial, structure, infill), 2,000 rows each
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize_sft.py --synthetic_rows 2000 \
    --output_dir outputs/sft/train

# A user's `datasets` dataset of one task (save_to_disk directory or a Hub name on your machine), with that task's
# columns (cm3leon_hf.sft_data.TASK_COLUMNS; e.g. vqa: question, answer, images)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize_sft.py --dataset path/to/vqa --task vqa \
    --processor path/to/model --output_dir outputs/sft/my-vqa

# Interrupted? Run the same command again: finished shards are kept. --overwrite starts over.
```
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from cm3leon_hf.pretokenized import MANIFEST_FILE
from cm3leon_hf.sft_data import pretokenize_sft


@dataclass
class PretokenizeSFTArguments:
    output_dir: str = field(metadata={"help": "where the pre-tokenized data goes"})
    dataset: str | None = field(
        default=None, metadata={"help": "a save_to_disk directory or a datasets name (default: the synthetic world)"}
    )
    split: str = field(default="train", metadata={"help": "the split of --dataset, or of the synthetic world"})
    task: str | None = field(default=None, metadata={"help": "the task of every row of --dataset"})
    task_column: str = field(default="task", metadata={"help": "the column naming each row's task, without --task"})
    synthetic_tasks: list[str] | None = field(default=None, metadata={"help": "the world's tasks (default: all)"})
    synthetic_rows: int = field(default=2000, metadata={"help": "rows of each synthetic task"})
    synthetic_seed: int = field(default=0, metadata={"help": "the synthetic world's seed"})
    processor: str | None = field(default=None, metadata={"help": "the model's processor (default: the shipped tiny)"})
    max_length: int | None = field(default=None, metadata={"help": "skip (and count) longer examples"})
    seed: int = field(default=0, metadata={"help": "the templates' seed"})
    threads: int = field(default=1, metadata={"help": "torch threads (the VQ encoder)"})
    overwrite: bool = field(default=False, metadata={"help": "delete what --output_dir holds and start over"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self):
        if self.synthetic_rows < 1:
            raise ValueError(f"--synthetic_rows must be at least 1, got {self.synthetic_rows}")
        if self.dataset is not None and self.synthetic_tasks is not None:
            raise ValueError("--synthetic_tasks is for the synthetic world; --dataset reads your own")


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser((PretokenizeSFTArguments,), description=__doc__.split("\n")[0], epilog=epilog)


def load_rows(args: PretokenizeSFTArguments) -> datasets.Dataset:
    if args.dataset is None:
        from cm3leon_hf.synthetic import TASKS, build_tasks

        sizes = {f"num_{s}": 0 for s in ("train", "validation", "test", "heldout")}
        sizes[f"num_{args.split}"] = args.synthetic_rows
        return build_tasks(tuple(args.synthetic_tasks or TASKS), seed=args.synthetic_seed, **sizes)[args.split]
    if Path(args.dataset).is_dir():
        rows = datasets.load_from_disk(args.dataset)
        return rows[args.split] if isinstance(rows, datasets.DatasetDict) else rows
    return datasets.load_dataset(args.dataset, split=args.split)


def main(argv=None):
    parser = make_parser()
    try:
        (args,) = parser.parse_args_and_config(argv)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    from cm3leon_hf import Cm3LeonProcessor
    from cm3leon_hf.pretrained import TINY_PATH

    processor = Cm3LeonProcessor.from_pretrained(args.processor or TINY_PATH)
    data = pretokenize_sft(load_rows(args), processor, args.output_dir, task=args.task, task_column=args.task_column,
                           max_length=args.max_length, seed=args.seed, overwrite=args.overwrite,
                           show_progress_bar=not args.no_progress)
    manifest = json.loads((Path(args.output_dir) / MANIFEST_FILE).read_text())
    print(json.dumps({"output_dir": str(args.output_dir), "num_rows": len(data),
                      **{k: manifest[k] for k in ("num_examples", "num_examples_per_task", "num_skipped",
                                                   "num_tokens")}}))
    return data


if __name__ == "__main__":
    main()
