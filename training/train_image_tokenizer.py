"""Train CM3Leon's VQ image tokenizer (a diffusers `VQModel`) on any `datasets` image column.

CL §2.1 uses Make-A-Scene's VQ-VAE (256² → 32×32 codes from 8192), trained with pixel, codebook, commitment,
adversarial and perceptual losses. Here: L1 + L2 reconstruction, codebook and commitment losses (VQ-VAE, beta 0.25),
an optional PatchGAN discriminator (hinge loss), and no perceptual loss (it needs downloaded weights). Codebook
usage is kept up by a data-dependent initialisation (the codebook starts as encoder outputs of the first batch) and
dead-code restarts (every `--restart_every` steps, codes no image used since the last restart are moved onto encoder
outputs of the current batch, drawn in proportion to their squared quantization error as k-means++ seeds clusters).

Commands:

```bash
# The tiny VQ's first stage (64×64, stride 8: 64 tokens per image), 20,000 steps on one CPU thread (~50 min):
flock /tmp/cm3leon-heavy.lock python training/train_image_tokenizer.py \
    --config training/recipes/image_tokenizer_tiny.yaml --output_dir runs/image_tokenizer_tiny

# The shipped tiny VQ, every run it came from, in one command (run it again after a stop: it continues):
python training/train_image_tokenizer.py --chain training/recipes/image_tokenizer_tiny_chain.yaml --output_dir runs/vq

# Resume after an interruption (same command + --resume):
flock /tmp/cm3leon-heavy.lock python training/train_image_tokenizer.py \
    --config training/recipes/image_tokenizer_tiny.yaml --output_dir runs/image_tokenizer_tiny --resume

# Fine-tune a trained VQ with another loss or more codes (fresh optimizer and schedule):
python training/train_image_tokenizer.py --config training/recipes/image_tokenizer_tiny.yaml \
    --init_from runs/image_tokenizer_tiny/image_tokenizer --disc_weight 0.1 --disc_start 0 --output_dir runs/vq_gan

# Give a trained VQ twice the width, starting from exactly what it computes (widths and norm groups x2), and fine-tune:
python training/train_image_tokenizer.py --config training/recipes/image_tokenizer_tiny.yaml \
    --init_from runs/image_tokenizer_tiny/image_tokenizer --block_out_channels 16 32 64 128 --norm_num_groups 8 \
    --learning_rate 3e-4 --min_learning_rate 1e-6 --output_dir runs/vq_wide

# Your own data: any image column (`Image` or a list of `Image`s), local (`save_to_disk`) or on the Hub, streamed:
python training/train_image_tokenizer.py --dataset user/my-images --image_column image --streaming \
    --resolution 256 --block_out_channels 128 128 256 512 --num_codes 8192 --output_dir runs/my_vq

# Several processes or GPUs (DDP through accelerate; --batch_size is per process):
accelerate launch --num_processes 8 training/train_image_tokenizer.py --dataset user/my-images ... --batch_size 32
```

What is the libraries' and what is ours. accelerate places the model and optimizers on the device and wraps them for
DDP (`accelerate launch`, `torchrun`; gloo on CPU); transformers gives the schedule (linear warmup from 0, then
cosine to `--min_learning_rate`: `get_cosine_with_min_lr_schedule_with_warmup`), the checkpoint rotation
(`rotate_checkpoints`), and, with TRL's parser, the options (`HfArgumentParser` dataclasses; `--config` YAML sets
defaults, options win); `--resume` takes the last whole checkpoint as pretraining does (a damaged one is passed over,
with a warning). Ours: the losses, the codebook's data-dependent initialisation and
restarts, which under DDP are drawn on the main process and broadcast (code usage is summed over processes, so every
process restarts the same codes), the data order that `--resume` replays, and the checkpoint files. With the same
schedule, this loop gives bit-identical weights to the hand-written loop it replaced (checked over 150 steps of the
recipe and 40 steps with --bf16 and --freeform_fraction); the GAN's real and fake images now go through the
discriminator in one batch (DDP allows one forward per backward), and the warmup starts at 0, as transformers' does,
instead of at --learning_rate / --warmup_steps.

The run directory holds `checkpoint-<step>/` (written as a whole, `cm3leon_hf.atomic.atomic_directory`, so a crash
never leaves half a checkpoint; the last `--keep_checkpoints` are kept), `log.jsonl` (one JSON line per log and eval), and
`image_tokenizer/`, the final `Cm3LeonImageTokenizer` (diffusers format) that `training/build_processor.py` bundles.
A checkpoint holds the VQ, the discriminator, the optimizer moments (all safetensors) and `trainer_state.json`
(step, position in the data, code usage since the last restart, elapsed time): `--resume` continues from the
latest one with the same data order and learning rates. Not `Accelerator.save_state`: it writes the optimizers and
RNG states as pickles, which `load_state` unpickles (arbitrary code on load); nothing here is random but the
per-step seeded draws, so there is no RNG state to keep.

This script holds the options, the loop (`VQTrainer`) and `--chain`; the parts it trains with are
`cm3leon_hf.image_tokenizer_training`'s modules: `data`, `losses`, `codebook`, `model`, `checkpoints`, `evaluation`.
"""


