"""Train the synthetic world's small CLIP (retriever encoder, re-ranker, metric space).

Commands:

    # The documented run: ≤ 15 minutes on a 2-core CPU (12 minutes of training, then evaluation and saving).
    # Output: outputs/clip-synthetic/ (a sentence-transformers folder) with eval_results.json beside the weights.
    HF_HUB_OFFLINE=1 PYTHONPATH=src python training/train_clip.py --output-dir outputs/clip-synthetic --max-minutes 12

    # A smoke run (seconds)
    HF_HUB_OFFLINE=1 PYTHONPATH=src python training/train_clip.py --output-dir /tmp/clip-smoke --max-steps 20 \
        --hidden-size 32 --num-layers 1 --eval-size 100

    # Use it
    from cm3leon_hf.synthetic.clip import load_clip, encode_images, encode_texts
    clip = load_clip("outputs/clip-synthetic")

Data: pairs are drawn on the fly from the world's train distribution (no held-out (shape, colour) pair),
batch `step` from `numpy.random.default_rng([seed, 0, step])`, each with a short caption from a random
template; `--single-object-fraction` of the groups have one object, the rest 2–3. Loss: CLIP's symmetric
contrastive loss (`CLIPModel(..., return_loss=True)`), AdamW, linear warmup then cosine decay over the
budget (the larger of the step and the time fractions used, so a time budget is used to its end).
Batches are groups of `--group-size` minimally different scenes (one attribute changed, or two objects'
colours/shapes swapped): random negatives only teach colour and shape, and a gallery of 1,000 images is
full of scenes that differ in one attribute (pairs: 83% single-object top-1 after 5 minutes, against 68% with
random batches; groups of 4 learned slower). An auxiliary loss (`SceneHeads`, weight `--aux-weight`, not
saved) makes both towers' embeddings predict every cell's shape, colour and size and the background
through one shared linear layer: contrastive loss alone learned position and size slowly.

Size (patch 8, width 64, 2 layers per tower, 0.2M parameters) is what 12 CPU-minutes train best: wider
(96) or 16-px patches reached lower top-1 in the same time. One thread by default: on a 2-core machine
shared with other jobs, two threads spin-wait and run 4–15× slower.

Evaluation (`evaluate`): for 1-object and for 2–3-object scenes, `--eval-size` captions of the test
distribution (and of the held-out split) against a gallery of the same number of images; top-1 counts an
image whose scene equals the caption's scene as a hit. Figures go to `eval_results.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPModel

from dataclasses import replace

from cm3leon_hf.synthetic import caption, render_array, sample_scene
from cm3leon_hf.synthetic.scene import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    allowed_colors,
    has_heldout_pair,
    sort_objects,
    with_object,
)
from cm3leon_hf.synthetic.clip import (
    build_tokenizer,
    clip_config,
    encode_images,
    encode_texts,
    load_clip,
    pixel_values,
    retrieval_top1,
    save_clip,
)

TRAIN_STREAM, EVAL_STREAM = 0, 1


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where the sentence-transformers folder is written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="step budget (default: only --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--projection-dim", type=int, default=128)
    p.add_argument("--single-object-fraction", type=float, default=0.5)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the training-only scene probes' loss")
    p.add_argument("--group-size", type=int, default=2, help="scenes per group of minimal variants (1: random batches)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared 2-core machine, 2 threads spin-wait)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="save output-dir/checkpoint this often")
    p.add_argument("--eval-size", type=int, default=1000, help="captions and gallery images per evaluation")
    return p


def _variant(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with one minimal change: the background, or one object's colour, shape, size or cell, or (2+
    objects) two objects' colours or shapes swapped — the distinctions random negatives never force."""
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    kinds = ["background", "color", "shape", "size", "position"] + (["swap"] * 2 if len(scene.objects) > 1 else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "background":
        return replace(scene, background=[b for b in BACKGROUNDS if b != scene.background][0])
    if kind == "color":
        return with_object(scene, i, color=str(rng.choice([c for c in allowed_colors(o.shape, False) if c != o.color])))
    if kind == "shape":
        shapes = [s for s in SHAPES if s != o.shape and (s, o.color) not in HELDOUT_PAIRS]
        return with_object(scene, i, shape=str(rng.choice(shapes)))
    if kind == "size":
        return with_object(scene, i, size=str(rng.choice([z for z in SIZES if z != o.size])))
    if kind == "position":
        free = [p for p in POSITIONS if p not in {x.position for x in scene.objects}]
        return sort_objects(with_object(scene, i, position=str(rng.choice(free))))
    j = int(rng.integers(len(scene.objects) - 1))
    j += j >= i
    attr = "color" if rng.random() < 0.5 else "shape"
    a, b = getattr(o, attr), getattr(scene.objects[j], attr)
    swapped = with_object(with_object(scene, i, **{attr: b}), j, **{attr: a})
    return scene if has_heldout_pair(swapped) else swapped


def training_batch(seed: int, step: int, batch_size: int, single_fraction: float, resolution: int, group_size: int):
    """(scenes, images (uint8 arrays), captions) of one step, reproducible from (seed, step) alone. The batch is made
    of groups of `group_size` distinct scenes: a random scene and minimal variants of it (`_variant`)."""
    rng = np.random.default_rng([seed, TRAIN_STREAM, step])
    scenes, seen = [], set()
    while len(scenes) < batch_size:
        n = 1 if rng.random() < single_fraction else int(rng.integers(2, 4))
        group = [sample_scene(rng, num_objects=n)]
        for _ in range(8 * group_size):
            if len(group) == group_size:
                break
            candidate = _variant(group[int(rng.integers(len(group)))], rng)
            if candidate.key() not in {g.key() for g in group}:
                group.append(candidate)
        for scene in group[: batch_size - len(scenes)]:
            if scene.key() not in seen:  # identical scenes in one batch would be false negatives
                seen.add(scene.key())
                scenes.append(scene)
    return scenes, [render_array(s, resolution) for s in scenes], [caption(s, rng) for s in scenes]


class SceneHeads(torch.nn.Module):
    """Training-only linear probes from a (batch, projection_dim) embedding to the scene: for each grid cell
    its shape (or empty), colour and size, and the background. Shared by both towers, so that every
    attribute is linearly readable from the joint space; discarded after training."""

    def __init__(self, dim: int):
        super().__init__()
        self.cells = len(POSITIONS)
        self.widths = (len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1)
        self.linear = torch.nn.Linear(dim, self.cells * sum(self.widths) + len(BACKGROUNDS))

    @staticmethod
    def targets(scenes: list[Scene]) -> torch.Tensor:
        """(batch, 3 * cells + 1) class ids; 0 = empty cell."""
        out = torch.zeros(len(scenes), 3 * len(POSITIONS) + 1, dtype=torch.long)
        for b, scene in enumerate(scenes):
            for o in scene.objects:
                c = POSITIONS.index(o.position)
                out[b, c] = SHAPES.index(o.shape) + 1
                out[b, len(POSITIONS) + c] = list(COLORS).index(o.color) + 1
                out[b, 2 * len(POSITIONS) + c] = SIZES.index(o.size) + 1
            out[b, -1] = list(BACKGROUNDS).index(scene.background)
        return out

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, cells * sum(widths) + backgrounds). CLIP's embeddings are unit-norm: scaled by √dim their
        components have unit variance, else the probe's logits start too small to leave the class prior."""
        return self.linear(embeddings * embeddings.shape[-1] ** 0.5)

    def loss(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(embeddings)
        total, offset = 0.0, 0
        for k, width in enumerate(self.widths):
            part = logits[:, offset : offset + self.cells * width].reshape(-1, self.cells, width)  # (batch, cells, width)
            total = total + torch.nn.functional.cross_entropy(part.transpose(1, 2), targets[:, k * self.cells : (k + 1) * self.cells])
            offset += self.cells * width
        return total + torch.nn.functional.cross_entropy(logits[:, offset:], targets[:, -1])


def evaluation_set(seed: int, n: int, multi: bool, heldout: bool, resolution: int):
    """n (image, caption, scene key) of the test (or held-out) distribution, from their own stream."""
    rng = np.random.default_rng([seed, EVAL_STREAM, int(multi), int(heldout)])
    images, texts, keys = [], [], []
    for _ in range(n):
        scene = sample_scene(rng, heldout=heldout, num_objects=int(rng.integers(2, 4)) if multi else 1)
        images.append(render_array(scene, resolution))
        texts.append(caption(scene, rng))
        keys.append(scene.key())
    return images, texts, keys


def evaluate(encoder, seed: int, n: int, resolution: int) -> dict[str, float]:
    """Text → image top-1 for single- and multi-object scenes, test and held-out distributions."""
    out = {}
    for heldout in (False, True):
        for multi in (False, True):
            images, texts, keys = evaluation_set(seed, n, multi, heldout, resolution)
            name = f"{'heldout' if heldout else 'test'}_{'multi' if multi else 'single'}_object_top1"
            out[name] = retrieval_top1(encode_texts(encoder, texts), keys, encode_images(encoder, images), keys)
    return out


def lr_at(step: int, progress: float, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay with `progress` in [0, 1] of the budget."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.max_steps is None and args.max_minutes is None:
        raise ValueError("give a budget: --max-steps and/or --max-minutes")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    config = clip_config(
        tokenizer,
        resolution=args.resolution,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        projection_dim=args.projection_dim,
    )
    model = CLIPModel(config).train()
    heads = SceneHeads(config.projection_dim)
    params = list(model.named_parameters()) + list(heads.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    budget_s = args.max_minutes * 60 if args.max_minutes is not None else math.inf
    max_steps = args.max_steps if args.max_steps is not None else math.inf
    start = last_save = time.perf_counter()
    bar = tqdm(total=args.max_steps, desc="train_clip", unit="step")
    step = 0
    while step < max_steps and time.perf_counter() - start < budget_s:
        progress = max(step / max_steps, (time.perf_counter() - start) / budget_s)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, args.warmup_steps, args.learning_rate)
        scenes, images, texts = training_batch(
            args.seed, step, args.batch_size, args.single_object_fraction, args.resolution, args.group_size
        )
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = model(**batch, pixel_values=pixel_values(images), return_loss=True)
        targets = SceneHeads.targets(scenes)
        aux = heads.loss(out.image_embeds, targets) + heads.loss(out.text_embeds, targets)
        (out.loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            acc = (out.logits_per_text.argmax(1) == torch.arange(len(texts))).float().mean().item()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{aux.item():.3f}", acc=f"{acc:.2f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if time.perf_counter() - last_save > args.checkpoint_minutes * 60:
            save_clip(model.eval(), tokenizer, os.path.join(args.output_dir, "checkpoint"))
            model.train()
            last_save = time.perf_counter()
    bar.close()
    train_seconds = time.perf_counter() - start
    save_clip(model.eval(), tokenizer, args.output_dir)
    encoder = load_clip(args.output_dir)
    results = {
        **evaluate(encoder, args.seed, args.eval_size, args.resolution),
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "args": vars(args),
    }
    with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2))
    return results


if __name__ == "__main__":
    main()
