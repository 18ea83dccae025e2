"""Training tokens/s of training/pretrain.py against a bare `Trainer` on the same model and the same batches, and the
collator's examples/s against what training consumes.

Contenders, interleaved in one process (round-robin, `--repeats` rounds, medians of per-step times):
  pretrain    `pretrain.build_trainer(...)`: pre-tokenized Arrow rows → `Cm3LeonDataCollator` (retrieved documents
              read from Arrow, CM3 masking, padding) → `Trainer` step.
  bare        the same `Trainer` settings and initial weights, fed the batches `pretrain` trains on (recorded from
              its collator in an untimed run, replayed in shuffled order by an identity collator): the difference is
              what the collator and the Arrow data path cost.
Each is run with retrieved documents (`--rag-data`, 3 per example) and without (`--data`). The collator's rate is
examples/s of `collator(rows.__getitems__(...))` (what the DataLoader calls) over random batches, against the
examples/s that `pretrain` trains on.

    python bench/train.py --data outputs/pretokenized/train --rag-data outputs/pretokenized/train-rag
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from cm3leon_hf import trainer as pretrain
from cm3leon_hf.pretokenized import load_pretokenized


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps (data loading, forward, backward, update)."""

    def __init__(self):
        self.times, self.last = [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


class Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def run(trainer) -> float:
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times)


def contenders(data: str, steps: int, batch_size: int, output_dir: Path):
    args = pretrain.PretrainArguments(train_data=data, eval_num_images=0, no_resume=True)

    def training_args(name, per_device_batch_size):
        return pretrain.TrainingArguments(
            output_dir=str(output_dir / name), use_cpu=True, max_steps=steps,
            per_device_train_batch_size=per_device_batch_size, learning_rate=1e-3, save_strategy="no",
            report_to="none", disable_tqdm=True, logging_strategy="no", seed=0, dataloader_num_workers=0,
        )

    def ours():
        return pretrain.build_trainer(args, training_args("pretrain", batch_size))

    # the batches `pretrain` trains on, recorded from its collator, so that `bare` replays exactly the same ones
    recorder = ours()
    collate, batches = recorder.data_collator, []
    recorder.data_collator = lambda features: batches.append(collate(features)) or batches[-1]
    recorder.train()
    batches = batches[:steps]

    def bare():
        model = pretrain.build_trainer(args, training_args("bare", 1)).model  # the same initial weights
        return Trainer(model=model, args=training_args("bare", 1), train_dataset=Batches(batches),
                       data_collator=lambda items: items[0])

    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[1:])  # the timed steps
    return {"pretrain": ours, "bare": bare}, tokens


def collator_rate(data: str, batch_size: int, repeats: int) -> float:
    examples, documents, _ = load_pretokenized(data)
    trainer = pretrain.build_trainer(pretrain.PretrainArguments(train_data=data, eval_num_images=0),
                                     pretrain.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True,
                                                                report_to="none"))
    collator = trainer.data_collator
    rates = []
    for r in range(repeats):
        rows = torch.randperm(len(examples), generator=torch.Generator().manual_seed(r))[: 64 * batch_size].tolist()
        start = time.perf_counter()
        for i in range(0, len(rows), batch_size):
            collator(examples.__getitems__(rows[i : i + batch_size]))  # what the DataLoader's fetcher calls
        rates.append(len(rows) / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="pre-tokenized data without retrieved documents")
    parser.add_argument("--rag-data", default=None, help="pre-tokenized data with retrieved documents")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=None, help="scratch directory of the runs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"tiny config, batch {args.batch_size}, {args.steps} steps per run, {args.repeats} rounds")
    print("| data | tokens/step | pretrain tokens/s | bare Trainer tokens/s | pretrain/bare | collator examples/s "
          "| collator / training consumption |")
    print("|---|---|---|---|---|---|---|")
    for name, data in (("no retrieval", args.data), ("3 retrieved docs", args.rag_data)):
        if data is None:
            continue
        runs, tokens = contenders(data, args.steps, args.batch_size, Path(args.output_dir or tempfile.mkdtemp()))
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, make in runs.items():
                times[key].append(run(make()))
        step = {k: statistics.median(v) for k, v in times.items()}
        rate = collator_rate(data, args.batch_size, args.repeats)
        consumed = args.batch_size / step["pretrain"]
        print(f"| {name} | {tokens:,.0f} | {tokens / step['pretrain']:,.0f} | {tokens / step['bare']:,.0f} | "
              f"{step['bare'] / step['pretrain']:.3f} | {rate:,.0f} | {rate / consumed:,.0f}x |", flush=True)


if __name__ == "__main__":
    main()
