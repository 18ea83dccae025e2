"""Benchmark of the tokenization path: VQ encode/decode images/s and processor examples/s.

Each measurement is compared, in the same run, with a reference that does the same tensor work without our code:

- `encode`: `Cm3LeonImageTokenizer.encode(PIL images)` (conversion, resize check, batching, quantization) vs the
  reference `VQModel.encode` + `quantize` on a ready pixel tensor. The ratio is our overhead around diffusers.
- `decode`: `Cm3LeonImageTokenizer.decode(codes)` (validation, lookup, uint8 PIL images) vs the reference
  `VQModel.decode(indices, force_not_quantize=True)` returning the float tensor.
- `processor`: `Cm3LeonProcessor(texts, images=…)` on synthetic caption–image pairs (batch 32, padded) vs the
  reference: the image tokenizer's `encode` of the same images plus one batched call of the text tokenizer.
- transformers' VQ-VAEs (issue 26): `TransformersVQImageTokenizer` over `JanusVQVAE`, `ChameleonVQVAE` and `Emu3VQVAE`
  at their released shapes (their config classes' defaults) with random weights (`torch.manual_seed(0)`), each with
  its own image processor set to the resolution: Janus-Pro at 384² (24×24 = 576 codes of 16,384; `num_patches=24`,
  the config's default 32 being 512²), Chameleon at 512² (32×32 = 1,024 codes of 8,192), Emu3 at `--emu3-resolution`
  (default 128²: 16×16 = 256 codes of 32,768; Emu3's VQ has no fixed resolution, and at 512² one image takes minutes
  to encode on one CPU thread; ours and the reference both scale with the pixels, so the ratio carries over).
  `encode`: ours `encode(PIL images)` vs the reference a user writes with transformers alone,
  `image_processor(images, return_tensors="pt")` then `vq_model.encode(pixel_values).image_tokens` (Emu3: with the
  processor's `image_sizes`). The image processor is in both, so the ratio is purely our overhead (RGB conversion,
  shape checks, reshaping). `decode`: ours `decode(codes)` → uint8 PIL vs the reference `vq_model.decode(codes)` (Emu3:
  codes as `(batch, grid, grid)`) → the float tensor, so the code check and the postprocess to PIL count as ours.
  Chameleon has no decoder (transformers' `ChameleonVQVAE` ships only the encoder): encode only, and its decode rows
  say so. The warm-up pair checks that ours and the reference give the same codes (and, postprocessed, the same
  pixels); each row also times the work outside the VQ alone (medians of 9 pairs: our preprocessing vs the processor
  call; our code check and postprocess vs nothing). Ratios are printed both ways: ours/reference speed (as the other
  rows) and ours/reference time, whose target is ≤ 1.10. Batches `--transformers-batches` (1 and 2), medians of
  `--transformers-repeats` (3) pairs; these are big on a CPU (one thread: Janus ~4.5 s to encode and ~8 s to decode
  an image, Chameleon ~8.5 s to encode, Emu3 at 128² ~10 s and ~24 s), so run them one model at a time.

Runs of ours and the reference are interleaved; each figure is the median over `--repeats` pairs of runs, after one
warm-up. VQs: the shipped tiny one (64², f=8, 2,048 codes) and one of the paper's shape with random weights (256², f=8,
8192 codes: LDM's VQ-f8 widths 128-128-256-512, 2 layers per block).

Commands:

```bash
flock /tmp/cm3leon-heavy.lock python bench/tokenization.py --threads 1
flock /tmp/cm3leon-heavy.lock python bench/tokenization.py --threads 2 --json runs/bench_tokenization.json
# transformers' VQ-VAEs only, one model per run (~5, ~4, ~4.5 and ~9 minutes on one thread):
python bench/tokenization.py --threads 1 --transformers-only --transformers-models janus
python bench/tokenization.py --threads 1 --transformers-only --transformers-models chameleon
python bench/tokenization.py --threads 1 --transformers-only --transformers-models emu3 --transformers-batches 1
python bench/tokenization.py --threads 1 --transformers-only --transformers-models emu3 --transformers-batches 2
# the rest without them:
python bench/tokenization.py --threads 1 --skip-transformers
```
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from diffusers import VQModel
from transformers import (
    ChameleonImageProcessorPil,
    ChameleonVQVAE,
    ChameleonVQVAEConfig,
    Emu3ImageProcessor,
    Emu3VQVAE,
    Emu3VQVAEConfig,
    JanusImageProcessorPil,
    JanusVQVAE,
    JanusVQVAEConfig,
)

from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor
from cm3leon_hf.synthetic import make_row
from cm3leon_hf.transformers_image_tokenizers import TransformersVQImageTokenizer

TRANSFORMERS_KINDS = ("janus", "chameleon", "emu3")


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


def interleaved(ours, reference, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Median seconds of `ours()` and `reference()` over `repeats` interleaved pairs, after one warm-up of each
    (`warmup=False`: the caller ran it)."""
    if warmup:
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


