"""The cost of an SFT step with LoRA against full fine-tuning, for the equal-CPU-time comparison of issue 25.

One packed row of 1,024 tokens (the SFT recipe's row), forward + backward + AdamW step under bf16 autocast, on the
tiny model: full fine-tuning (every weight trains) vs PEFT LoRA r 16 / alpha 32 on q, k, v, out, fc1 and fc2 (the
adapter of `training/sft.py --use_peft`). Interleaved, medians of `--repeats` after one warm-up each; prints the
time ratio LoRA / full.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python bench/lora_step.py --threads 1
"""

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from cm3leon_hf import Cm3LeonForCausalLM
from cm3leon_hf.pretrained import TINY_PATH

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make(model_path: str, lora: bool):
    model = Cm3LeonForCausalLM.from_pretrained(model_path)
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_PATH))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(4, 3000, (1, 1024))
    runs = {"full": make(args.model, False), "lora": make(args.model, True)}

    def step(model, optimizer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    times = {name: [] for name in runs}
    for model, optimizer in runs.values():
        step(model, optimizer)
    for _ in range(args.repeats):
        for name, (model, optimizer) in runs.items():
            start = time.perf_counter()
            step(model, optimizer)
            times[name].append(time.perf_counter() - start)
    result = {f"{name}_seconds": statistics.median(t) for name, t in times.items()}
    result["lora_over_full"] = result["lora_seconds"] / result["full_seconds"]
    result["trainable"] = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, (m, _) in runs.items()}
    print(f"full {result['full_seconds']:.3f} s/step, LoRA {result['lora_seconds']:.3f} s/step: LoRA / full "
          f"{result['lora_over_full']:.2f}x; trainable {result['trainable']['full']:,} vs {result['trainable']['lora']:,}")
    return result


if __name__ == "__main__":
    main()
