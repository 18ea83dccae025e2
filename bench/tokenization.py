"""Benchmark of the tokenization path: VQ encode/decode images/s and processor examples/s.

Each measurement is compared, in the same run, with a reference that does the same tensor work without our code:

- `encode`: `Cm3LeonImageTokenizer.encode(PIL images)` (conversion, resize check, batching, quantization) vs the
  reference `VQModel.encode` + `quantize` on a ready pixel tensor. The ratio is our overhead around diffusers.
- `decode`: `Cm3LeonImageTokenizer.decode(codes)` (validation, lookup, uint8 PIL images) vs the reference
  `VQModel.decode(indices, force_not_quantize=True)` returning the float tensor.
- `processor`: `Cm3LeonProcessor(texts, images=…)` on synthetic caption–image pairs (batch 32, padded) vs the
  reference: the image tokenizer's `encode` of the same images plus one batched call of the text tokenizer.

Runs of ours and the reference are interleaved; each figure is the median over `--repeats` pairs of runs, after one
warm-up. VQs: the shipped tiny one (64², f=8, 2,048 codes) and one of the paper's shape with random weights (256², f=8,
8192 codes: LDM's VQ-f8 widths 128-128-256-512, 2 layers per block).

Commands:

```bash
flock /tmp/cm3leon-heavy.lock python bench/tokenization.py --threads 1
flock /tmp/cm3leon-heavy.lock python bench/tokenization.py --threads 2 --json runs/bench_tokenization.json
```
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import VQModel

from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor
from cm3leon_hf.synthetic import make_row


def paper_shape_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=(128, 128, 256, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        vq_embed_dim=4,
        num_vq_embeddings=8192,
        norm_num_groups=32,
        sample_size=256,
        lookup_from_codebook=True,
    ).eval()


def interleaved(ours, reference, repeats: int) -> tuple[float, float]:
    """Median seconds of `ours()` and `reference()` over `repeats` interleaved pairs, after one warm-up of each."""
    ours(), reference()
    times = {"ours": [], "reference": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("reference", reference)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["reference"])


def bench_vq(name: str, image_tokenizer: Cm3LeonImageTokenizer, images: list, repeats: int) -> list[dict]:
    vq, results = image_tokenizer.vq_model, []
    for batch in (1, 32):
        batch_images = images[:batch]
        pixels = image_tokenizer.preprocess(batch_images)
        codes = image_tokenizer.encode(batch_images)
        shape = (batch, image_tokenizer.grid_size, image_tokenizer.grid_size, image_tokenizer.embed_dim)

        @torch.no_grad()
        def reference_encode():
            return vq.quantize(vq.encode(pixels).latents)[2][2]

        @torch.no_grad()
        def reference_decode():
            return vq.decode(codes.flatten(), force_not_quantize=True, shape=shape).sample

        for op, ours, reference in (
            ("encode", lambda: image_tokenizer.encode(batch_images, batch_size=32), reference_encode),
            ("decode", lambda: image_tokenizer.decode(codes, batch_size=32), reference_decode),
        ):
            t_ours, t_ref = interleaved(ours, reference, repeats)
            results.append(
                {
                    "vq": name,
                    "op": op,
                    "batch": batch,
                    "images_per_s": batch / t_ours,
                    "reference_images_per_s": batch / t_ref,
                    "ratio": t_ref / t_ours,
                }
            )
            print(
                f"{name:>12} {op} batch {batch:>2}: {batch / t_ours:9.1f} images/s "
                f"(reference {batch / t_ref:9.1f}; ours/reference speed {t_ref / t_ours:.2f})",
                flush=True,
            )
    return results


def bench_processor(processor: Cm3LeonProcessor, rows: list, repeats: int) -> dict:
    texts = [r["text"] for r in rows]
    images = [r["images"] for r in rows]
    flat = [im for r in rows for im in r["images"]]

    def reference():
        processor.image_tokenizer.encode(flat)
        processor.tokenizer(texts, add_special_tokens=False)

    t_ours, t_ref = interleaved(lambda: processor(texts, images=images, return_tensors="pt"), reference, repeats)
    result = {
        "op": "processor",
        "batch": len(rows),
        "examples_per_s": len(rows) / t_ours,
        "reference_examples_per_s": len(rows) / t_ref,
        "ratio": t_ref / t_ours,
    }
    print(
        f"   processor batch {len(rows)} pairs: {result['examples_per_s']:9.1f} examples/s "
        f"(reference {result['reference_examples_per_s']:9.1f}; ours/reference speed {result['ratio']:.2f})",
        flush=True,
    )
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved pairs of runs per figure (tiny VQ).")
    parser.add_argument("--paper-repeats", type=int, default=3, help="Interleaved pairs for the paper-shape VQ.")
    parser.add_argument("--skip-paper", action="store_true", help="Only the tiny VQ and the processor.")
    parser.add_argument("--json", help="Write the results to this file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = [make_row("text_to_image", "test", i) for i in range(32)]
    images = [r["images"][0] for r in rows]
    processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    results = {"threads": args.threads, "vq": bench_vq("tiny", processor.image_tokenizer, images, args.repeats)}
    results["processor"] = bench_processor(processor, rows, args.repeats)
    if not args.skip_paper:
        paper = Cm3LeonImageTokenizer(paper_shape_vq())
        big = [im.resize((256, 256)) for im in images]
        results["vq"] += bench_vq("paper-shape", paper, big, args.paper_repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
