"""Train CM3Leon's VQ image tokenizer (a diffusers `VQModel`) on any `datasets` image column.

CL §2.1 uses Make-A-Scene's VQ-VAE (256² → 32×32 codes from 8192), trained with pixel, codebook, commitment,
adversarial and perceptual losses. Here: L1 + L2 reconstruction, codebook and commitment losses (VQ-VAE, beta 0.25),
an optional PatchGAN discriminator (hinge loss), and no perceptual loss (it needs downloaded weights). Codebook
usage is kept up by a data-dependent initialisation (the codebook starts as encoder outputs of the first batch) and
dead-code restarts (every `--restart-every` steps, codes no image used since the last restart are moved onto encoder
outputs of the current batch, drawn in proportion to their squared quantization error as k-means++ seeds clusters).

Commands:

```bash
# The tiny VQ's first stage (64×64, stride 8: 64 tokens per image), 20,000 steps on one CPU thread (~50 min):
flock /tmp/cm3leon-heavy.lock python training/train_image_tokenizer.py \
    --config training/recipes/image_tokenizer_tiny.yaml --output-dir runs/image_tokenizer_tiny

# The shipped tiny VQ, every run it came from, in one command (run it again after a stop: it continues):
python training/train_image_tokenizer.py --chain training/recipes/image_tokenizer_tiny_chain.yaml --output-dir runs/vq

# Resume after an interruption (same command + --resume):
flock /tmp/cm3leon-heavy.lock python training/train_image_tokenizer.py \
    --config training/recipes/image_tokenizer_tiny.yaml --output-dir runs/image_tokenizer_tiny --resume

# Fine-tune a trained VQ with another loss or more codes (fresh optimizer and schedule):
python training/train_image_tokenizer.py --config training/recipes/image_tokenizer_tiny.yaml \
    --init-from runs/image_tokenizer_tiny/image_tokenizer --disc-weight 0.1 --disc-start 0 --output-dir runs/vq_gan

# Give a trained VQ twice the width, starting from exactly what it computes (widths and norm groups x2), and fine-tune:
python training/train_image_tokenizer.py --config training/recipes/image_tokenizer_tiny.yaml \
    --init-from runs/image_tokenizer_tiny/image_tokenizer --block-out-channels 16 32 64 128 --norm-num-groups 8 \
    --learning-rate 3e-4 --min-learning-rate 1e-6 --output-dir runs/vq_wide

# Your own data: any image column (`Image` or a list of `Image`s), local (`save_to_disk`) or on the Hub, streamed:
python training/train_image_tokenizer.py --dataset user/my-images --image-column image --streaming \
    --resolution 256 --block-out-channels 128 128 256 512 --num-codes 8192 --output-dir runs/my_vq

# Several processes or GPUs (DDP through accelerate; --batch-size is per process):
accelerate launch --num_processes 8 training/train_image_tokenizer.py --dataset user/my-images ... --batch-size 32
```

What is the libraries' and what is ours. accelerate places the model and optimizers on the device and wraps them for
DDP (`accelerate launch`, `torchrun`; gloo on CPU); transformers gives the schedule (linear warmup from 0, then
cosine to `--min-learning-rate`: `get_cosine_with_min_lr_schedule_with_warmup`), the checkpoint discovery and rotation
(`get_last_checkpoint`, `rotate_checkpoints`), and, with TRL's parser, the options (`HfArgumentParser` dataclasses;
`--config` YAML sets defaults, options win). Ours: the losses, the codebook's data-dependent initialisation and
restarts, which under DDP are drawn on the main process and broadcast (code usage is summed over processes, so every
process restarts the same codes), the data order that `--resume` replays, and the checkpoint files. With the same
schedule, this loop gives bit-identical weights to the hand-written loop it replaced (checked over 150 steps of the
recipe and 40 steps with --bf16 and --freeform-fraction); the GAN's real and fake images now go through the
discriminator in one batch (DDP allows one forward per backward), and the warmup starts at 0, as transformers' does,
instead of at --learning-rate / --warmup-steps.

The run directory holds `checkpoint-<step>/` (written to a temporary directory, then renamed, so a crash never
leaves half a checkpoint; the last `--keep-checkpoints` are kept), `log.jsonl` (one JSON line per log and eval), and
`image_tokenizer/`, the final `Cm3LeonImageTokenizer` (diffusers format) that `training/build_processor.py` bundles.
A checkpoint holds the VQ, the discriminator, the optimizer moments (all safetensors) and `trainer_state.json`
(step, position in the data, code usage since the last restart, elapsed time): `--resume` continues from the
latest one with the same data order and learning rates. Not `Accelerator.save_state`: it writes the optimizers and
RNG states as pickles, which `load_state` unpickles (arbitrary code on load); nothing here is random but the
per-step seeded draws, so there is no RNG state to keep.
"""