import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from diffusers import VQModel
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from cm3leon_hf.checkpointing import last_complete_checkpoint
from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.image_tokenizer_training.checkpoints import load_optimizer_tensors, save_checkpoint
from cm3leon_hf.image_tokenizer_training.codebook import dead_codes, normalize_codebook, pick_latents, reset_moments
from cm3leon_hf.image_tokenizer_training.data import (
    FREEFORM_EVAL_SEED,
    eval_images,
    image_stream,
    load_splits,
    train_batches,
    with_freeform,
)
from cm3leon_hf.image_tokenizer_training.evaluation import evaluate
from cm3leon_hf.image_tokenizer_training.losses import (
    PatchDiscriminator,
    VQTrainingModel,
    discriminator_loss,
    edge_map,  # noqa: F401  (the script's names, as before the split)
    generator_loss,
    vq_forward,
    vq_loss,
)
from cm3leon_hf.image_tokenizer_training.model import architecture_differences, build_vq_model, init_from_pretrained


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
        "`freeform_psnr` on --eval_images drawings of another seed."))
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
        "a fine-tune with other losses (e.g. --disc_weight) or a fresh schedule; or of a narrower one (all "
        "--block_out_channels and --norm_num_groups divided by one factor), widened without changing what it "
        "computes, to give a trained VQ more capacity. Its codebook is kept when --num_codes matches, else "
        "re-initialised from the data. Fresh optimizer and step counter."))
    freeze_encoder: bool = field(default=False, **_help(
        "Train only the decoder (with post_quant_conv); the encoder, quant_conv and codebook stay as --init_from has "
        "them, so every image keeps its codes and a language model trained on them stays valid. No code restarts."))


