"""Retrieval-augmented CM3 pretraining of CM3Leon (CL §2): transformers `Trainer` + `Cm3LeonDataCollator` on data
pre-tokenized by `training/pretokenize.py`.

Commands:

```bash
# Pre-tokenize once (see training/pretokenize.py), then train the tiny config on one CPU thread
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretrain.py --config training/recipes/pretrain_tiny.yaml

# Override anything on the command line (TRL-style: --config YAML, then flags)
... --config training/recipes/pretrain_tiny.yaml --max_steps 2000 --output_dir outputs/pretrain-tiny-short

# Interrupted? Run the same command again: it resumes from the last complete checkpoint of --output_dir
# (--no_resume starts over in the same directory).

# Several processes (DDP; gloo on CPU, NCCL on GPUs): the same script under torchrun or accelerate
torchrun --nproc_per_node 2 training/pretrain.py --config training/recipes/pretrain_tiny.yaml --ddp_backend gloo
accelerate launch --num_processes 8 training/pretrain.py --config training/recipes/pretrain_350m.yaml

# FSDP on GPUs (shards parameters, gradients and optimizer state; wraps each Cm3LeonDecoderLayer):
accelerate launch --num_processes 8 training/pretrain.py --config training/recipes/pretrain_350m.yaml \
    --fsdp "full_shard auto_wrap" --fsdp_config '{"transformer_layer_cls_to_wrap": ["Cm3LeonDecoderLayer"]}'
```

What is ours and what is transformers': the training loop, optimizer, schedule, gradient accumulation, mixed
precision, checkpoints (`save_total_limit`), resume (optimizer, schedule, RNG and data position) and the distributed
backends are `Trainer`'s and accelerate's. This script adds:

- the data: pre-tokenized examples, their retrieved documents and the CM3 collator (training: the CM3 objective;
  evaluation: causal samples, so that `eval_image_loss` is the text-to-image next-token loss);
- evaluation metrics: the loss on image tokens and on text tokens separately (`eval_image_loss`, `eval_text_loss`)
  and, for the synthetic world, the share of generated images whose scene the world's evaluator reads as the caption
  says (`eval_scene_accuracy`, CFG sampling from a few evaluation captions);
- atomic checkpoints: `Trainer` writes `checkpoint-N` in place, so a kill while saving leaves a partial directory
  that `get_last_checkpoint` would pick; here every checkpoint is written to `.staging/` and renamed when complete
  (`cm3leon_hf.checkpointing`).

The paper's optimiser is the default (`Cm3LeonPretrainingConfig`; CL states only the peak LR and warmup, CM3's recipe
fills in the rest): AdamW β = (0.9, 0.98), ε = 1e-8, weight decay 0.1, gradient clipping 1.0, linear warmup then
polynomial (linear) decay; the peak LR of Table 3 for the paper sizes (6e-4 / 5e-4 / 1.2e-4) and, for the tiny config,
the one its recipe records.
"""

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretokenize import check_vocabulary, load_pretokenized  # noqa: E402