import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast
from diffusers import VQModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer


# ---------------------------------------------------------------------------------------------------- arguments


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


LOWEST = {"shuffle_buffer": 1, "resolution": 1, "layers_per_block": 1, "latent_channels": 1, "vq_embed_dim": 1,
          "num_codes": 1, "norm_num_groups": 1, "block_out_channels": 1, "batch_size": 1, "log_every": 1, "checkpoint_every": 1, "eval_images": 1,
          "keep_checkpoints": 1, "threads": 1, "max_steps": 0, "warmup_steps": 0, "eval_every": 0, "restart_every": 0,
          "disc_start": 0, "learning_rate": 0, "min_learning_rate": 0, "stop_at_step": 0}
FRACTIONS = ("freeform_fraction", "freeform_frames")


class _Checked:
    """Options are checked when parsed, before any data or model loads, with the option's name."""

    def __post_init__(self):
        for name, value in vars(self).items():
            flag = f"--{name.replace('_', '-')}"
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                if name in LOWEST and not (v >= LOWEST[name] and math.isfinite(v)):  # NaN fails too
                    raise ValueError(f"{flag} must be at least {LOWEST[name]}, got {value}")
                if name in FRACTIONS and not 0.0 <= v <= 1.0:
                    raise ValueError(f"{flag} must be in [0, 1], got {value}")


@dataclass
class DataArguments(_Checked):
    """Where the images come from."""

    dataset: str | None = field(default=None, **_help("Hub id or `save_to_disk` directory; default: the synthetic world."))
    dataset_config: str | None = field(default=None, **_help("Configuration name of a Hub dataset."))
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str = field(default="images", **_help("An `Image` column or a list-of-`Image` column."))
    streaming: bool = field(default=False, **_help("Stream the dataset instead of memory-mapping it."))
    shuffle_buffer: int = field(default=10_000, **_help("Shuffle buffer when streaming."))
    synthetic_rows: int = field(default=20_000, **_help("Synthetic world: train rows per task."))
    synthetic_cache: Path | None = field(default=None, **_help("Synthetic world: `datasets` cache directory."))
    freeform_fraction: float = field(default=0.0, **_help(
        "Fraction of each batch replaced by free-form drawings in the world's palette (any shape, size and place: "
        "cm3leon_hf.synthetic.freeform), so the VQ serves what users draw, not only the world's renders. Drawing j of "
        "step s is `drawing_image(s * batch + j, seed=--seed)`: the same images after --resume. Evals then also report "
        "`freeform_psnr` on --eval-images drawings of another seed."))
    freeform_frames: float = field(default=0.0, **_help(
        "Share of free-form drawings whose first shape nearly fills the frame (thin margins): rare otherwise."))


@dataclass
class ModelArguments(_Checked):
    """The diffusers `VQModel`, or where to start it from."""

    resolution: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 64
    vq_embed_dim: int = 16
    num_codes: int = 512
    norm_num_groups: int = 16
    mid_block_attention: bool = True
    norm_type: Literal["group", "spatial"] = field(default="group", **_help(
        "Decoder normalisation: GroupNorm, or MoVQ's spatially conditioned norm (modulated by the codes)."))
    normalize_codes: bool = field(default=False, **_help(
        "Unit-norm codebook, losses on unit-norm latents (cosine lookup, as in ViT-VQGAN); diffusers' Euclidean "
        "lookup of the saved model picks the same codes, since every code has norm 1."))
    init_from: Path | None = field(default=None, **_help(
        "Start from a trained VQ (a VQModel or Cm3LeonImageTokenizer directory) of the same encoder/decoder shape, for "
        "a fine-tune with other losses (e.g. --disc-weight) or a fresh schedule; or of a narrower one (all "
        "--block-out-channels and --norm-num-groups divided by one factor), widened without changing what it "
        "computes, to give a trained VQ more capacity. Its codebook is kept when --num-codes matches, else "
        "re-initialised from the data. Fresh optimizer and step counter."))
    freeze_encoder: bool = field(default=False, **_help(
        "Train only the decoder (with post_quant_conv); the encoder, quant_conv and codebook stay as --init-from has "
        "them, so every image keeps its codes and a language model trained on them stays valid. No code restarts."))