def transformers_image_tokenizer(kind: str, emu3_resolution: int) -> tuple[TransformersVQImageTokenizer, str]:
    """One of transformers' VQ-VAEs at its released shape (its config class's defaults), random weights (seed 0),
    wrapped with its own image processor set to the resolution; and the row's label."""
    torch.manual_seed(0)
    if kind == "janus":
        # JanusVQVAEConfig's defaults are Janus-Pro's VQ (LlamaGen's VQ-16: widths 128-128-256-256-512, 2 res blocks,
        # f=16, 16,384 codes of dimension 8) but for num_patches, 32 (512²): Janus-Pro runs it at 384², 24×24 = 576
        # codes, which JanusVQVAE.decode checks against num_patches.
        vq = JanusVQVAE(JanusVQVAEConfig(num_patches=24))
        processor = JanusImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        tokenizer = TransformersVQImageTokenizer(vq, processor)
    elif kind == "chameleon":
        # ChameleonVQVAEConfig's defaults: 512², widths 128-128-256-256-512, f=16 → 32×32 = 1,024 codes of 8,192. Its
        # processor's defaults: shortest edge 512, centre crop 512×512, pixels to [-1, 1].
        vq = ChameleonVQVAE(ChameleonVQVAEConfig())
        tokenizer = TransformersVQImageTokenizer(vq, ChameleonImageProcessorPil())
    elif kind == "emu3":
        # Emu3VQVAEConfig's defaults: widths 256-512-512-1024, f=8, 32,768 codes, 4 frames per image (temporal factor
        # 4); no fixed resolution, so the processor's min_pixels = max_pixels = resolution² and `resolution=`.
        side = emu3_resolution
        vq = Emu3VQVAE(Emu3VQVAEConfig())
        tokenizer = TransformersVQImageTokenizer(vq, Emu3ImageProcessor(min_pixels=side * side, max_pixels=side * side),
                                                 resolution=side)
    else:
        raise ValueError(f"Unknown transformers VQ-VAE {kind!r}; choose from {TRANSFORMERS_KINDS}.")
    grid, res = tokenizer.grid_size, tokenizer.resolution
    label = f"{kind} ({res}², {grid}×{grid} = {tokenizer.image_seq_length:,} codes of {tokenizer.codebook_size:,})"
    return tokenizer, label


