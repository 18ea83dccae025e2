"""Training-step and cached-decode throughput: Cm3LeonForCausalLM vs transformers' OPTForCausalLM.

Both models get identical dimensions and identical weights (OPT configured as CM3Leon: pre-LN, no bias, no LayerNorm
affine, ReLU, tied head). The contenders are interleaved in one process and the medians reported, with the ratio
ours / OPT (≥ 1.0 means we are at least as fast).

    python bench/model.py                      # OPT-125M dims, 1 thread
    python bench/model.py --threads 2 --repeats 7
"""

import argparse
import platform
import statistics
import time

import torch

from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM
from cm3leon_hf.convert_opt import to_opt  # the parity test's weight mapping
from decode import OPT_125M_DIMS_PAPER_VOCAB  # bench/decode.py, beside this script

# OPT-125M's transformer with about OPT's own vocabulary size: 41,952 text + 8,192 image codes = 50,144 (OPT: 50,272)
OPT_125M_DIMS_OPT_VOCAB = {**OPT_125M_DIMS_PAPER_VOCAB, "text_vocab_size": 41_952}


def train_step(model, optimizer, ids):
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def decode(model, prompt, new_tokens):
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--prompt", type=int, default=32, help="decode prompt length")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = Cm3LeonConfig(**OPT_125M_DIMS_OPT_VOCAB)
    ours = Cm3LeonForCausalLM(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    opt = to_opt(ours)
    models = {"cm3leon": ours, "opt": opt}
    ids = torch.randint(20, config.vocab_size, (args.batch, args.seq))
    prompt = torch.randint(20, config.vocab_size, (1, args.prompt))
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in models.items()}

    times = {(name, job): [] for name in models for job in ("train", "decode")}
    for name, model in models.items():  # warm-up
        model.train()
        train_step(model, optimizers[name], ids)
        model.eval()
        decode(model, prompt, 4)
    for _ in range(args.repeats):
        for name, model in models.items():  # interleaved
            model.train()
            times[name, "train"].append(timed(lambda: train_step(model, optimizers[name], ids)))
            model.eval()
            with torch.no_grad():
                times[name, "decode"].append(timed(lambda: decode(model, prompt, args.new_tokens)))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"dims: {config.num_hidden_layers} layers x {config.hidden_size}, vocab {config.vocab_size}, "
          f"{ours.num_parameters() / 1e6:.1f}M parameters; medians of {args.repeats} interleaved runs")
    work = {"train": args.batch * args.seq, "decode": args.new_tokens}
    labels = {"train": f"train step tokens/s (batch {args.batch} x {args.seq}, AdamW)",
              "decode": f"cached greedy decode tokens/s (batch 1, prompt {args.prompt})"}
    for job in ("train", "decode"):
        rate = {name: work[job] / statistics.median(times[name, job]) for name in models}
        print(f"{labels[job]:<58} cm3leon {rate['cm3leon']:9.1f}   opt {rate['opt']:9.1f}   "
              f"ratio {rate['cm3leon'] / rate['opt']:.3f}")


if __name__ == "__main__":
    main()
