"""Image tokens/s with classifier-free guidance: our batched streams vs transformers' two-forward CFG vs the unguided
floor, interleaved in one process with the same weights.

Contenders (every run writes `--new-tokens` image tokens per prompt, CFG scale 3, top-p 0.8):
  ours        `Cm3LeonForCausalLM.generate(guidance_scale=3, generate_image=True)` with a dynamic cache: conditional and
              unconditional streams as rows of ONE forward per token; the LM head computes only the image columns.
  static      the same with `cache_implementation="static"` (the default for images on CUDA; slower on CPU).
  unbatched   `generate(guidance_scale=3, negative_prompt_ids=...)`: transformers'
              `UnbatchedClassifierFreeGuidanceLogitsProcessor`, a second forward with its own cache per token (as HF
              Emu3 does), with our image-token constraint so that it writes images too.
  floor       plain unguided top-p sampling through `generate` (one stream, full LM head): the cost floor.

For each it prints tokens/s (new tokens per prompt x prompts / s), the ratios ours/unbatched and ours/floor, and the
fraction of this machine's memory-bandwidth limit reached: weight bytes read per decoding step x steps/s, divided by
the read bandwidth measured here (a large tensor reduction).

    python bench/decode.py                         # tiny + OPT-125M dims, batch 1 and 8, fp32 and bf16, 1 thread
    python bench/decode.py --sizes tiny --batches 1 --dtypes float32 --repeats 5
    python bench/decode.py --device cuda --sizes 350m --dtypes bfloat16 --new-tokens 1024   # a GPU: one 1024-token image

It also prints seconds per image (`image_seq_length` tokens at the measured rate, batch 1) and the bandwidth floor:
the weights one step reads, times the steps of one image, over the measured read bandwidth.
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import GenerationMixin, LogitsProcessorList

from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM
from cm3leon_hf.logits_process import ImageTokenConstraintLogitsProcessor

HUB_CONFIGS = Path(__file__).resolve().parent.parent / "hub_configs"
OPT_125M_DIMS_PAPER_VOCAB = dict(  # OPT-125M's transformer with the paper's vocabulary (56,320 + 8,192 = 64,512)
    text_vocab_size=56320,
    image_vocab_size=8192,
    image_seq_length=1024,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=2048,
)


def read_bandwidth(device: str = "cpu", gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large float32 reduction: what one core (or the thread pool, or the GPU) can stream from memory."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    x.sum()
    best = min(timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(size: str, dtype: torch.dtype, device: str = "cpu") -> Cm3LeonForCausalLM:
    if size == "opt-125m":
        config = Cm3LeonConfig(**OPT_125M_DIMS_PAPER_VOCAB)
    else:
        config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / f"cm3leon-{size}")
    torch.manual_seed(0)
    model = Cm3LeonForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype)


def weight_bytes_per_step(model: Cm3LeonForCausalLM, lm_head_rows: int) -> int:
    """Bytes of weights one decoding step reads: every layer, `lm_head_rows` rows of the (tied) head; the embedding
    lookup and positions read only a few rows."""
    config = model.config
    element = next(model.parameters()).element_size()
    layers = sum(p.numel() for p in model.model.layers.parameters())
    return (layers + lm_head_rows * config.hidden_size) * element


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "opt-125m"], choices=["tiny", "opt-125m", "350m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64, help="image tokens per prompt and run")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length (<eos> text <break>)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bandwidth = read_bandwidth(args.device)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {args.threads} torch thread(s), "
          f"torch {torch.__version__}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{args.new_tokens} image tokens per prompt, prompt {args.prompt} tokens, CFG 3, top-p 0.8, medians of "
          f"{args.repeats} interleaved runs")
    header = (f"{'size':<9}{'dtype':<10}{'batch':>5}  {'ours':>9} {'static':>9} {'unbatched':>9} {'floor':>9}   "
              f"{'ours/unb':>8} {'static/ours':>11} {'ours/floor':>10}   s/image ours / static / bandwidth floor   "
              f"bandwidth used: ours / unbatched / floor")
    print(header)
    for size in args.sizes:
        for dtype_name in args.dtypes:
            model = build(size, getattr(torch, dtype_name), args.device)
            config = model.config
            for batch in args.batches:
                g = torch.Generator().manual_seed(0)
                text = torch.randint(30, config.text_vocab_size, (batch, args.prompt - 2), generator=g)
                eos = torch.full((batch, 1), config.eos_token_id)
                brk = torch.full((batch, 1), config.break_token_id)
                prompt = torch.cat([eos, text, brk], dim=1).to(args.device)
                uncond = torch.tensor([[config.eos_token_id, config.mask_token_id, config.break_token_id]] * batch,
                                      device=args.device)
                sampling = dict(do_sample=True, top_p=0.8, top_k=0, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens)
                constraint = LogitsProcessorList([ImageTokenConstraintLogitsProcessor(
                    config.image_token_offset, config.image_vocab_size, config.image_seq_length,
                    [config.break_token_id, config.eos_token_id], config.vocab_size, generate_image=True)])
                runs = {
                    "ours": lambda: model.generate(prompt, guidance_scale=3.0, generate_image=True,
                                                   cache_implementation="dynamic", **sampling),
                    "static": lambda: model.generate(prompt, guidance_scale=3.0, generate_image=True,
                                                     cache_implementation="static", **sampling),
                    "unbatched": lambda: GenerationMixin.generate(
                        model, prompt, guidance_scale=3.0, negative_prompt_ids=uncond,
                        logits_processor=constraint, **sampling),
                    "floor": lambda: model.generate(prompt, **sampling),
                }
                times = {name: [] for name in runs}
                with torch.no_grad():
                    for run in runs.values():  # warm-up
                        run()
                    for _ in range(args.repeats):
                        for name, run in runs.items():
                            times[name].append(timed(run))
                rate = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
                steps = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
                floor_s = weight_bytes_per_step(model, config.image_vocab_size) * config.image_seq_length / bandwidth
                per_image = {n: config.image_seq_length / steps[n] for n in ("ours", "static")}
                used = {
                    "ours": weight_bytes_per_step(model, config.image_vocab_size) * steps["ours"],
                    "unbatched": 2 * weight_bytes_per_step(model, config.vocab_size) * steps["unbatched"],
                    "floor": weight_bytes_per_step(model, config.vocab_size) * steps["floor"],
                }
                print(f"{size:<9}{dtype_name:<10}{batch:>5}  {rate['ours']:9.1f} {rate['static']:9.1f} "
                      f"{rate['unbatched']:9.1f} {rate['floor']:9.1f}   {rate['ours'] / rate['unbatched']:8.2f} "
                      f"{rate['static'] / rate['ours']:11.2f} {rate['ours'] / rate['floor']:10.2f}   "
                      f"{per_image['ours']:.3f} / {per_image['static']:.3f} / {floor_s:.3f}   "
                      + " / ".join(f"{used[n] / bandwidth:.0%}" for n in ("ours", "unbatched", "floor")), flush=True)


if __name__ == "__main__":
    main()
