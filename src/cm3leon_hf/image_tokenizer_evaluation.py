"""VQ image tokenizers scored on the synthetic world: what its exact evaluator reads back from their reconstructions.

PSNR stops predicting what matters here above ~34 dB (bench/RESULTS.md): one pixel too many on an 11-pixel circle
makes it a diamond. So tokenizers for this world are chosen on the evaluator's reading of reconstructed scenes
(`evaluate_scenes`): the fraction of scenes read back exactly (`scene_correct`), per attribute and by number of objects,
and, with `context`, how often an object of a three-object scene is misread there and when drawn alone (the gap is
what a region's codes owe to the rest of the image). `evaluate_freeform` gives the PSNR of free-form drawings. The
command is `training/evaluate_image_tokenizer.py`.

Example:

>>> from PIL import Image
>>> black, white = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 255, 255))
>>> psnr(black, white), round(psnr(black, black), 2)
(0.0, 148.13)
"""


import numpy as np

from .image_tokenizer import Cm3LeonImageTokenizer, load_image_tokenizer
from .synthetic import Scene, read_scene, render
from .synthetic.evaluator import ATTRIBUTES, compare_scenes

FREEFORM_TEST_SEED = 2_000_003  # neither training batches (--seed) nor training evals (1_000_003) draw from it


def reconstruct(image_tokenizer: Cm3LeonImageTokenizer, images: list, batch_size: int) -> list:
    """`images` encoded and decoded by `image_tokenizer`, `batch_size` at a time."""
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(image_tokenizer.decode(image_tokenizer.encode(images[start : start + batch_size])))
    return out


def psnr(a, b) -> float:
    """The PSNR of two 8-bit images in dB (148.13 for identical ones: the squared error is floored at 1e-10)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def object_read(read: Scene, obj) -> bool:
    """Whether `read` holds an object with all of `obj`'s attributes."""
    return any(all(getattr(r, a) == getattr(obj, a) for a in ATTRIBUTES) for r in read.objects)


def evaluate_scenes(image_tokenizer: Cm3LeonImageTokenizer, scenes: list[Scene], images: list, *,
                    batch_size: int = 100, context: bool = False) -> dict:
    """What the synthetic world's evaluator reads back from `image_tokenizer`'s reconstructions of `images`.

    Args:
        image_tokenizer: the tokenizer scored.
        scenes: the scenes `images` show (`Scene`s), what the reading is compared with.
        images: the rendered scenes.
        batch_size: images per encode/decode call.
        context: also read each object of the three-object scenes drawn alone (`context` in the result).

    Returns:
        `psnr`, `scene_correct`, each attribute's share read right, `by_objects` (`"right/total"` by object count)
        and, with `context`, `context`: `objects`, `misread_in_scene`, `misread_alone`.
    """
    reconstructions = reconstruct(image_tokenizer, images, batch_size)
    reads = [read_scene(r) for r in reconstructions]
    scores = [compare_scenes(read, s) for read, s in zip(reads, scenes)]
    counts = np.array([len(s.objects) for s in scenes])
    correct = np.array([s["scene_correct"] for s in scores])
    result = {
        "psnr": round(float(np.mean([psnr(a, b) for a, b in zip(images, reconstructions)])), 2),
        "scene_correct": round(float(correct.mean()), 4),
        **{a: round(float(np.mean([s[a] for s in scores])), 4) for a in ATTRIBUTES},
        "by_objects": {int(n): f"{int(correct[counts == n].sum())}/{int((counts == n).sum())}"
                       for n in np.unique(counts)},
    }
    if context:
        busy = [(s, o, read) for s, read in zip(scenes, reads) if len(s.objects) == 3 for o in s.objects]
        alone_images = [render(Scene(s.background, (o,))) for s, o, _ in busy]
        alone = reconstruct(image_tokenizer, alone_images, batch_size)
        together_ok = np.array([object_read(read, o) for _, o, read in busy])
        alone_ok = np.array([object_read(read_scene(r), o) for (_, o, _), r in zip(busy, alone)])
        result["context"] = {
            "objects": len(busy),
            "misread_in_scene": round(float(1 - together_ok.mean()), 4),
            "misread_alone": round(float(1 - alone_ok.mean()), 4),
        }
    return result


def evaluate_freeform(image_tokenizer: Cm3LeonImageTokenizer, count: int, batch_size: int) -> dict:
    """PSNR of `count` free-form drawings (`cm3leon_hf.synthetic.freeform`, seed `FREEFORM_TEST_SEED`) and of the
    user drawings: `psnr` (mean), `psnr_p10`, `at_least_28db` (the share of drawings at >= 28 dB), `user_drawings`."""
    from .synthetic.freeform import drawing_image, user_drawings

    resolution = image_tokenizer.resolution
    drawings = [drawing_image(i, resolution, seed=FREEFORM_TEST_SEED) for i in range(count)]
    values = np.array([psnr(a, b) for a, b in zip(drawings, reconstruct(image_tokenizer, drawings, batch_size))])
    users = user_drawings(resolution)
    user_images = list(users.values())
    user_values = [psnr(a, b) for a, b in zip(user_images, reconstruct(image_tokenizer, user_images, batch_size))]
    return {
        "drawings": count,
        "psnr": round(float(values.mean()), 2),
        "psnr_p10": round(float(np.percentile(values, 10)), 2),
        "at_least_28db": round(float((values >= 28).mean()), 4),
        "user_drawings": {name: round(v, 2) for name, v in zip(users, user_values)},
    }


__all__ = ["FREEFORM_TEST_SEED", "evaluate_freeform", "evaluate_scenes", "load_image_tokenizer", "object_read", "psnr",
           "reconstruct"]
