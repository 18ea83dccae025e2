"""Score VQ image tokenizers on the synthetic world: what the exact evaluator reads back from their reconstructions.

PSNR stops predicting what matters here above ~34 dB (bench/RESULTS.md): one pixel too many on an 11-pixel circle
makes it a diamond. So tokenizers for this world are chosen on the evaluator's reading of reconstructed scenes of the
`validation` split (the `test` split is for `tests/test_image_tokenizer_quality.py` only). For each tokenizer this
prints one JSON line: PSNR, the fraction of scenes read back exactly (`scene_correct`), per attribute and by number of
objects, and, with `--context`, how often an object of a three-object scene is misread there and when drawn alone
(the gap is what a region's codes owe to the rest of the image: bench/RESULTS.md, "Where the limit was").

Commands:

```bash
# The shipped VQ:
python training/evaluate_image_tokenizer.py src/cm3leon_hf/pretrained/cm3leon-tiny/image_tokenizer --context
# Every checkpoint of a run (each `checkpoint-<step>/vq` is a diffusers VQModel directory):
python training/evaluate_image_tokenizer.py runs/vq/checkpoint-*/vq --num-scenes 1000
```
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from tqdm.auto import tqdm

from cm3leon_hf.image_tokenizer import IMAGE_TOKENIZER_CONFIG_NAME, Cm3LeonImageTokenizer
from cm3leon_hf.synthetic import SPLITS, Scene, make_row, read_scene, render
from cm3leon_hf.synthetic.evaluator import ATTRIBUTES, compare_scenes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="Cm3LeonImageTokenizer or diffusers VQModel directories.")
    parser.add_argument("--split", default="validation", choices=SPLITS)
    parser.add_argument("--num-scenes", type=int, default=1000, help="Scenes of the text_to_image task, from index 0.")
    parser.add_argument("--context", action="store_true", help="Also read three-object scenes' objects drawn alone.")
    parser.add_argument("--freeform", type=int, default=0, metavar="N",
                        help="Also N free-form drawings (cm3leon_hf.synthetic.freeform, a seed no training run draws\n"
                             "from) and the three user drawings: PSNR, and the share of drawings at >= 28 dB.")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    return parser


def load_image_tokenizer(path: Path) -> Cm3LeonImageTokenizer:
    """A saved `Cm3LeonImageTokenizer`, or a bare VQModel (a training checkpoint's `vq/`) with default settings."""
    if (path / IMAGE_TOKENIZER_CONFIG_NAME).is_file():
        return Cm3LeonImageTokenizer.from_pretrained(path)
    return Cm3LeonImageTokenizer(VQModel.from_pretrained(path))


def reconstruct(image_tokenizer: Cm3LeonImageTokenizer, images: list, batch_size: int) -> list:
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(image_tokenizer.decode(image_tokenizer.encode(images[start : start + batch_size])))
    return out


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def object_read(read: Scene, obj) -> bool:
    """Whether `read` holds an object with all of `obj`'s attributes."""
    return any(all(getattr(r, a) == getattr(obj, a) for a in ATTRIBUTES) for r in read.objects)


def evaluate(image_tokenizer: Cm3LeonImageTokenizer, scenes: list[Scene], images: list, args) -> dict:
    reconstructions = reconstruct(image_tokenizer, images, args.batch_size)
    reads = [read_scene(r) for r in reconstructions]
    scores = [compare_scenes(read, s) for read, s in zip(reads, scenes)]
    counts = np.array([len(s.objects) for s in scenes])
    correct = np.array([s["scene_correct"] for s in scores])
    result = {
        "psnr": round(float(np.mean([psnr(a, b) for a, b in zip(images, reconstructions)])), 2),
        "scene_correct": round(float(correct.mean()), 4),
        **{a: round(float(np.mean([s[a] for s in scores])), 4) for a in ATTRIBUTES},
        "by_objects": {int(n): f"{int(correct[counts == n].sum())}/{int((counts == n).sum())}" for n in np.unique(counts)},
    }
    if args.context:
        busy = [(s, o, read) for s, read in zip(scenes, reads) if len(s.objects) == 3 for o in s.objects]
        alone_images = [render(Scene(s.background, (o,))) for s, o, _ in busy]
        alone = reconstruct(image_tokenizer, alone_images, args.batch_size)
        together_ok = np.array([object_read(read, o) for _, o, read in busy])
        alone_ok = np.array([object_read(read_scene(r), o) for (_, o, _), r in zip(busy, alone)])
        result["context"] = {
            "objects": len(busy),
            "misread_in_scene": round(float(1 - together_ok.mean()), 4),
            "misread_alone": round(float(1 - alone_ok.mean()), 4),
        }
    return result


FREEFORM_TEST_SEED = 2_000_003  # neither training batches (--seed) nor training evals (1_000_003) draw from it


def evaluate_freeform(image_tokenizer: Cm3LeonImageTokenizer, count: int, batch_size: int) -> dict:
    """PSNR of free-form drawings (`count` of them) and of the user drawings."""
    from cm3leon_hf.synthetic.freeform import drawing_image, user_drawings

    resolution = image_tokenizer.resolution
    drawings = [drawing_image(i, resolution, seed=FREEFORM_TEST_SEED) for i in range(count)]
    values = np.array([psnr(a, b) for a, b in zip(drawings, reconstruct(image_tokenizer, drawings, batch_size))])
    users = user_drawings(resolution)
    user_values = [psnr(a, b) for a, b in zip(users.values(), reconstruct(image_tokenizer, list(users.values()), batch_size))]
    return {
        "drawings": count,
        "psnr": round(float(values.mean()), 2),
        "psnr_p10": round(float(np.percentile(values, 10)), 2),
        "at_least_28db": round(float((values >= 28).mean()), 4),
        "user_drawings": {name: round(v, 2) for name, v in zip(users, user_values)},
    }


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_scenes", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.freeform < 0:
        parser.error(f"--freeform must be at least 0, got {args.freeform}")
    torch.set_num_threads(args.threads)
    rows = [make_row("text_to_image", args.split, i) for i in tqdm(range(args.num_scenes), desc="scenes", leave=False)]
    scenes = [Scene.from_json(r["scene"]) for r in rows]
    images = [r["images"][0] for r in rows]
    results = []
    for path in args.paths:
        result = {"path": str(path), "split": args.split, "scenes": len(scenes)}
        image_tokenizer = load_image_tokenizer(path)
        result.update(evaluate(image_tokenizer, scenes, images, args))
        if args.freeform:
            result["freeform"] = evaluate_freeform(image_tokenizer, args.freeform, args.batch_size)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