@dataclass
class VQTrainingArguments(_Checked):
    """Losses, optimisation and the run. Per-process batch: under `accelerate launch` each of N processes takes its
    share of a global batch of N x --batch_size images."""

    output_dir: Path = field(metadata={"help": "The run directory (checkpoints, log.jsonl, image_tokenizer/)."})
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_learning_rate: float = field(default=1e-4, **_help("End of the cosine decay."))
    warmup_steps: int = 100
    max_steps: int = field(default=10_000, **_help("Also the length of the cosine schedule."))
    max_minutes: float | None = field(default=None, **_help("Stop (with a checkpoint and the final eval) after this."))
    stop_at_step: int | None = field(default=None, **_help(
        "Stop at this step (with a checkpoint and the final eval) while the schedule still runs to --max_steps: how "
        "--chain replays a run that was stopped there and resumed, or whose checkpoint of that step was kept."))
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    commitment_weight: float = field(default=0.25, **_help("VQ-VAE's beta."))
    edge_weight: float = field(default=0.0, **_help(
        "Weight the L1/L2 losses per pixel by 1 + this on edges of the target (`edge_map`), so that small shapes, "
        "whose corners are a handful of pixels, weigh more against flat background (0: plain means, the default). On "
        "the synthetic world 10 did not help: same PSNR, lower evaluator accuracy (bench/HISTORY.md)."))
    restart_every: int = field(default=50, **_help("Dead-code restart period in steps (0: never)."))
    disc_weight: float = field(default=0.0, **_help("Weight of the PatchGAN loss (0: no GAN)."))
    disc_start: int = field(default=1000, **_help("Step at which the discriminator starts."))
    disc_learning_rate: float | None = field(default=None, **_help(
        "Constant learning rate of the discriminator (default: --learning_rate). A fresh discriminator next to a "
        "converged VQ fine-tuned at a small --learning_rate needs a larger one of its own to become informative."))
    bf16: bool = field(default=False, **_help("bfloat16 autocast for the encoder and decoder (CPU: ~1.3x)."))
    seed: int = 0
    threads: int = field(default=1, **_help("torch CPU threads."))
    cpu: bool = field(default=False, **_help("Train on the CPU even where an accelerator is available."))
    resume: bool = field(default=False, **_help("Continue from the latest checkpoint in --output_dir."))
    checkpoint_every: int = field(default=500, **_help("Steps between checkpoints."))
    keep_checkpoints: int = 2
    eval_every: int = field(default=500, **_help("Steps between evals (0: only at the end)."))
    eval_images: int = field(default=1000, **_help("Images of --eval_split used by each eval."))
    log_every: int = 25


