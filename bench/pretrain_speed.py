"""What a pretraining step of the tiny model costs, by recipe: fp32 against bf16 autocast, and 0, 1 or 3 retrieved
documents per sample, on the same batches; and how much of each batch is padding (what sequence packing would save).

Contenders, interleaved in one process (round-robin, `--repeats` rounds, medians of per-step times), each a
`cm3leon_hf.trainer.build_trainer` run of `--steps` optimizer steps from the same initial weights:

  docs=N fp32   batches of the pre-tokenized data with up to N retrieved documents in front, float32;
  docs=N bf16   the same batches under `TrainingArguments(bf16=True)`: transformers' CPU autocast to bfloat16 (the
                weights and the optimizer stay float32).

The reference is `docs=3 fp32`, the bundled model's recipe; the ratio column is its time per step over the
contender's, and `tokens/s` counts real (unpadded) tokens. Padding is measured on 200 batches of the collator alone.

`--packing 512 1024` measures instead what sequence packing would change: forward + backward (bf16) of the same real
tokens padded as the collator pads them, and packed padding-free into rows of at most 512 / 1024 tokens (the model's
packed path: position ids restart per sample, attention stays within it).

    HF_HUB_OFFLINE=1 python bench/pretrain_speed.py --data outputs/tiny-model/pretokenized/train-rag
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from cm3leon_hf.pretraining_config import PretrainArguments
from cm3leon_hf.trainer import build_trainer
from train import StepTimer  # bench/train.py, beside this script


def make_trainer(data: str, docs: int, bf16: bool, steps: int, batch_size: int, output_dir: Path):
    script_args = PretrainArguments(train_data=data, eval_num_images=0, num_retrieved_docs=docs, no_resume=True)
    training_args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=1e-3, save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no", seed=0,
        dataloader_num_workers=0, bf16=bf16,
    )
    return build_trainer(script_args, training_args)


def padding_share(data: str, docs: int, batch_size: int, batches: int = 200) -> tuple[float, float]:
    """(real tokens per sample, share of padded positions) over `batches` random batches of the collator."""
    trainer = make_trainer(data, docs, False, 1, batch_size, Path(tempfile.mkdtemp()))
    examples, collator = trainer.train_dataset, trainer.data_collator
    real = padded = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(batches):
        rows = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        batch = collator(examples.__getitems__(rows))
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    return real / (batches * batch_size), 1 - real / padded


def pack(batch: dict, length: int) -> dict:
    """The batch's real tokens as padding-free packed rows of at most `length` tokens (first fit, longest sample
    first): position ids restart per sample and no attention mask, the model's packed path (attention stays within
    each sample, as in transformers' `DataCollatorWithFlattening`, which also leaves out each sample's first label).
    Rows are padded to the longest packed row with position 0 and label -100 (a padded tail is a sample of its own)."""
    samples = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        sample = (ids[:n], labels[:n].clone())
        sample[1][0] = -100
        samples.append(sample)
    rows: list[list] = []
    for sample in sorted(samples, key=lambda s: -len(s[0])):
        row = next((r for r in rows if sum(len(i) for i, _ in r) + len(sample[0]) <= length), None)
        if row is None:
            rows.append([sample])
        else:
            row.append(sample)
    width = max(sum(len(i) for i, _ in row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ids, lab in row:
            input_ids[r, start:start + len(ids)] = ids
            labels[r, start:start + len(ids)] = lab
            position_ids[r, start:start + len(ids)] = torch.arange(len(ids))
            start += len(ids)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packing_cost(data: str, docs: int, batch_size: int, lengths: list[int], batches: int, repeats: int):
    """Seconds of forward + backward (bf16 autocast, the tiny config) for the same real tokens padded (the collator's
    batch) and packed into rows of each of `lengths`, interleaved, medians over `repeats` passes of `batches`."""
    trainer = make_trainer(data, docs, True, 1, batch_size, Path(tempfile.mkdtemp()))
    examples, collator, model = trainer.train_dataset, trainer.data_collator, trainer.model.train()
    generator = torch.Generator().manual_seed(0)
    padded = []
    for _ in range(batches):
        rows = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        padded.append(collator(examples.__getitems__(rows)))
    contenders = {"padded": padded} | {f"packed {n}": [pack(b, n) for b in padded] for n in lengths}
    times = {name: [] for name in contenders}

    def step(batch):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(repeats):
        for name, group in contenders.items():
            times[name].append(sum(step(b) for b in group))
    reference = statistics.median(times["padded"])
    print("\n| layout | rows per batch | positions (real + padding) | s/batch | speed vs padded |")
    print("|---|---|---|---|---|")
    for name, group in contenders.items():
        positions = sum(b["input_ids"].numel() for b in group) / len(group)
        rows = sum(len(b["input_ids"]) for b in group) / len(group)
        s = statistics.median(times[name]) / len(group)
        print(f"| {name} | {rows:.1f} | {positions:,.0f} | {s:.3f} | {reference / len(group) / s:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="pre-tokenized data with retrieved documents (3 per example)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--packing", type=int, nargs="*", metavar="LENGTH",
                        help="instead: padded batches against the same tokens packed into rows of these lengths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"tiny config, batch {args.batch_size}, {args.steps} steps per run, {args.repeats} rounds")
    if args.packing:
        for docs in args.docs:
            print(f"\n# {docs} documents")
            packing_cost(args.data, docs, args.batch_size, args.packing, args.steps, args.repeats)
        return
    scratch = Path(tempfile.mkdtemp())
    contenders = [(docs, bf16) for docs in args.docs for bf16 in (False, True)]
    times = {c: [] for c in contenders}
    for _ in range(args.repeats):
        for docs, bf16 in contenders:
            trainer = make_trainer(args.data, docs, bf16, args.steps, args.batch_size, scratch / f"{docs}-{bf16}")
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            times[(docs, bf16)].append(statistics.median(timer.times))
    step = {c: statistics.median(v) for c, v in times.items()}
    reference = step.get((3, False))
    print("| docs | dtype | s/step | real tokens/sample | padding | real tokens/s | speed vs docs=3 fp32 |")
    print("|---|---|---|---|---|---|---|")
    for docs in args.docs:
        tokens, padding = padding_share(args.data, docs, args.batch_size)
        for bf16 in (False, True):
            s = step[(docs, bf16)]
            ratio = f"{reference / s:.2f}x" if reference else "-"
            print(f"| {docs} | {'bf16' if bf16 else 'fp32'} | {s:.3f} | {tokens:.0f} | {padding:.1%} | "
                  f"{tokens * args.batch_size / s:,.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