@dataclass
class VQTrainingArguments(_Checked):
    """Losses, optimisation and the run. Per-process batch: under `accelerate launch` each of N processes takes its
    share of a global batch of N x --batch-size images."""

    output_dir: Path = field(metadata={"help": "The run directory (checkpoints, log.jsonl, image_tokenizer/)."})
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_learning_rate: float = field(default=1e-4, **_help("End of the cosine decay."))
    warmup_steps: int = 100
    max_steps: int = field(default=10_000, **_help("Also the length of the cosine schedule."))
    max_minutes: float | None = field(default=None, **_help("Stop (with a checkpoint and the final eval) after this."))
    stop_at_step: int | None = field(default=None, **_help(
        "Stop at this step (with a checkpoint and the final eval) while the schedule still runs to --max-steps: how "
        "--chain replays a run that was stopped there and resumed, or whose checkpoint of that step was kept."))
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    commitment_weight: float = field(default=0.25, **_help("VQ-VAE's beta."))
    edge_weight: float = field(default=0.0, **_help(
        "Weight the L1/L2 losses per pixel by 1 + this on edges of the target (`edge_map`), so that small shapes, "
        "whose corners are a handful of pixels, weigh more against flat background (0: plain means, the default). On "
        "the synthetic world 10 did not help: same PSNR, lower evaluator accuracy (bench/RESULTS.md)."))
    restart_every: int = field(default=50, **_help("Dead-code restart period in steps (0: never)."))
    disc_weight: float = field(default=0.0, **_help("Weight of the PatchGAN loss (0: no GAN)."))
    disc_start: int = field(default=1000, **_help("Step at which the discriminator starts."))
    disc_learning_rate: float | None = field(default=None, **_help(
        "Constant learning rate of the discriminator (default: --learning-rate). A fresh discriminator next to a "
        "converged VQ fine-tuned at a small --learning-rate needs a larger one of its own to become informative."))
    bf16: bool = field(default=False, **_help("bfloat16 autocast for the encoder and decoder (CPU: ~1.3x)."))
    seed: int = 0
    threads: int = field(default=1, **_help("torch CPU threads."))
    cpu: bool = field(default=False, **_help("Train on the CPU even where an accelerator is available."))
    resume: bool = field(default=False, **_help("Continue from the latest checkpoint in --output-dir."))
    checkpoint_every: int = field(default=500, **_help("Steps between checkpoints."))
    keep_checkpoints: int = 2
    eval_every: int = field(default=500, **_help("Steps between evals (0: only at the end)."))
    eval_images: int = field(default=1000, **_help("Images of --eval-split used by each eval."))
    log_every: int = 25


def make_parser():
    from trl import TrlParser

    epilog = ("--config RECIPE.yaml  a YAML file of any of these options (training/recipes/image_tokenizer_tiny.yaml); "
              "options on the command line override it. Options take dashes or underscores.  --chain CHAIN.yaml --output-dir DIR  "
              "run a chain of runs (training/recipes/image_tokenizer_tiny_chain.yaml: the shipped VQ in one command).")
    return TrlParser((DataArguments, ModelArguments, VQTrainingArguments), description=__doc__.split("\n\n")[0],
                     epilog=epilog)


def parse_args(argv=None) -> argparse.Namespace:
    """The three argument groups as one namespace: `--config` YAML supplies defaults, explicit options win (TRL's
    parser, as `training/pretrain.py` reads its recipes). Bad values exit with a message naming the option."""
    parser = make_parser()
    try:
        groups = parser.parse_args_and_config(argv)
    except ValueError as error:  # __post_init__ checks, and unknown recipe keys
        parser.error(str(error))
    args = argparse.Namespace(**{k: v for group in groups for k, v in vars(group).items()})
    if args.freeze_encoder and args.init_from is None and not args.resume:
        parser.error("--freeze-encoder needs --init-from: it keeps a trained VQ's encoder and codebook")
    if args.freeze_encoder:
        args.restart_every = 0
    return args


# ---------------------------------------------------------------------------------------------------- data