from cm3leon_hf import Cm3LeonConfig, Cm3LeonForCausalLM  # noqa: E402
from cm3leon_hf.checkpointing import AtomicCheckpointsMixin, last_complete_checkpoint  # noqa: E402
from cm3leon_hf.data_collator import IGNORE_INDEX, Cm3LeonCollatorEpochCallback, Cm3LeonDataCollator  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass
class PretrainArguments:
    """What this script adds to `TrainingArguments`."""

    train_data: str = field(metadata={"help": "a training/pretokenize.py output directory"})
    eval_data: str | None = field(default=None, metadata={"help": "pre-tokenized evaluation data"})
    model_config: str = field(
        default="hub_configs/cm3leon-tiny",
        metadata={"help": "a Cm3LeonConfig directory (relative paths also resolve against the repository)"},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from these weights instead"})
    processor: str | None = field(
        default=None, metadata={"help": "the processor of the data, saved with the model (default: the shipped tiny)"}
    )
    num_retrieved_docs: int = field(default=3, metadata={"help": "retrieved documents in front, at most"})
    poisson_lambda: float = field(default=1.0, metadata={"help": "CM3 span count ~ Poisson(lambda)"})
    causal_fraction: float | None = field(
        default=None, metadata={"help": "share of purely causal samples (default: Poisson(lambda) = 0, metaseq)"}
    )
    max_length: int | None = field(default=None, metadata={"help": "longest sample (default: the context)"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "use the first N evaluation examples"})
    eval_num_images: int = field(default=16, metadata={"help": "images generated per evaluation (0: none)"})
    eval_cfg_scale: float = field(default=3.0, metadata={"help": "CFG scale of the evaluation images"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (1 is fastest for tiny on 2 cores)"})
    no_resume: bool = field(default=False, metadata={"help": "do not resume from the last checkpoint"})

    def __post_init__(self):
        """Numbers are checked when parsed, before any data or model loads, with the flag's name."""
        for name, low in (("num_retrieved_docs", 0), ("eval_num_images", 0), ("max_length", 1),
                          ("max_eval_examples", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name} must be at least {low}, got {value}")
        if not (self.poisson_lambda > 0 and math.isfinite(self.poisson_lambda)):
            raise ValueError(f"--poisson_lambda must be a finite number > 0, got {self.poisson_lambda}")
        if self.causal_fraction is not None and not 0 <= self.causal_fraction <= 1:
            raise ValueError(f"--causal_fraction must be in [0, 1], got {self.causal_fraction}")
        if not (self.eval_cfg_scale >= 0 and math.isfinite(self.eval_cfg_scale)):
            raise ValueError(f"--eval_cfg_scale must be a finite number >= 0, got {self.eval_cfg_scale}")


@dataclass
class Cm3LeonPretrainingConfig(TrainingArguments):
    """`TrainingArguments` whose defaults are the paper's optimiser for pretraining (as TRL's `SFTConfig` sets its
    own): AdamW β = (0.9, 0.98) and clipping 1.0 (CM3), weight decay 0.1 (OPT), the 350M model's peak LR 6e-4 and 1,500
    warmup steps (CL Table 3), polynomial decay (CM3; power 1, i.e. linear, to 1e-7), and the columns the collator
    reads kept. Recipes scale the LR and warmup to the config and the run."""

    learning_rate: float = field(default=6e-4, metadata={"help": "Peak learning rate (CL Table 3: 350M 6e-4)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam β2 (CM3: 0.98)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (OPT: 0.1)."})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "Decay after warmup (CM3: polynomial)."})
    warmup_steps: float = field(default=1500, metadata={"help": "Linear warmup steps, or a ratio in [0, 1)."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the columns the collator reads (retrieved_indices, source_index)."}
    )


# ------------------------------------------------------------------------------------------------ metrics


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting `labels[:, t]`, `(batch, length)`; 0 at position 0 and where labels are -100.
    Used as `preprocess_logits_for_metrics`, so the evaluation keeps one float per token instead of the logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )  # (batch, length - 1)
    return torch.nn.functional.pad(nll, (1, 0))


class PretrainingMetrics:
    """`compute_metrics` for pretraining: loss on image and text tokens, and the synthetic world's scene accuracy of
    images generated from evaluation captions (skipped when `captions` is empty)."""

    def __init__(self, model, config, processor=None, captions=(), cfg_scale: float = 3.0, seed: int = 0):
        self.model, self.config, self.processor = model, config, processor
        self.captions, self.cfg_scale, self.seed = list(captions), cfg_scale, seed

    def __call__(self, eval_prediction) -> dict:
        nll, labels = np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids)
        scored = labels != IGNORE_INDEX
        scored[:, 0] = False
        image = scored & (labels >= self.config.image_token_offset) & (
            labels < self.config.image_token_offset + self.config.image_vocab_size)
        text = scored & ~image
        metrics = {}
        for name, mask in (("image", image), ("text", text)):
            if mask.any():
                metrics[f"{name}_loss"] = float(nll[mask].mean())
                metrics[f"{name}_tokens"] = int(mask.sum())
        if self.captions and self.processor is not None:
            metrics.update(self.scene_metrics())
        return metrics

    @torch.no_grad()
    def scene_metrics(self) -> dict:
        from cm3leon_hf.layout import prompt_text
        from cm3leon_hf.synthetic import score_many

        was_training = self.model.training
        self.model.eval()
        batch = self.processor([prompt_text(c) for c in self.captions], padding_side="left", return_tensors="pt")
        out = self.model.generate(
            **batch.to(self.model.device), cfg_scale=self.cfg_scale, generate_image=True, do_sample=True, top_p=0.8,
            top_k=0, max_new_tokens=self.config.image_seq_length,
            generator=torch.Generator().manual_seed(self.seed),
        )
        images = self.processor.decode_image_tokens(out[:, -self.config.image_seq_length:].cpu())
        self.model.train(was_training)
        scores = score_many(images, self.captions)
        return {"scene_accuracy": scores["scene_correct"], **{f"scene_{k}": scores[k] for k in
                ("shape", "color", "size", "position") if k in scores}}


def captions_of(examples, processor, count: int) -> list[str]:
    """The caption of the first `count` examples whose caption the synthetic world can read (`text <break> image`)."""
    from cm3leon_hf.synthetic import parse_caption

    captions = []
    for ids in examples.select(range(min(len(examples), 4 * count)))["input_ids"]:
        text = processor.tokenizer.decode(ids[: ids.index(processor.break_token_id)]).strip()
        try:
            parse_caption(text)
        except ValueError:
            continue
        captions.append(text)
        if len(captions) == count:
            break
    return captions


# ------------------------------------------------------------------------------------------------ trainer


class Cm3LeonTrainer(AtomicCheckpointsMixin, Trainer):
    """`Trainer` with atomic checkpoints (`AtomicCheckpointsMixin`) and its own evaluation collator (causal samples)."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _issue_warnings_after_load(self, load_result) -> None:
        # safetensors checkpoints leave out the LM head tied to the embeddings; Trainer would warn it is missing
        tied = set(self.model._tied_weights_keys or {}) if self.model.config.tie_word_embeddings else set()
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)


def resolve(path: str) -> str:
    return path if os.path.exists(path) or not (REPO / path).exists() else str(REPO / path)


def build_trainer(script_args: PretrainArguments, training_args: TrainingArguments) -> Cm3LeonTrainer:
    """The model (initialised with `training_args.seed`, or loaded), the data and collators, the metrics, the trainer.
    `training_args` may be any `TrainingArguments`; `Cm3LeonPretrainingConfig` carries the paper's defaults."""
    from cm3leon_hf import Cm3LeonProcessor
    from cm3leon_hf.pretrained import TINY_PATH

    if script_args.threads:
        torch.set_num_threads(script_args.threads)
    training_args.remove_unused_columns = False  # the collator reads input_ids, retrieved_indices, source_index
    set_seed(training_args.seed)
    if script_args.model_name_or_path:
        model = Cm3LeonForCausalLM.from_pretrained(script_args.model_name_or_path)
    else:
        model = Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(resolve(script_args.model_config)))
    config = model.config
    processor = Cm3LeonProcessor.from_pretrained(script_args.processor or TINY_PATH)
    processor.validate_model_config(config)

    train_examples, train_documents, manifest = load_pretokenized(script_args.train_data)
    check_vocabulary(manifest, config)
    collator_kwargs = dict(max_length=script_args.max_length or config.max_position_embeddings,
                           num_retrieved_docs=script_args.num_retrieved_docs, seed=training_args.seed)
    collator = Cm3LeonDataCollator(config, documents=train_documents, poisson_lambda=script_args.poisson_lambda,
                                   causal_fraction=script_args.causal_fraction, **collator_kwargs)
    eval_examples = eval_collator = metrics = None
    if script_args.eval_data:
        eval_examples, eval_documents, eval_manifest = load_pretokenized(script_args.eval_data)
        check_vocabulary(eval_manifest, config)
        if script_args.max_eval_examples:
            eval_examples = eval_examples.select(range(min(len(eval_examples), script_args.max_eval_examples)))
        eval_collator = Cm3LeonDataCollator(config, documents=eval_documents, causal_fraction=1.0, **collator_kwargs)
        captions = captions_of(eval_examples, processor, script_args.eval_num_images) if script_args.eval_num_images else []
        metrics = PretrainingMetrics(model, config, processor, captions, script_args.eval_cfg_scale, training_args.seed)

    return Cm3LeonTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        eval_data_collator=eval_collator,
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        processing_class=processor,
        compute_metrics=metrics,
        preprocess_logits_for_metrics=next_token_nll if metrics is not None else None,
        callbacks=[Cm3LeonCollatorEpochCallback(collator)],
    )


