"""Benchmark of the synthetic world: generation and evaluation speed, each against a reference in the same run.

    PYTHONPATH=src python bench/synthetic.py            # the full run (~3 minutes on a 2-core CPU)
    PYTHONPATH=src python bench/synthetic.py --quick    # 10× fewer rows

Measures, printed as a markdown table (copied into bench/RESULTS.md):

1. Rows/s of `tasks.build_row` + PNG encoding (text_to_image) at 64² and 256², against plain PIL PNG encoding
   (default settings) of the same images: the ratio says what scene sampling, captions and our encoder
   settings cost or save relative to just writing the pictures.
2. `build_task("text_to_image")` end to end (Arrow through `datasets.Dataset.from_generator`) for
   `--rows` 64² pairs: the issue's target is 100k pairs in under a minute.
3. `read_scene` images/s at 64² and 256², against PIL PNG decoding of the same images (the evaluator's
   cost in "PNG decodes").
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from cm3leon_hf.synthetic.drawing import encode_png
from cm3leon_hf.synthetic.evaluator import read_scene
from cm3leon_hf.synthetic.tasks import build_row, build_task


def _rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def _png_default(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def generation(resolution: int, n: int) -> tuple[float, float]:
    """(our rows/s, reference PIL-encode images/s) on the same images."""
    ours = _rate(n, lambda: [[encode_png(a) for a in build_row("text_to_image", "train", i, resolution=resolution)["images"]] for i in range(n)])
    images = [build_row("text_to_image", "train", i, resolution=resolution)["images"][0] for i in range(n)]
    reference = _rate(n, lambda: [_png_default(a) for a in images])
    return ours, reference


def evaluation(resolution: int, n: int) -> tuple[float, float]:
    """(read_scene images/s, reference PNG decodes/s) on the same images."""
    images = [build_row("text_to_image", "test", i, resolution=resolution)["images"][0] for i in range(n)]
    pngs = [encode_png(a) for a in images]
    read_scene(images[0])  # builds the colour lookup table once
    ours = _rate(n, lambda: [read_scene(a) for a in images])
    reference = _rate(n, lambda: [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs])
    return ours, reference


def dataset_build(rows: int) -> float:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        built = build_task("text_to_image", num_train=rows, num_validation=0, num_test=0, num_heldout=0, cache_dir=cache)
        seconds = time.perf_counter() - start
        assert len(built["train"]) == rows
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x fewer rows")
    parser.add_argument("--rows", type=int, default=100_000, help="pairs for the end-to-end dataset build")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    rows = args.rows // scale
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs; numpy {np.__version__}")
    print("| measurement | ours | reference | ratio |")
    print("|---|---|---|---|")
    gen = {}
    for resolution, n in ((64, 5000 // scale), (256, 1000 // scale)):
        ours, ref = generation(resolution, n)
        gen[resolution] = ours
        print(f"| generate + PNG-encode {resolution}² rows/s (vs PIL default PNG encode only) | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f} |")
    print(f"| 64² vs 256² generation rows/s | {gen[64]:,.0f} | {gen[256]:,.0f} | {gen[64] / gen[256]:.1f} |")
    seconds = dataset_build(rows)
    print(f"| build_task text_to_image, {rows:,} pairs at 64² (Arrow), seconds (vs 60 s target) | {seconds:.1f} | 60 | {seconds / 60:.2f} |")
    print(f"| build_task rows/s | {rows / seconds:,.0f} | | |")
    ev = {}
    for resolution, n in ((64, 5000 // scale), (256, 1000 // scale)):
        ours, ref = evaluation(resolution, n)
        ev[resolution] = ours
        print(f"| read_scene {resolution}² images/s (vs PIL PNG decode) | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f} |")
    print(f"| 64² vs 256² read_scene images/s | {ev[64]:,.0f} | {ev[256]:,.0f} | {ev[64] / ev[256]:.1f} |")


if __name__ == "__main__":
    main()
