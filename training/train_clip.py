"""Train the synthetic world's small CLIP (retriever encoder, re-ranker, metric space): sentence-transformers' trainer.

Commands:

    # The documented run: 5,817 steps, 13 min 46 s on a 2-core CPU (one thread) with saving and evaluation. Output:
    # outputs/clip-synthetic/ (a sentence-transformers folder, eval_results.json beside the weights, checkpoint-N/).
    HF_HUB_OFFLINE=1 PYTHONPATH=src python training/train_clip.py --output_dir outputs/clip-synthetic --max_steps 5817

    # Interrupted? Run the same command again: it resumes from the last complete checkpoint (--no_resume: start over).
    # A smoke run (seconds); any flag may also come from a YAML file (TRL-style --config, flags override it)
    HF_HUB_OFFLINE=1 PYTHONPATH=src python training/train_clip.py --output_dir /tmp/clip-smoke --max_steps 20 \
        --hidden_size 32 --num_layers 1 --eval_size 100

    # Use it
    from cm3leon_hf.synthetic.clip import load_clip, encode_images, encode_texts
    clip = load_clip("outputs/clip-synthetic")

The loop, AdamW (β2 0.98, ε 1e-6, decay 0.05), transformers' `cosine` schedule (50 warmup steps, then to 0), clipping
at 1.0, logging, checkpoints and resume are `SentenceTransformerTrainer`'s; the model's own processor turns the image
and caption columns into tensors. Ours: the data, the loss, and small adjustments to the trainer: batches read in
order; weight decay on ≥2-D parameters only (Trainer's default, by name, would decay CLIP's `class_embedding` and
temperature); the scene heads' gradients clipped with the model's; checkpoints written atomically
(`cm3leon_hf.checkpointing`, as `training/pretrain.py` writes them) with the heads beside the model.

Data: pairs are drawn on the fly from the world's train distribution (no held-out (shape, colour) pair),
batch `step` from `numpy.random.default_rng([seed, 0, step])`, each with a short caption from a random
template; `--single_object_fraction` of the groups have one object, the rest 2–3 (0.8: single-object
retrieval needs every attribute of one object exact and was the laggard; with 0.5 the 12-minute run reached
84% single- / 96% multi-object top-1, with 0.8 90% / 93%; the shipped CLIP's 13.5-minute run: 93% / 94%; its
5,817 steps on this trainer: 91% / 95%).
Batches are groups of `--group_size` minimally different scenes (one attribute changed, or two objects'
colours/shapes swapped): random negatives only teach colour and shape, and a gallery of 1,000 images is
full of scenes that differ in one attribute (pairs: 83% single-object top-1 after 5 minutes, against 68% with
random batches; groups of 4 learned slower). Rows [s·B, (s+1)·B) of the dataset are batch s, made when read, so a
resume skips the steps done without making them. Loss: CLIP's symmetric contrastive loss with its learned temperature
(clamped to ≤ 100) plus an auxiliary loss (`SceneHeads`, weight `--aux_weight`, trained with the model, not saved
with it) that makes both towers' embeddings predict every cell's shape, colour and size and the background
through one shared linear layer: contrastive loss alone learned position and size slowly.

Budget: steps. The shipped CLIP was made by this script's earlier hand-written loop in 13.5 minutes of wall clock,
5,817 steps, its cosine spread over the time; `--max_steps 5817` is that run's length on any machine (transformers'
warmup is one step later and its cosine starts after the warmup, the old one's at step 0: after warmup the learning
rates differ by < 1% of the peak). No time budget: a run stopped by the clock ends mid-schedule at a high learning
rate; to stop early, stop it and rerun the command later.

Size (patch 8, width 64, 2 layers per tower, 0.25M parameters) is what ~12 CPU-minutes train best: wider
(96), deeper (4 vision layers) or 16-px patches reached lower top-1 in the same time, as did a heavier
auxiliary loss (3) and variants biased towards shape/size changes. One thread by default: on a 2-core machine
shared with other jobs, two threads spin-wait and run 4–15× slower.

Evaluation (`evaluate`): for 1-object and for 2–3-object scenes, `--eval_size` captions of the test
distribution (and of the held-out split) against a gallery of the same number of images; top-1 counts an
image whose scene equals the caption's scene as a hit. Figures go to `eval_results.json`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from torch.utils.data import BatchSampler, SequentialSampler
from transformers import CLIPModel, TrainerCallback, set_seed
from transformers.trainer_utils import SchedulerType

from cm3leon_hf.checkpointing import AtomicCheckpointsMixin, last_complete_checkpoint
from cm3leon_hf.synthetic import caption, render_array, sample_scene
from cm3leon_hf.synthetic.clip import (build_tokenizer, clip_config, encode_images, encode_texts, load_clip,
                                       retrieval_top1, save_clip)
from cm3leon_hf.synthetic.scene import (BACKGROUNDS, COLORS, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES, Scene,
                                        allowed_colors, has_heldout_pair, sort_objects, with_object)

TRAIN_STREAM, EVAL_STREAM = 0, 1
HEADS_FILE = "scene_heads.safetensors"
MODEL_FIELDS = ("resolution", "patch_size", "hidden_size", "num_layers", "vision_layers", "num_heads", "projection_dim")


@dataclass
class ClipArguments:
    """What this script adds to the trainer's arguments: the model's size, the data, the auxiliary loss, evaluation."""

    resolution: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = field(default=2, metadata={"help": "layers per tower"})
    vision_layers: int | None = field(default=None, metadata={"help": "vision tower depth (default: --num_layers)"})
    num_heads: int = 4
    projection_dim: int = 128
    single_object_fraction: float = field(default=0.8, metadata={"help": "share of one-object groups (others: 2-3)"})
    group_size: int = field(default=2, metadata={"help": "scenes per group of minimal variants (1: random batches)"})
    aux_weight: float = field(default=1.0, metadata={"help": "weight of the training-only scene probes' loss"})
    eval_size: int = field(default=1000, metadata={"help": "captions and gallery images per evaluation"})
    threads: int = field(default=1, metadata={"help": "torch threads (on a shared 2-core CPU, 2 threads spin-wait)"})
    no_resume: bool = field(default=False, metadata={"help": "do not resume from the last checkpoint"})

    def __post_init__(self):
        """Numbers are checked when parsed, before anything is built, with the flag's name."""
        for name in (*MODEL_FIELDS, "group_size", "eval_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.resolution % self.patch_size or self.hidden_size % self.num_heads:
            raise ValueError(f"--patch_size must divide --resolution and --num_heads --hidden_size, got "
                             f"{self.patch_size}, {self.resolution}, {self.num_heads}, {self.hidden_size}")
        if not 0 <= self.single_object_fraction <= 1:
            raise ValueError(f"--single_object_fraction must be in [0, 1], got {self.single_object_fraction}")
        if not (self.aux_weight >= 0 and math.isfinite(self.aux_weight)):
            raise ValueError(f"--aux_weight must be a finite number >= 0, got {self.aux_weight}")


@dataclass
class ClipTrainingArguments(SentenceTransformerTrainingArguments):
    """The trainer's arguments with the CLIP recipe as defaults (see the module docstring)."""

    max_steps: int = field(default=5817, metadata={"help": "training steps (the documented run: 5817)"})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "pairs per step (one training_batch)"})
    learning_rate: float = 2e-3
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay, on ≥2-D parameters only"})
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    lr_scheduler_type: SchedulerType | str = "cosine"
    warmup_steps: float = 50
    seed: int = 0
    logging_steps: float = 100
    save_steps: float = 1000
    save_total_limit: int | None = 2
    dataloader_pin_memory: bool = False

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required")
        for name, low in (("max_steps", 1), ("per_device_train_batch_size", 2)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be at least {low}, got {getattr(self, name)}")
        super().__post_init__()


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


def training_dataset(args: ClipArguments, seed: int, batch_size: int, steps: int) -> Dataset:
    """`steps × batch_size` rows (image, caption, label: the scene's `SceneHeads.targets`), made when read: rows
    [s × batch_size, (s + 1) × batch_size) are `training_batch(seed, s, ...)`."""

    @functools.lru_cache(maxsize=1)
    def batch(step: int):
        scenes, images, captions = training_batch(
            seed, step, batch_size, args.single_object_fraction, args.resolution, args.group_size)
        return [Image.fromarray(i) for i in images], captions, SceneHeads.targets(scenes).tolist()

    def rows(indices: dict) -> dict:
        out = {"image": [], "caption": [], "label": []}
        for row in indices["row"]:
            for column, values in zip(out.values(), batch(row // batch_size)):
                column.append(values[row % batch_size])
        return out

    dataset = Dataset.from_dict({"row": range(steps * batch_size)})
    dataset.set_transform(rows)
    return dataset


class ClipSceneLoss(torch.nn.Module):
    """A sentence-transformers loss over (image, caption) columns with the scenes' targets as `label`: CLIP's symmetric
    contrastive loss with its learned temperature (as `CLIPModel(..., return_loss=True).loss`) plus `aux_weight` × the
    `SceneHeads` loss on both towers' embeddings. The trainer optimises the loss's parameters, so the heads train with
    the model, of which they are no part."""

    def __init__(self, model, aux_weight: float = 1.0):
        super().__init__()
        self.model, self.aux_weight, self.heads = model, aux_weight, SceneHeads(model.get_embedding_dimension())

    def forward(self, sentence_features, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        images, texts = (self.model(features)["sentence_embedding"] for features in sentence_features)  # unit norm
        logits = self.model[0].model.logit_scale.exp() * texts @ images.T  # (texts, images)
        target = torch.arange(len(logits), device=logits.device)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        aux = self.heads.loss(images, labels) + self.heads.loss(texts, labels)
        return {"contrastive": contrastive, "aux": self.aux_weight * aux}


class ClampLogitScale(TrainerCallback):
    """CLIP's temperature: its log clamped to [0, log 100] after every optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            model[0].model.logit_scale.clamp_(0, math.log(100))


class ClipTrainer(AtomicCheckpointsMixin, SentenceTransformerTrainer):
    """`SentenceTransformerTrainer` with atomic checkpoints and the adjustments of the module docstring, and no automatic model card (its
    dataset statistics would make ~1,000 batches; the final folder gets `save_clip`'s)."""

    def get_batch_sampler(self, dataset, batch_size, drop_last, *args, **kwargs):
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, p in model.named_parameters() if p.ndim >= 2]

    def _clip_grad_norm(self, model):
        return self.accelerator.clip_grad_norm_(self.loss.parameters(), self.args.max_grad_norm)

    def add_model_card_callback(self, default_args_dict) -> None:
        pass

    def save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        """The heads beside the model, in the staged checkpoint (`AtomicCheckpointsMixin`)."""
        save_file(self.loss.heads.state_dict(), os.path.join(checkpoint_dir, HEADS_FILE))

    def _load_from_checkpoint(self, checkpoint_path: str, *args) -> None:
        super()._load_from_checkpoint(checkpoint_path)
        self.loss.heads.load_state_dict(load_file(os.path.join(checkpoint_path, HEADS_FILE)))


def build_trainer(script_args: ClipArguments, training_args: ClipTrainingArguments, callbacks=()) -> ClipTrainer:
    """A fresh CLIP (initialised with `training_args.seed`) as a sentence-transformers model, its loss, its data.
    One process only: the scene heads live in the loss, outside the model that DDP keeps in sync."""
    if training_args.world_size > 1:
        raise ValueError(f"train_clip.py trains in one process, got {training_args.world_size}: the scene heads live in "
                         "the loss, which DDP does not synchronise (the documented run takes ~14 CPU minutes)")
    torch.set_num_threads(script_args.threads)
    set_seed(training_args.seed)
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as folder:  # a sentence-transformers CLIP is built from a folder
        config = clip_config(tokenizer, **{k: getattr(script_args, k) for k in MODEL_FIELDS})
        save_clip(CLIPModel(config), tokenizer, folder)
        model = load_clip(folder)
    model[0].processing_kwargs = {"image": {"do_resize": False, "do_center_crop": False}}  # identities: drawn at size
    data = training_dataset(script_args, training_args.seed, training_args.per_device_train_batch_size,
                            training_args.max_steps)
    return ClipTrainer(model=model, args=training_args, train_dataset=data, callbacks=[ClampLogitScale(), *callbacks],
                       loss=ClipSceneLoss(model, script_args.aux_weight))


def main(script_args: ClipArguments, training_args: ClipTrainingArguments, callbacks=()) -> dict:
    """Train (or resume; a finished run trains no further), save the model as `save_clip` does, evaluate it, and write
    `eval_results.json` beside it (`train_seconds`: this process's training time)."""
    start = time.perf_counter()
    trainer = build_trainer(script_args, training_args, callbacks)
    resume = None if script_args.no_resume else last_complete_checkpoint(training_args.output_dir)
    if resume:
        print(f"Resuming from {resume}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    save_clip(trainer.model[0].model.eval(), trainer.model[0].tokenizer, training_args.output_dir)
    recorded = ("output_dir", "seed", "max_steps", "per_device_train_batch_size", "learning_rate", "weight_decay",
                "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "warmup_steps")
    results = {
        **evaluate(load_clip(training_args.output_dir), training_args.seed, script_args.eval_size,
                   script_args.resolution),
        "steps": result.global_step,
        "train_seconds": round(result.metrics["train_runtime"], 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "args": {**asdict(script_args), **{k: v for k, v in training_args.to_dict().items() if k in recorded}},
    }
    with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2))
    return results


def make_parser():
    from trl import TrlParser

    epilog = "--config RECIPE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser((ClipArguments, ClipTrainingArguments), epilog=epilog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