def completed_step(checkpoint: str | None, training_args: TrainingArguments) -> int | None:
    """The checkpoint's step if it already reached `max_steps` (Trainer would train one step more on resume)."""
    if checkpoint is None or training_args.max_steps <= 0:
        return None
    step = json.loads(Path(checkpoint, "trainer_state.json").read_text())["global_step"]
    return step if step >= training_args.max_steps else None


def main(script_args: PretrainArguments, training_args: TrainingArguments):
    """Train, or resume from the last complete checkpoint; a run that already reached `max_steps` is not trained
    further: its final model is written if a stop came before it (and returns None)."""
    from transformers.trainer_callback import TrainerState

    resume = None if script_args.no_resume else last_complete_checkpoint(training_args.output_dir)
    done = completed_step(resume, training_args)
    if done is not None:
        if not os.path.exists(os.path.join(training_args.output_dir, "model.safetensors")):
            script_args.model_name_or_path = resume
            trainer = build_trainer(script_args, training_args)
            trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
            trainer.save_model()
            trainer.save_state()
        print(json.dumps({"output_dir": training_args.output_dir, "global_step": done, "complete": True}), flush=True)
        return None
    trainer = build_trainer(script_args, training_args)
    if resume and trainer.is_world_process_zero():
        print(f"Resuming from {resume}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # the final model and its processor: loads with from_pretrained and pipeline()
    trainer.save_state()
    if trainer.is_world_process_zero():
        print(json.dumps({"output_dir": training_args.output_dir, "global_step": result.global_step,
                          "train_loss": result.training_loss}), flush=True)
    return trainer


def make_parser():
    from trl import TrlParser

    # TrlParser reads --config itself and does not list it: say so where users look.
    epilog = ("--config RECIPE.yaml  a YAML file of any of these flags (training/recipes/); flags given on the command "
              "line override it")
    return TrlParser((PretrainArguments, Cm3LeonPretrainingConfig), epilog=epilog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