def make_parser():
    from trl import TrlParser

    epilog = ("--config RECIPE.yaml  a YAML file of any of these options (training/recipes/image_tokenizer_tiny.yaml); "
              "options on the command line override it. Options take dashes or underscores.  --chain CHAIN.yaml --output_dir DIR  "
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
        parser.error("--freeze_encoder needs --init_from: it keeps a trained VQ's encoder and codebook")
    if args.freeze_encoder:
        args.restart_every = 0
    return args


# ---------------------------------------------------------------------------------------------------- training


class VQTrainer:
    """One run of `main`: the VQ (new, from --init_from, or from the latest checkpoint with --resume), the
    discriminator, their optimizers and the schedule, prepared by accelerate; the data; and the loop (`train`), one
    `train_step` at a time, with code restarts, logs, evals and checkpoints. Under DDP the main process evaluates,
    logs and saves, and the others wait."""

    def __init__(self, args):
        self.args = args
        torch.set_num_threads(args.threads)
        self.accelerator = Accelerator(cpu=args.cpu)
        self.main_process = self.accelerator.is_main_process
        torch.manual_seed(args.seed)  # the same initial weights in every process (DDP also broadcasts them)
        self.generator = torch.Generator().manual_seed(args.seed)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        # The last whole checkpoint: a damaged one (a file truncated or changed since it was saved) is passed over, with
        # a warning, for the one before it.
        resume_from = last_complete_checkpoint(str(args.output_dir)) if args.resume else None
        resume_from = None if resume_from is None else Path(resume_from)
        if args.resume and resume_from is None and self.main_process:
            print(f"--resume: no checkpoint in {args.output_dir}, starting from scratch", file=sys.stderr)
        self._build_models(resume_from)
        self._load_state(resume_from)
        self._prepare()
        train, evaluation = load_splits(args)
        self.train_data = train
        self.held_out = eval_images(evaluation, args) if self.main_process else []
        self.freeform_held_out = []
        if args.freeform_fraction > 0 and self.main_process:
            from cm3leon_hf.synthetic.freeform import drawing_image

            self.freeform_held_out = [drawing_image(i, args.resolution, seed=FREEFORM_EVAL_SEED)
                                      for i in range(args.eval_images)]

    def _build_models(self, resume_from: Path | None) -> None:
        """The VQ, its image tokenizer (for evals and the final save), the discriminator and their optimizers."""
        args, device = self.args, self.accelerator.device
        vq = (VQModel.from_pretrained(resume_from / "vq") if resume_from else build_vq_model(args)).to(device).train()
        if resume_from is not None and (differences := architecture_differences(vq.config, args)):
            raise ValueError(f"--resume continues {resume_from}, whose VQ differs from these options: "
                             f"{'; '.join(differences)}. Resume with the run's options, or start a new --output_dir "
                             f"(with --init_from {resume_from / 'vq'} to start from its weights).")
        if resume_from is not None and args.disc_weight > 0 and not (resume_from / "discriminator.safetensors").exists():
            raise ValueError(f"--disc_weight {args.disc_weight}: {resume_from} has no discriminator to resume (the run "
                             f"trained without one). Start a new --output_dir with --init_from {resume_from / 'vq'}.")
        self.codebook_loaded = resume_from is not None
        if args.init_from is not None and resume_from is None:
            self.codebook_loaded = init_from_pretrained(vq, args.init_from)
        self.image_tokenizer = Cm3LeonImageTokenizer(vq)
        vq.train()  # the image tokenizer puts its model in eval mode
        if args.freeze_encoder:
            for module in (vq.encoder, vq.quant_conv, vq.quantize):
                module.requires_grad_(False)
        self.vq = vq
        self.optimizer = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=args.learning_rate,
                                          betas=(0.9, 0.99))
        self.optimizers = {"vq": self.optimizer}
        self.discriminator = None
        if args.disc_weight > 0:
            self.discriminator = PatchDiscriminator().to(device).train()
            disc_lr = args.learning_rate if args.disc_learning_rate is None else args.disc_learning_rate
            self.optimizers["discriminator"] = torch.optim.Adam(self.discriminator.parameters(), lr=disc_lr,
                                                                betas=(0.5, 0.9))

    def _load_state(self, resume_from: Path | None) -> None:
        """The run's state (step, data position, code usage, elapsed time): new, or the checkpoint's with its
        optimizer moments and discriminator."""
        self.state = {"step": 0, "position": {"rows": 0, "images": 0}, "elapsed_s": 0.0,
                      "usage": [0] * self.args.num_codes}
        if resume_from:
            self.state = json.loads((resume_from / "trainer_state.json").read_text())
            for name, opt in self.optimizers.items():
                load_optimizer_tensors(opt, load_file(resume_from / f"optimizer_{name}.safetensors"))
            if self.discriminator is not None:
                self.discriminator.load_state_dict(load_file(resume_from / "discriminator.safetensors"))
            if self.main_process:
                print(f"resumed from {resume_from} (step {self.state['step']})", file=sys.stderr)
        self.usage = torch.tensor(self.state["usage"], dtype=torch.long, device=self.accelerator.device)

    def _prepare(self) -> None:
        """The schedule at the step reached, then accelerate's wrapping of the modules (DDP) and optimizers."""
        args = self.args
        # The schedule's state is the step alone, so a resume with another --max_steps continues on the new cosine
        # at this step (as the recipe's runs were resumed).
        for group in self.optimizer.param_groups:
            group["initial_lr"] = args.learning_rate
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, args.warmup_steps, args.max_steps, min_lr=args.min_learning_rate,
            last_epoch=self.state["step"] - 1)
        # Prepared after loading: accelerate wraps the modules for DDP and the optimizers for its processes. The
        # schedule is stepped here, once per global step (accelerate's scheduler wrapper would step it once per
        # process).
        self.model, self.optimizer = self.accelerator.prepare(VQTrainingModel(self.vq, args), self.optimizer)
        self.optimizers["vq"] = self.optimizer
        if self.discriminator is not None:
            self.discriminator, self.optimizers["discriminator"] = self.accelerator.prepare(
                self.discriminator, self.optimizers["discriminator"])

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to --max_steps (or --stop_at_step, or --max_minutes), then checkpoint, evaluate and save the image
        tokenizer; returns the final record (step, why it stopped, elapsed seconds, eval metrics)."""
        args, state = self.args, self.state
        start_time, start_elapsed = time.perf_counter(), state["elapsed_s"]
        # Every process reads the global batch (N x --batch_size images) and trains on its own slice of it.
        batches = train_batches(image_stream(self.train_data, args, state["position"]),
                                args.batch_size * self.accelerator.num_processes)
        stop_reason, last_step = "max_steps", args.max_steps
        if args.stop_at_step is not None and args.stop_at_step < args.max_steps:
            stop_reason, last_step = "stop_at_step", args.stop_at_step
        progress = tqdm(total=last_step, initial=state["step"], desc="VQ", dynamic_ncols=True,
                        disable=not self.main_process)
        while state["step"] < last_step:
            elapsed = start_elapsed + time.perf_counter() - start_time
            out_of_time = torch.tensor(args.max_minutes is not None and elapsed >= 60 * args.max_minutes,
                                       device=self.accelerator.device)
            if broadcast(out_of_time, from_process=0).item():  # the main process's clock: all stop together
                stop_reason = "max_minutes"
                break
            step = state["step"]
            self.generator.manual_seed(args.seed + step)  # restarts and initialisation: the same draws after --resume
            images, position = next(batches)
            losses, lr, indices, latents, errors = self.train_step(step, images)
            self.usage += self.accelerator.reduce(torch.bincount(indices, minlength=args.num_codes), reduction="sum")
            state["step"], state["position"] = step + 1, position
            state["elapsed_s"] = start_elapsed + time.perf_counter() - start_time
            restarted = self.restart_dead_codes(latents, errors)
            progress.update(1)
            self.after_step(losses, lr, restarted, progress)
        progress.close()
        return self.finish(stop_reason)

    def train_step(self, step: int, images: list):
        """One optimizer step of the VQ (and of the discriminator, once the GAN is on) on this process's slice of the
        global batch. Returns (losses, learning rate, code indices, latents, squared quantization errors)."""
        args, rank = self.args, self.accelerator.process_index
        images = with_freeform(images, step, args)[rank * args.batch_size : (rank + 1) * args.batch_size]
        pixels = self.image_tokenizer.preprocess(images)  # (batch, 3, res, res) in [-1, 1]
        lr = self.scheduler.get_last_lr()[0]
        if step == 0 and not self.codebook_loaded:  # data-dependent codebook initialisation (k-means++ style)
            with torch.no_grad():
                _, _, latents, _, errors = vq_forward(self.vq, pixels, args)
            self.set_codebook(pick_latents(latents, errors, args.num_codes, self.generator))
        reconstruction, losses, latents, indices, errors = self.model(pixels)
        loss = vq_loss(losses, args)
        gan_on = self.discriminator is not None and step >= args.disc_start
        if gan_on:
            losses["generator"] = generator_loss(self.discriminator, reconstruction)
            loss = loss + args.disc_weight * losses["generator"]
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        if args.normalize_codes:
            normalize_codebook(self.vq)
        if gan_on:
            losses["discriminator"] = discriminator_loss(self.discriminator, pixels, reconstruction)
            self.optimizers["discriminator"].zero_grad(set_to_none=True)
            self.accelerator.backward(losses["discriminator"])
            self.optimizers["discriminator"].step()
        return losses, lr, indices, latents, errors

    def set_codebook(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Write codes (all, or `rows`) from the main process's batch into every process's codebook."""
        with torch.no_grad():
            self.vq.quantize.embedding.weight[slice(None) if rows is None else rows] = broadcast(codes, from_process=0)
        if self.args.normalize_codes:
            normalize_codebook(self.vq)

    def restart_dead_codes(self, latents: torch.Tensor, errors: torch.Tensor) -> int | None:
        """Every --restart_every steps, move the codes unused since the last restart onto latents of this batch
        (`pick_latents`) with fresh moments; returns how many moved (None between restarts)."""
        if not (self.args.restart_every and self.state["step"] % self.args.restart_every == 0):
            return None
        dead = dead_codes(self.usage)  # the same in every process: usage is summed over them
        if len(dead):
            self.set_codebook(pick_latents(latents, errors, len(dead), self.generator), dead)
            reset_moments(self.optimizer, self.vq.quantize.embedding.weight, dead)
        self.usage.zero_()
        return len(dead)

    def after_step(self, losses: dict, lr: float, restarted: int | None, progress) -> None:
        """The step's log line (every --log_every steps and after a restart), eval and checkpoint, when due."""
        args, step = self.args, self.state["step"]
        if step % args.log_every == 0 or restarted:
            losses = {k: self.accelerator.reduce(v.detach(), reduction="mean").item() for k, v in losses.items()}
            record = {"step": step, "lr": lr, "elapsed_s": round(self.state["elapsed_s"], 1)}
            record.update({k: round(v, 5) for k, v in losses.items()})
            if restarted is not None:
                record["restarted_codes"] = restarted
            progress.set_postfix(l1=f"{losses['l1']:.4f}", refresh=False)
            self.log(record)
        if args.eval_every and step % args.eval_every == 0:
            metrics = self.run_eval()
            if metrics is not None:
                progress.set_postfix(psnr=f"{metrics['psnr']:.2f}", usage=f"{metrics['codebook_usage']:.2f}")
            self.log({"step": step, "eval": metrics})
        if step % args.checkpoint_every == 0:
            self.checkpoint()

    def finish(self, stop_reason: str) -> dict:
        """The last checkpoint and eval, and the image tokenizer saved to `--output_dir/image_tokenizer`."""
        self.checkpoint()
        metrics = self.run_eval()
        state = self.state
        final = {"step": state["step"], "stop": stop_reason, "elapsed_s": round(state["elapsed_s"], 1), "eval": metrics}
        if self.main_process:
            self.log(final)
            self.image_tokenizer.save_pretrained(self.args.output_dir / "image_tokenizer")
            print(json.dumps(final))
        self.accelerator.wait_for_everyone()
        return final

    # ------------------------------------------------------------------------------- main process, others wait
    def run_eval(self) -> dict | None:
        """On the main process (the others wait); None elsewhere."""
        metrics = None
        if self.main_process:
            metrics = evaluate(self.image_tokenizer, self.held_out)
            if self.freeform_held_out:
                metrics["freeform_psnr"] = evaluate(self.image_tokenizer, self.freeform_held_out)["psnr"]
            self.vq.train()
        self.accelerator.wait_for_everyone()
        return metrics

    def log(self, record: dict) -> None:
        if self.main_process:
            with (self.args.output_dir / "log.jsonl").open("a") as log_file:
                log_file.write(json.dumps(record) + "\n")

    def checkpoint(self) -> None:
        if self.main_process:
            self.state["usage"] = self.usage.tolist()
            discriminator = self.discriminator
            save_checkpoint(self.args.output_dir, self.state["step"], self.vq,
                            self.accelerator.unwrap_model(discriminator) if discriminator is not None else None,
                            self.optimizers, self.state, self.args.keep_checkpoints)
        self.accelerator.wait_for_everyone()


def main(argv=None) -> dict:
    """Train a VQ with the options of `argv` (default: the command line); returns the final record."""
    return VQTrainer(parse_args(argv)).train()


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
    """`--chain CHAIN.yaml --output_dir DIR [options for every stage]`: run a chain's stages in order, each in
    `DIR/<name>` with `--resume`, so that running the command again continues where it stopped (a finished stage
    only re-runs its final eval). A chain file holds `config` (a recipe, relative to the chain file), `stages` (a
    `name` and options each; a name may repeat, to resume that run with other options) and `result` (the stage whose
    `image_tokenizer/` is the chain's result). Returns the last stage's summary, with `result` (the path)."""
    import yaml

    parser = argparse.ArgumentParser(prog="train_image_tokenizer.py --chain")
    parser.add_argument("--chain", type=Path, required=True)
    parser.add_argument("--output_dir", "--output-dir", type=Path, required=True)
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
                      *common, "--output_dir", str(known.output_dir / name), "--resume"])
    return {**final, "result": str(known.output_dir / chain["result"] / "image_tokenizer")}


if __name__ == "__main__":
    if "--chain" in sys.argv:
        print(json.dumps(run_chain(sys.argv[1:])))
    else:
        main()