def load_splits(args):
    """The train and eval datasets (map-style, or iterable with --streaming)."""
    import datasets

    if args.dataset is None:
        from cm3leon_hf.synthetic import build_tasks

        world = build_tasks(
            num_train=args.synthetic_rows,
            num_validation=max(1, args.eval_images // 7 + 1),
            num_test=0,
            num_heldout=0,
            cache_dir=None if args.synthetic_cache is None else str(args.synthetic_cache),
        )
        train, evaluation = world[args.train_split], world[args.eval_split]
        if args.streaming:
            train, evaluation = train.to_iterable_dataset(), evaluation.to_iterable_dataset()
    elif Path(args.dataset).is_dir():
        loaded = datasets.load_from_disk(args.dataset)
        train, evaluation = loaded[args.train_split], loaded[args.eval_split]
        if args.streaming:
            train, evaluation = train.to_iterable_dataset(), evaluation.to_iterable_dataset()
    else:
        load = lambda split: datasets.load_dataset(  # noqa: E731
            args.dataset, args.dataset_config, split=split, streaming=args.streaming
        )
        train, evaluation = load(args.train_split), load(args.eval_split)
    for name, ds in (("train", train), ("eval", evaluation)):
        if ds.column_names is not None and args.image_column not in ds.column_names:
            raise ValueError(f"The {name} split has no column {args.image_column!r} (columns: {ds.column_names}).")
    keep = [args.image_column]
    return train.select_columns(keep), evaluation.select_columns(keep)


def row_images(row: dict, column: str) -> list:
    images = row[column]
    return list(images) if isinstance(images, (list, tuple)) else [images]


def image_stream(dataset, args, position: dict):
    """Endless `(image, position after it)` pairs over the training rows, reshuffled every epoch (epoch `e` with seed
    `args.seed + e`). A position is `{"rows": rows fully used, "images": images of the next row used, "epoch_rows":
    rows per epoch, once known}`; starting from a saved position replays the same order (`--resume`)."""
    rows, used, epoch_rows = position["rows"], position["images"], position.get("epoch_rows")
    is_map_style = hasattr(dataset, "__len__")
    if is_map_style:
        epoch_rows = len(dataset)
    while True:
        epoch, offset = divmod(rows, epoch_rows) if epoch_rows else (0, rows)
        if is_map_style:
            shuffled = dataset.shuffle(seed=args.seed + epoch)
        else:
            shuffled = dataset.shuffle(seed=args.seed + epoch, buffer_size=args.shuffle_buffer)
        for row in shuffled.skip(offset):
            images = row_images(row, args.image_column)
            for j in range(used, len(images)):
                last = j == len(images) - 1
                yield images[j], {"rows": rows + last, "images": 0 if last else j + 1, "epoch_rows": epoch_rows}
            rows, used = rows + 1, 0
        if rows == 0:
            raise ValueError("The training split has no rows.")
        epoch_rows = epoch_rows or rows  # an iterable dataset's length is known after its first pass


def train_batches(stream, batch_size: int):
    """Batches of `batch_size` images from `image_stream`, each with the stream's position after it."""
    batch = []
    for image, position in stream:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch, position
            batch = []


FREEFORM_EVAL_SEED = 1_000_003  # drawings for evals: a stream the training batches (seed --seed) never draw from


def with_freeform(images: list, step: int, args) -> list:
    """`images` with its first `round(--freeform-fraction * len)` entries replaced by step `step`'s drawings."""
    count = round(args.freeform_fraction * len(images))
    if count == 0:
        return images
    from cm3leon_hf.synthetic.freeform import drawing_image

    base = step * len(images)
    drawn = [drawing_image(base + j, args.resolution, seed=args.seed, frame_fraction=args.freeform_frames)
             for j in range(count)]
    return drawn + list(images[count:])


def eval_images(dataset, args) -> list:
    images = []
    for row in dataset:
        images.extend(row_images(row, args.image_column))
        if len(images) >= args.eval_images:
            break
    return images[: args.eval_images]


# ---------------------------------------------------------------------------------------------------- model


def build_vq_model(args) -> VQModel:
    n = len(args.block_out_channels)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        vq_embed_dim=args.vq_embed_dim,
        num_vq_embeddings=args.num_codes,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
        mid_block_add_attention=args.mid_block_attention,
        norm_type=args.norm_type,
        lookup_from_codebook=True,
    )


class PatchDiscriminator(nn.Sequential):
    """A small PatchGAN (pix2pix/taming): stride-2 convolutions to a grid of real/fake logits, `(batch, 1, h, w)`."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        layers, width = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 3, 1, 1))
        super().__init__(*layers)


def vq_forward(vq: VQModel, pixels: torch.Tensor, args) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One autoencoding pass with our losses. Returns (reconstruction, losses, latents `(N, D)`, code indices `(N,)`,
    squared quantization errors `(N,)`), with N = batch * grid * grid in raster order. With `--bf16` the encoder and
    decoder run under bfloat16 autocast; the code lookup and the losses stay in float32."""
    autocast = torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        latents = vq.encode(pixels).latents.float()  # (batch, D, g, g)
    batch, dim, grid, _ = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (batch * g * g, D), raster order
    _, _, (_, _, indices) = vq.quantize(latents)  # nearest code of each position, (batch * g * g,)
    if args.normalize_codes:  # the codebook is kept unit-norm (`normalize_codebook`): nearest = most cosine-similar
        flat = F.normalize(flat, dim=-1)
    codes = vq.quantize.embedding(indices)  # (batch * g * g, D)
    quantized = flat + (codes - flat).detach()  # straight-through estimator
    quantized = quantized.view(batch, grid, grid, dim).permute(0, 3, 1, 2)  # (batch, D, g, g)
    with autocast:
        spatial = quantized if vq.config.norm_type == "spatial" else None
        reconstruction = vq.decoder(vq.post_quant_conv(quantized), spatial).float()
    difference = reconstruction - pixels
    weights = 1.0
    if args.edge_weight > 0:
        weights = 1 + args.edge_weight * edge_map(pixels)  # (batch, 1, res, res)
        weights = weights / weights.mean()  # a weighted mean: loss scales stay those of the plain one
    losses = {
        "l1": (weights * difference.abs()).mean(),
        "l2": (weights * difference**2).mean(),
        "codebook": F.mse_loss(codes, flat.detach()),
        "commitment": F.mse_loss(flat, codes.detach()),
    }
    errors = ((flat - codes) ** 2).sum(-1).detach()  # (batch * g * g,) squared quantization errors
    return reconstruction, losses, flat.detach(), indices, errors


