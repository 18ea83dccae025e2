"""Where a pretraining step of the tiny model spends its time: data, forward + loss, backward, gradient clipping,
the optimizer, and the Trainer's own bookkeeping; then the operators under forward and backward (torch.profiler).

Each contender is a `cm3leon_hf.trainer.build_trainer` run (the bundled recipe's trainer: the pre-tokenized data with
`--docs` retrieved documents, batch 16, AdamW, clipping 1.0) of `--steps` optimizer steps. Its phases are timed by
wrapping the trainer's own calls (the dataset's row reads and the collator, `compute_loss`, `accelerator.backward`,
`accelerator.clip_grad_norm_`, `optimizer.step`); "Trainer, other" is the wall time of a step minus those
(it includes `model.zero_grad`). The contenders (fp32 and bf16 autocast, the bundled continuation's) alternate for
`--repeats` rounds and each phase reports the median over every timed step; the reference for the ratio column is the fp32 step.
The first step of each run is left out (allocations, the optimizer's lazy state).

    HF_HUB_OFFLINE=1 python bench/profile_step.py --data outputs/tiny-model/pretokenized/train-rag
"""

import argparse
import collections
import functools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from pretrain_speed import make_trainer  # bench/pretrain_speed.py, beside this script

PHASES = ("data", "forward + loss", "backward", "clip grad norm", "optimizer step")

# Operator families for the profile's second table: the first whose fragment is in the aten name wins.
FAMILIES = (
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("matmul (linear layers, LM head)", ("addmm", "mm", "matmul", "linear")),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("dtype casts (autocast)", ("_to_copy", "copy_")),
    ("layer norm", ("layer_norm",)),
    ("embedding", ("embedding",)),
    ("optimizer (AdamW's foreach ops)", ("_foreach", "lerp", "addcmul", "addcdiv", "sqrt")),
    ("elementwise (relu, add, mul, dropout)", ("relu", "threshold", "add", "mul", "div", "sub", "dropout",
                                                "where", "masked_fill", "fill_", "zero_")),
)


class Phases(TrainerCallback):
    """Seconds per phase of each optimizer step, from wrappers around the trainer's calls."""

    def __init__(self):
        self.current = collections.Counter()
        self.steps: list[dict[str, float]] = []
        self.last = None

    def timed(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - start
        return wrapper

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            step = dict(self.current)
            step["total"] = now - self.last
            self.steps.append(step)
        self.current = collections.Counter()
        self.last = now


def instrument(trainer) -> Phases:
    phases = Phases()
    data = trainer.train_dataset
    data.__getitems__ = phases.timed("data", data.__getitems__)  # the DataLoader's fetcher calls this attribute
    trainer.data_collator = phases.timed("data", trainer.data_collator)
    trainer.compute_loss = phases.timed("forward + loss", trainer.compute_loss)
    trainer.accelerator.backward = phases.timed("backward", trainer.accelerator.backward)
    trainer.accelerator.clip_grad_norm_ = phases.timed("clip grad norm", trainer.accelerator.clip_grad_norm_)

    class OptimizerTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            opt = trainer.optimizer  # created by train(), before this event
            opt.step = phases.timed("optimizer step", opt.step)

    trainer.add_callback(OptimizerTimer())
    trainer.add_callback(phases)
    return phases


def family(name: str) -> str:
    stem = name.split("::")[-1]
    for label, fragments in FAMILIES:
        if any(fragment in stem for fragment in fragments):
            return label
    return "other operators"


def operator_profile(data: str, docs: int, bf16: bool, batch_size: int, steps: int, scratch: Path):
    """Self CPU time per operator family over `steps` profiled steps (after one warm-up step), as shares."""
    trainer = make_trainer(data, docs, bf16, steps + 1, batch_size, scratch)
    holder = {}

    class Profile(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                holder["prof"] = profile(activities=[ProfilerActivity.CPU])
                holder["prof"].__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            holder["prof"].__exit__(None, None, None)

    trainer.add_callback(Profile())
    trainer.train()
    totals = collections.Counter()
    for event in holder["prof"].key_averages():
        if event.key.startswith("aten::"):
            totals[family(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {k: v / whole for k, v in totals.most_common()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="pre-tokenized data with retrieved documents")
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"tiny config, {args.docs} documents, batch {args.batch_size}, {args.steps} steps per run, "
          f"{args.repeats} rounds")
    scratch = Path(tempfile.mkdtemp())
    contenders = {"fp32": False, "bf16": True}
    steps = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, bf16 in contenders.items():
            trainer = make_trainer(args.data, args.docs, bf16, args.steps, args.batch_size, scratch / name)
            phases = instrument(trainer)
            trainer.train()
            steps[name].extend(phases.steps)
    medians = {}
    for name, rows in steps.items():
        medians[name] = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in PHASES + ("total",)}
        medians[name]["Trainer, other"] = medians[name]["total"] - sum(medians[name][p] for p in PHASES)
    reference = medians["fp32"]["total"]
    print("\n| phase | fp32 s/step | share | bf16 s/step | share | bf16 vs fp32 |")
    print("|---|---|---|---|---|---|")
    for phase in PHASES + ("Trainer, other", "total"):
        a, b = medians["fp32"][phase], medians["bf16"][phase]
        ratio = f"{a / b:.2f}x" if b > 1e-6 else "-"
        print(f"| {phase} | {a:.4f} | {a / medians['fp32']['total']:.1%} | {b:.4f} | "
              f"{b / medians['bf16']['total']:.1%} | {ratio} |")
    print(f"\nreference: the fp32 step, {reference:.3f} s; bf16 step {medians['bf16']['total']:.3f} s "
          f"({reference / medians['bf16']['total']:.2f}x faster)")
    print("\n| operator family (self CPU time) | fp32 share | bf16 share |")
    print("|---|---|---|")
    shares = {name: operator_profile(args.data, args.docs, bf16, args.batch_size, 4, scratch / f"prof-{name}")
              for name, bf16 in contenders.items()}
    for label in sorted(set(shares["fp32"]) | set(shares["bf16"]), key=lambda k: -shares["bf16"].get(k, 0)):
        print(f"| {label} | {shares['fp32'].get(label, 0):.1%} | {shares['bf16'].get(label, 0):.1%} |")


if __name__ == "__main__":
    main()
