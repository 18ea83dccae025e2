"""Steps/s of training/train_image_tokenizer.py (accelerate, transformers' schedule, TRL's parser) against the
hand-written loop it replaced, on the tiny VQ's recipe, and whether the two give the same weights.

Contenders, interleaved in one process (round-robin, `--repeats` rounds, medians):
  accelerate    `train_image_tokenizer.main` of this checkout.
  hand-written  the same file at `--reference` (a commit before the rewrite, read with `git show`), with its own
                schedule swapped for transformers' (the rewrite's one change of behaviour), so both do the same work.
Each run trains `--steps` steps from scratch (the recipe's model, data and dead-code restarts; no evals inside) and
reports its training seconds (`elapsed_s`: the loop, without data set-up and the final eval). After every pair the
final VQ weights are compared bit for bit.

    python bench/vq_training.py --steps 150 --repeats 3
"""

import argparse
import functools
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))
import train_image_tokenizer  # noqa: E402


def hand_written(reference: str, directory: Path):
    """The training script at commit `reference`, importable, on transformers' schedule."""
    from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda

    path = directory / "train_image_tokenizer_reference.py"
    path.write_text(subprocess.run(["git", "show", f"{reference}:training/train_image_tokenizer.py"], cwd=REPO,
                                   check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("train_image_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def learning_rate(step, args):
        return args.learning_rate * _get_cosine_schedule_with_warmup_lr_lambda(
            step, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps, num_cycles=0.5,
            min_lr_rate=args.min_learning_rate / args.learning_rate)

    module.learning_rate = learning_rate
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", default="7113d70", help="a commit with the hand-written loop")
    parser.add_argument("--synthetic-rows", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-vq-"))
    contenders = {"accelerate": train_image_tokenizer, "hand-written": hand_written(args.reference, work)}
    common = ["--config", str(REPO / "training" / "recipes" / "image_tokenizer_tiny.yaml"), "--max-steps",
              str(args.steps), "--synthetic-rows", str(args.synthetic_rows), "--synthetic-cache", str(work / "cache"),
              "--eval-every", "0", "--eval-images", "50", "--checkpoint-every", str(args.steps), "--threads", "1"]
    contenders["accelerate"].main(common + ["--output-dir", str(work / "warmup"), "--max-steps", "5"])
    seconds = {name: [] for name in contenders}
    identical = []
    for repeat in range(args.repeats):
        for name, module in contenders.items():
            out = work / f"{name}-{repeat}"
            seconds[name].append(module.main(common + ["--output-dir", str(out)])["elapsed_s"])
        a, b = (load_file(work / f"{name}-{repeat}" / "image_tokenizer" / "diffusion_pytorch_model.safetensors")
                for name in contenders)
        identical.append(all(torch.equal(a[k], b[k]) for k in a))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    for name, s in seconds.items():
        print(f"{name:>13}: {args.steps / median[name]:.2f} steps/s (median of {s} s)")
    print(f"ratio accelerate / hand-written (steps/s): {median['hand-written'] / median['accelerate']:.3f}")
    print(f"bit-identical weights in every pair: {all(identical)}")


if __name__ == "__main__":
    main()