def edge_map(pixels: torch.Tensor) -> torch.Tensor:
    """Where `pixels` (batch, C, H, W) in [-1, 1] have edges, in [0, 1], shape (batch, 1, H, W): each pixel's largest
    absolute difference to its right or lower neighbour (over channels), saturating at 0.5 (a quarter of the range),
    then a 3×3 max-pool, so both pixels across an edge count (and the one before it: three pixels per edge)."""
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1, keepdim=True)
    edges = torch.maximum(F.pad(dx, (0, 1, 0, 0)), F.pad(dy, (0, 0, 0, 1)))
    return F.max_pool2d((edges / 0.5).clamp(max=1.0), kernel_size=3, stride=1, padding=1)


def normalize_codebook(vq: VQModel) -> None:
    with torch.no_grad():
        weight = vq.quantize.embedding.weight
        weight.copy_(F.normalize(weight, dim=-1))


def pick_latents(latents: torch.Tensor, errors: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` latents of the batch drawn with probability proportional to their squared quantization error (as
    k-means++ seeds clusters): codes go where the codebook serves the data worst — in images that are mostly flat
    background, the rare object patches — instead of where most latents are."""
    weights = errors.clamp_min(1e-12).cpu().double()
    picks = torch.multinomial(weights, count, replacement=count > len(weights), generator=generator)
    return latents[picks.to(latents.device)]


def init_from_pretrained(vq: VQModel, source_dir: Path) -> bool:
    """Copy a trained VQ's weights into `vq` (`--init-from`). Every tensor but the codebook must match in shape, or
    `vq` must be the source widened by a whole factor (`widen_state_dict`); a `ValueError` lists the tensors that do
    not fit. The codebook is copied only if it has the same size. Returns whether it was."""
    source_model = VQModel.from_pretrained(source_dir)
    source = source_model.state_dict()
    own = vq.state_dict()
    codebook = "quantize.embedding.weight"
    mismatched = sorted(
        k for k in set(own) | set(source) if k != codebook and (k not in source or k not in own or source[k].shape != own[k].shape)
    )
    if mismatched:
        factor = widening_factor(source_model.config, vq.config)
        if factor is None:
            raise ValueError(f"--init-from {source_dir}: its VQ does not have this architecture ({len(mismatched)} tensors "
                             f"differ, e.g. {mismatched[:3]}); pass the same --block-out-channels, --layers-per-block, ... "
                             f"or, to widen it, all of its --block-out-channels and --norm-num-groups times one factor")
        source = widen_state_dict(source, own, factor)
    keep_codebook = source[codebook].shape == own[codebook].shape
    if not keep_codebook:
        source.pop(codebook)
    vq.load_state_dict(source, strict=keep_codebook)
    return keep_codebook


def widening_factor(narrow, wide) -> int | None:
    """The whole factor k by which config `wide` widens config `narrow` (every block width and the number of norm
    groups times k, everything else equal, group norm), or None if it does not."""
    if len(narrow.block_out_channels) != len(wide.block_out_channels) or wide.block_out_channels[0] % narrow.block_out_channels[0]:
        return None
    k = wide.block_out_channels[0] // narrow.block_out_channels[0]
    same = ("layers_per_block", "latent_channels", "vq_embed_dim", "norm_type", "mid_block_add_attention", "in_channels", "out_channels")
    if (k < 2 or any(w != k * n for n, w in zip(narrow.block_out_channels, wide.block_out_channels))
            or wide.norm_num_groups != k * narrow.norm_num_groups or narrow.norm_type != "group"
            or any(getattr(narrow, key) != getattr(wide, key) for key in same)):
        return None
    return k


def widen_state_dict(narrow: dict, wide: dict, factor: int) -> dict:
    """Weights for the `factor`-times wider VQ `wide` (its freshly initialised state dict) that compute exactly what
    `narrow` computes: a function-preserving widening in the spirit of Net2WiderNet (Chen et al., 2016).

    Along every widened axis the trained channels come first and keep their weights; new channels get `wide`'s fresh
    initialisation on their way in and zeros on their way out into trained channels, so at the start they change
    nothing, yet they carry activations and receive gradients. Group norm keeps its statistics because the number of
    groups grows with the width (trained channels fill exactly the first groups). The single-head mid-block attention
    scales scores by 1/sqrt(width): its trained query rows are multiplied by sqrt(factor) and its new query rows are
    zero, so the scores are unchanged too. Axes of the same size (latents, RGB) are copied as they are, and so is the
    codebook (whatever its size).
    Fine-tuning the result gives a trained VQ more capacity without starting over (`--init-from`)."""
    out = {}
    for name, target in wide.items():
        source = narrow[name]
        if name == "quantize.embedding.weight":  # never widened; `init_from_pretrained` decides whether it is kept
            out[name] = source
            continue
        if source.dim() != target.dim() or any(t not in (s, factor * s) for s, t in zip(source.shape, target.shape)):
            raise ValueError(f"cannot widen {name}: {tuple(source.shape)} -> {tuple(target.shape)} is not x1 or x{factor}")
        tensor = target.clone()
        old = tuple(slice(0, s) for s in source.shape)
        tensor[old] = source
        if target.dim() >= 2 and target.shape[1] != source.shape[1]:  # new inputs must not reach trained outputs
            tensor[: source.shape[0], source.shape[1] :] = 0
        if name.endswith(("attentions.0.to_q.weight", "attentions.0.to_q.bias")) and target.shape[0] != source.shape[0]:
            tensor[: source.shape[0]] *= math.sqrt(factor)
            tensor[source.shape[0] :] = 0
        out[name] = tensor
    return out


def reset_moments(optimizer: torch.optim.Optimizer, weight: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero Adam's moments of `rows` of `weight` (codes just moved by a restart start afresh)."""
    for moment in optimizer.state.get(weight, {}).values():
        if moment.dim() == 2:
            moment[rows] = 0


# ---------------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(image_tokenizer: Cm3LeonImageTokenizer, images: list, batch_size: int = 100) -> dict:
    """PSNR (dB, on uint8 pixels, mean over images) of encode → decode, and the fraction of the codebook used."""
    was_training = image_tokenizer.vq_model.training
    image_tokenizer.vq_model.eval()
    psnrs, used = [], torch.zeros(image_tokenizer.codebook_size, dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        pixels = image_tokenizer.preprocess(images[start : start + batch_size])
        codes = image_tokenizer.encode_pixels(pixels)
        used[codes.flatten().cpu()] = True
        decoded = image_tokenizer.decode_to_pixels(codes).clamp(-1, 1)
        target = ((pixels + 1) * 127.5).round()
        output = ((decoded + 1) * 127.5).round()
        mse = ((output - target) ** 2).float().mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(255.0**2 / mse).cpu())
    image_tokenizer.vq_model.train(was_training)
    return {"psnr": torch.cat(psnrs).mean().item(), "codebook_usage": used.float().mean().item()}


# ---------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, step: int, vq, discriminator, optimizers: dict, state: dict, keep: int) -> Path:
    """Write `checkpoint-<step>` atomically (temporary directory, then rename) and prune old checkpoints."""
    final = directory / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=directory))
    vq.save_pretrained(tmp / "vq", safe_serialization=True)
    if discriminator is not None:
        save_file(discriminator.state_dict(), tmp / "discriminator.safetensors")
    for name, optimizer in optimizers.items():
        save_file(optimizer_tensors(optimizer), tmp / f"optimizer_{name}.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate_checkpoints(str(directory), save_total_limit=keep)
    return final


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat tensors (`"<param index>.<key>"`), for safetensors."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{index}.{key}"] = torch.as_tensor(value).contiguous()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------- main


class VQTrainingModel(nn.Module):
    """The VQ with the training losses as its `forward` (`vq_forward`): what accelerate prepares, so that under DDP
    every backward follows exactly one forward of the wrapped module."""

    def __init__(self, vq: VQModel, args):
        super().__init__()
        self.vq, self.args = vq, args

    def forward(self, pixels: torch.Tensor):
        return vq_forward(self.vq, pixels, self.args)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.cpu)
    main_process, processes, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    torch.manual_seed(args.seed)  # the same initial weights in every process (DDP also broadcasts them)
    generator = torch.Generator().manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device

    resume_from = get_last_checkpoint(str(args.output_dir)) if args.resume else None
    resume_from = None if resume_from is None else Path(resume_from)
    if args.resume and resume_from is None and main_process:
        print(f"--resume: no checkpoint in {args.output_dir}, starting from scratch", file=sys.stderr)
    vq = (VQModel.from_pretrained(resume_from / "vq") if resume_from else build_vq_model(args)).to(device).train()
    codebook_loaded = resume_from is not None
    if args.init_from is not None and resume_from is None:
        codebook_loaded = init_from_pretrained(vq, args.init_from)
    image_tokenizer = Cm3LeonImageTokenizer(vq)
    vq.train()  # the image tokenizer puts its model in eval mode
    if args.freeze_encoder:
        for module in (vq.encoder, vq.quant_conv, vq.quantize):
            module.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=args.learning_rate, betas=(0.9, 0.99))
    optimizers = {"vq": optimizer}
    discriminator = None
    if args.disc_weight > 0:
        discriminator = PatchDiscriminator().to(device).train()
        disc_lr = args.learning_rate if args.disc_learning_rate is None else args.disc_learning_rate
        optimizers["discriminator"] = torch.optim.Adam(discriminator.parameters(), lr=disc_lr, betas=(0.5, 0.9))
    state = {"step": 0, "position": {"rows": 0, "images": 0}, "elapsed_s": 0.0, "usage": [0] * args.num_codes}
    if resume_from:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        for name, opt in optimizers.items():
            load_optimizer_tensors(opt, load_file(resume_from / f"optimizer_{name}.safetensors"))
        if discriminator is not None:
            discriminator.load_state_dict(load_file(resume_from / "discriminator.safetensors"))
        if main_process:
            print(f"resumed from {resume_from} (step {state['step']})", file=sys.stderr)
    usage = torch.tensor(state["usage"], dtype=torch.long, device=device)
    # The schedule at the step reached: its state is the step alone, so a resume with another --max-steps continues on
    # the new cosine at this step (as the recipe's runs were resumed).
    for group in optimizer.param_groups:
        group["initial_lr"] = args.learning_rate
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps,
                                                            min_lr=args.min_learning_rate, last_epoch=state["step"] - 1)
    # Prepared after loading: accelerate wraps the modules for DDP and the optimizers for its processes. The schedule
    # is stepped here, once per global step (accelerate's scheduler wrapper would step it once per process).
    model, optimizer = accelerator.prepare(VQTrainingModel(vq, args), optimizer)
    optimizers["vq"] = optimizer
    if discriminator is not None:
        discriminator, optimizers["discriminator"] = accelerator.prepare(discriminator, optimizers["discriminator"])

    train, evaluation = load_splits(args)
    held_out = eval_images(evaluation, args) if main_process else []
    freeform_held_out = []
    if args.freeform_fraction > 0 and main_process:
        from cm3leon_hf.synthetic.freeform import drawing_image

        freeform_held_out = [drawing_image(i, args.resolution, seed=FREEFORM_EVAL_SEED) for i in range(args.eval_images)]

    def run_eval() -> dict | None:
        """On the main process (the others wait); None elsewhere."""
        metrics = None
        if main_process:
            metrics = evaluate(image_tokenizer, held_out)
            if freeform_held_out:
                metrics["freeform_psnr"] = evaluate(image_tokenizer, freeform_held_out)["psnr"]
            vq.train()
        accelerator.wait_for_everyone()
        return metrics

    def log(record: dict) -> None:
        if main_process:
            with (args.output_dir / "log.jsonl").open("a") as log_file:
                log_file.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        if main_process:
            state["usage"] = usage.tolist()
            save_checkpoint(args.output_dir, state["step"], vq, accelerator.unwrap_model(discriminator)
                            if discriminator is not None else None, optimizers, state, args.keep_checkpoints)
        accelerator.wait_for_everyone()

    def set_codebook(codes: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Write codes (all, or `rows`) from the main process's batch into every process's codebook."""
        with torch.no_grad():
            vq.quantize.embedding.weight[slice(None) if rows is None else rows] = broadcast(codes, from_process=0)
        if args.normalize_codes:
            normalize_codebook(vq)

    start_time, start_elapsed = time.perf_counter(), state["elapsed_s"]
    # Every process reads the global batch (N x --batch-size images) and trains on its own slice of it.
    batches = train_batches(image_stream(train, args, state["position"]), args.batch_size * processes)
    stop_reason, last_step = "max_steps", args.max_steps
    if args.stop_at_step is not None and args.stop_at_step < args.max_steps:
        stop_reason, last_step = "stop_at_step", args.stop_at_step
    progress = tqdm(total=last_step, initial=state["step"], desc="VQ", dynamic_ncols=True, disable=not main_process)
    while state["step"] < last_step:
        elapsed = start_elapsed + time.perf_counter() - start_time
        out_of_time = torch.tensor(args.max_minutes is not None and elapsed >= 60 * args.max_minutes, device=device)
        if broadcast(out_of_time, from_process=0).item():  # the main process's clock: all stop together
            stop_reason = "max_minutes"
            break
        step = state["step"]
        generator.manual_seed(args.seed + step)  # restarts and initialisation: the same draws after --resume
        images, position = next(batches)
        images = with_freeform(images, step, args)[rank * args.batch_size : (rank + 1) * args.batch_size]
        pixels = image_tokenizer.preprocess(images)  # (batch, 3, res, res) in [-1, 1]
        lr = scheduler.get_last_lr()[0]
        if step == 0 and not codebook_loaded:  # data-dependent codebook initialisation (k-means++ style)
            with torch.no_grad():
                _, _, latents, _, errors = vq_forward(vq, pixels, args)
            set_codebook(pick_latents(latents, errors, args.num_codes, generator))
        reconstruction, losses, latents, indices, errors = model(pixels)
        loss = (
            args.l1_weight * losses["l1"]
            + args.l2_weight * losses["l2"]
            + losses["codebook"]
            + args.commitment_weight * losses["commitment"]
        )
        gan_on = discriminator is not None and step >= args.disc_start
        if gan_on:
            losses["generator"] = -discriminator(reconstruction).mean()
            loss = loss + args.disc_weight * losses["generator"]
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        if args.normalize_codes:
            normalize_codebook(vq)
        if gan_on:  # real and fake in one forward: DDP allows one forward per backward
            real, fake = discriminator(torch.cat([pixels, reconstruction.detach()])).chunk(2)
            losses["discriminator"] = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            optimizers["discriminator"].zero_grad(set_to_none=True)
            accelerator.backward(losses["discriminator"])
            optimizers["discriminator"].step()
        usage += accelerator.reduce(torch.bincount(indices, minlength=args.num_codes), reduction="sum")
        state["step"], state["position"] = step + 1, position
        state["elapsed_s"] = start_elapsed + time.perf_counter() - start_time
        restarted = None
        if args.restart_every and state["step"] % args.restart_every == 0:
            dead = (usage == 0).nonzero().flatten()  # the same in every process: usage is summed over them
            if len(dead):
                set_codebook(pick_latents(latents, errors, len(dead), generator), dead)
                reset_moments(optimizer, vq.quantize.embedding.weight, dead)
            usage.zero_()
            restarted = len(dead)
        progress.update(1)
        if state["step"] % args.log_every == 0 or restarted:
            losses = {k: accelerator.reduce(v.detach(), reduction="mean").item() for k, v in losses.items()}
            record = {"step": state["step"], "lr": lr, "elapsed_s": round(state["elapsed_s"], 1)}
            record.update({k: round(v, 5) for k, v in losses.items()})
            if restarted is not None:
                record["restarted_codes"] = restarted
            progress.set_postfix(l1=f"{losses['l1']:.4f}", refresh=False)
            log(record)
        if args.eval_every and state["step"] % args.eval_every == 0:
            metrics = run_eval()
            if metrics is not None:
                progress.set_postfix(psnr=f"{metrics['psnr']:.2f}", usage=f"{metrics['codebook_usage']:.2f}")
            log({"step": state["step"], "eval": metrics})
        if state["step"] % args.checkpoint_every == 0:
            checkpoint()
    progress.close()
    checkpoint()
    metrics = run_eval()
    final = {"step": state["step"], "stop": stop_reason, "elapsed_s": round(state["elapsed_s"], 1), "eval": metrics}
    if main_process:
        log(final)
        image_tokenizer.save_pretrained(args.output_dir / "image_tokenizer")
        print(json.dumps(final))
    accelerator.wait_for_everyone()
    return final


def stage_options(options: dict, output_dir: Path) -> list[str]:
    """A chain stage's options as command-line words; `init_from` is relative to the chain's output directory."""
    words = []
    for key, value in options.items():
        if key == "init_from":
            value = output_dir / value
        if isinstance(value, bool):  # the parser's booleans take a value: --bf16 false turns off a recipe's true
            value = str(value).lower()
        words += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return words


def run_chain(argv: list[str]) -> dict:
    """`--chain CHAIN.yaml --output-dir DIR [options for every stage]`: run a chain's stages in order, each in
    `DIR/<name>` with `--resume`, so that running the command again continues where it stopped (a finished stage
    only re-runs its final eval). A chain file holds `config` (a recipe, relative to the chain file), `stages` (a
    `name` and options each; a name may repeat, to resume that run with other options) and `result` (the stage whose
    `image_tokenizer/` is the chain's result). Returns the last stage's summary, with `result` (the path)."""
    import yaml

    parser = argparse.ArgumentParser(prog="train_image_tokenizer.py --chain")
    parser.add_argument("--chain", type=Path, required=True)
    parser.add_argument("--output-dir", "--output_dir", type=Path, required=True)
    known, common = parser.parse_known_args(argv)
    chain = yaml.safe_load(known.chain.read_text())
    if not isinstance(chain, dict) or not {"config", "stages", "result"} <= chain.keys():
        parser.error(f"{known.chain}: a chain needs `config`, `stages` and `result`")
    final = {}
    for number, stage in enumerate(chain["stages"], 1):
        options = dict(stage)
        name = options.pop("name")
        print(f"chain stage {number}/{len(chain['stages'])}: {name} {options}", file=sys.stderr)
        final = main(["--config", str(known.chain.parent / chain["config"]), *stage_options(options, known.output_dir),
                      *common, "--output-dir", str(known.output_dir / name), "--resume"])
    return {**final, "result": str(known.output_dir / chain["result"] / "image_tokenizer")}


if __name__ == "__main__":
    if "--chain" in sys.argv:
        print(json.dumps(run_chain(sys.argv[1:])))
    else:
        main()