def bench_transformers_vq(tokenizer: TransformersVQImageTokenizer, label: str, images: list, batches, repeats: int):
    """Rows for one wrapped transformers VQ-VAE. Encode: ours `tokenizer.encode(PIL images)` vs the reference a user
    writes with transformers alone: `image_processor(images, return_tensors="pt")` then `vq_model.encode(...)`
    `.image_tokens` (Emu3: with the processor's `image_sizes`). Decode: ours `tokenizer.decode(codes)` → uint8 PIL vs
    the reference `vq_model.decode(codes)` (Emu3: codes as `(batch, grid, grid)`) → the float tensor. The warm-up
    pair also checks that both compute the same codes and, once postprocessed, the same pixels."""
    vq, processor, kind, results = tokenizer.vq_model, tokenizer.image_processor, tokenizer.kind, []
    grid, res = tokenizer.grid_size, tokenizer.resolution
    name = label.split(" ")[0]
    for batch in batches:
        batch_images = [image.resize((res, res)) for image in images[:batch]]
        generator = torch.Generator().manual_seed(batch)
        codes = torch.randint(0, tokenizer.codebook_size, (batch, tokenizer.image_seq_length), generator=generator)

        @torch.no_grad()
        def reference_encode():
            inputs = processor(batch_images, return_tensors="pt")
            if kind == "emu3":
                return torch.stack(vq.encode(inputs["pixel_values"], image_sizes=inputs["image_sizes"]).image_tokens)
            return vq.encode(inputs["pixel_values"]).image_tokens

        @torch.no_grad()
        def reference_decode():
            return vq.decode(codes.view(batch, grid, grid) if kind == "emu3" else codes)

        ops = [("encode", lambda: tokenizer.encode(batch_images, batch_size=batch), reference_encode)]
        if kind != "chameleon":
            ops.append(("decode", lambda: tokenizer.decode(codes, batch_size=batch), reference_decode))
        for op, ours, reference in ops:
            ours_out, reference_out = ours(), reference()  # the warm-up, and a check that both do the same work
            if op == "encode":
                assert torch.equal(ours_out, reference_out.reshape(batch, -1).long()), "ours and the reference differ"
                # the work outside the VQ, alone (milliseconds, so 9 pairs are cheap): our preprocessing (RGB
                # conversion, the processor, the shape check) vs the processor call
                outside = interleaved(lambda: tokenizer.preprocess(batch_images),
                                      lambda: processor(batch_images, return_tensors="pt")["pixel_values"], 9)
            else:
                expected = tokenizer.postprocess(reference_out)
                assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours_out, expected))

                def ours_outside():  # ours only: the code check, the postprocess to uint8 PIL images
                    tokenizer.check_codes(codes)
                    return tokenizer.postprocess(reference_out)

                outside = interleaved(ours_outside, lambda: None, 9)
            t_ours, t_ref = interleaved(ours, reference, repeats, warmup=False)
            row = {
                "vq": label,
                "op": op,
                "batch": batch,
                "images_per_s": batch / t_ours,
                "reference_images_per_s": batch / t_ref,
                "ratio": t_ref / t_ours,
                "time_ratio": t_ours / t_ref,
                "outside_vq_s": {"ours": outside[0], "reference": outside[1]},
            }
            results.append(row)
            print(
                f"{name:>12} {op} batch {batch:>2}: {batch / t_ours:9.3f} images/s "
                f"(reference {batch / t_ref:9.3f}; ours/reference speed {t_ref / t_ours:.2f}, time "
                f"{t_ours / t_ref:.3f}, target <= 1.10; outside the VQ {outside[0] * 1e3:.1f} ms vs "
                f"{outside[1] * 1e3:.1f} ms)",
                flush=True,
            )
        if kind == "chameleon":
            reason = "ChameleonVQVAE has no decoder: encode only"
            results.append({"vq": label, "op": "decode", "batch": batch, "skipped": reason})
            print(f"{name:>12} decode batch {batch:>2}: skipped ({reason})", flush=True)
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
    parser.add_argument("--skip-transformers", action="store_true",
                        help="Leave out the rows of transformers' VQ-VAEs (Janus, Chameleon, Emu3).")
    parser.add_argument("--transformers-only", action="store_true",
                        help="Only the rows of transformers' VQ-VAEs (no tiny VQ, processor or paper shape).")
    parser.add_argument("--transformers-models", nargs="+", choices=TRANSFORMERS_KINDS, default=list(TRANSFORMERS_KINDS),
                        help="Which of transformers' VQ-VAEs to run.")
    parser.add_argument("--transformers-batches", nargs="+", type=int, default=[1, 2],
                        help="Batch sizes for transformers' VQ-VAEs.")
    parser.add_argument("--transformers-repeats", type=int, default=3,
                        help="Interleaved pairs of runs per figure for transformers' VQ-VAEs.")
    parser.add_argument("--emu3-resolution", type=int, default=128,
                        help="Side of Emu3's square images (its VQ has no fixed resolution; f=8).")
    parser.add_argument("--json", help="Write the results to this file.")
    args = parser.parse_args(argv)
    if args.skip_transformers and args.transformers_only:
        parser.error("--skip-transformers and --transformers-only leave nothing to run.")
    torch.set_num_threads(args.threads)

    rows = [make_row("text_to_image", "test", i) for i in range(32)]
    images = [r["images"][0] for r in rows]
    results = {"threads": args.threads}
    if not args.transformers_only:
        processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
        results["vq"] = bench_vq("tiny", processor.image_tokenizer, images, args.repeats)
        results["processor"] = bench_processor(processor, rows, args.repeats)
        if not args.skip_paper:
            paper = Cm3LeonImageTokenizer(paper_shape_vq())
            big = [im.resize((256, 256)) for im in images]
            results["vq"] += bench_vq("paper-shape", paper, big, args.paper_repeats)
    if not args.skip_transformers:
        results["transformers_vq"] = []
        for kind in args.transformers_models:
            tokenizer, label = transformers_image_tokenizer(kind, args.emu3_resolution)
            print(f"{label}: {sum(p.numel() for p in tokenizer.vq_model.parameters()) / 1e6:.1f}M parameters",
                  flush=True)
            results["transformers_vq"] += bench_transformers_vq(tokenizer, label, images, args.transformers_batches,
                                                                args.transformers_repeats)
            del tokenizer
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
