"""Retrieval-augmented CM3 pretraining of CM3Leon (CL §2): transformers' `Trainer` with `Cm3LeonDataCollator` on data
pre-tokenized by `cm3leon_hf.pretokenized` (the command is `training/pretrain.py`; its arguments are
`cm3leon_hf.pretraining_config`'s).

What is ours and what is transformers': the training loop, optimizer, schedule, gradient accumulation, mixed
precision, checkpoints (`save_total_limit`), resume (optimizer, schedule, RNG and data position) and the distributed
backends are `Trainer`'s and accelerate's. This module adds:

- the data: pre-tokenized examples, their retrieved documents and the CM3 collator (training: the CM3 objective;
  evaluation: causal samples, so that `eval_image_loss` is the text-to-image next-token loss);
- evaluation metrics (`PretrainingMetrics`): the loss on image tokens and on text tokens separately
  (`eval_image_loss`, `eval_text_loss`) and, for the synthetic world, the share of generated images whose scene the
  world's evaluator reads as the caption says (`eval_scene_accuracy`, CFG sampling from a few evaluation captions);
- atomic checkpoints: `Trainer` writes `checkpoint-N` in place, so a kill while saving leaves a partial directory
  that `get_last_checkpoint` would pick; here every checkpoint is written to `.staging/` and renamed when complete
  (`cm3leon_hf.checkpointing`);
- `StopOnNonFiniteCallback`: a step that leaves a NaN or infinite weight (a non-finite loss or gradient: too high a
  learning rate, an fp32 overflow) stops the run with `NonFiniteTrainingError`, naming the step, before anything of it
  is saved (transformers' `logging_nan_inf_filter` would hide the loss and the run would end "successfully");
- `run_pretraining`: train, or resume from the last complete checkpoint, and never train a finished run further.

The paper's optimiser is the default (`Cm3LeonPretrainingConfig`; CL states only the peak LR and warmup, CM3's recipe
fills in the rest): AdamW β = (0.9, 0.98), ε = 1e-8, weight decay 0.1, gradient clipping 1.0, linear warmup then
polynomial (linear) decay; the peak LR of Table 3 for the paper sizes (6e-4 / 5e-4 / 1.2e-4) and, for the tiny config,
the one its recipe records.

Example (`output_dir` resumes when run again):

```python
from cm3leon_hf.pretraining_config import Cm3LeonPretrainingConfig, PretrainArguments
from cm3leon_hf.trainer import run_pretraining

run_pretraining(PretrainArguments(train_data="outputs/pretokenized/train", eval_num_images=0),
                Cm3LeonPretrainingConfig(output_dir="outputs/run", max_steps=100, warmup_steps=10, use_cpu=True))
```
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .checkpointing import AtomicCheckpointsMixin, last_complete_checkpoint
from .configuration_cm3leon import Cm3LeonConfig
from .data_collator import IGNORE_INDEX, Cm3LeonCollatorEpochCallback, Cm3LeonDataCollator
from .modeling_cm3leon import Cm3LeonForCausalLM
from .pretokenized import load_pretokenized
from .pretraining_config import Cm3LeonPretrainingConfig, PretrainArguments

PACKAGE_DIR = Path(__file__).resolve().parent  # holds hub_configs/, as the repository root does

# ------------------------------------------------------------------------------------------------ metrics


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting `labels[:, t]`, `(batch, length)`; 0 at position 0 and where labels are -100.
    Used as `preprocess_logits_for_metrics`, so the evaluation keeps one float per token instead of the logits.

    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 ids
    >>> next_token_nll(logits, torch.tensor([[-100, 2, -100]]))
    tensor([[0.0000, 1.3863, 0.0000]])
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )  # (batch, length - 1)
    return torch.nn.functional.pad(nll, (1, 0))


class PretrainingMetrics:
    """`compute_metrics` for pretraining: loss on image and text tokens, and the synthetic world's scene accuracy of
    images generated from evaluation captions (skipped when `captions` is empty).

    Args:
        model: the `Cm3LeonForCausalLM` being trained (generates the evaluation images).
        config: its `Cm3LeonConfig` (which ids are image tokens).
        processor: a `Cm3LeonProcessor`, to encode the captions and decode the images.
        captions: synthetic-world captions to draw (`captions_of`).
        guidance_scale: the guidance scale of those images.
        seed: the sampling seed of those images.
    """

    def __init__(self, model, config, processor=None, captions=(), guidance_scale: float = 3.0, seed: int = 0):
        self.model, self.config, self.processor = model, config, processor
        self.captions, self.guidance_scale, self.seed = list(captions), guidance_scale, seed

    def __call__(self, eval_prediction) -> dict:
        """`image_loss`, `image_tokens`, `text_loss`, `text_tokens` (and `scene_*` with captions) of an
        `EvalPrediction` whose predictions are `next_token_nll`'s."""
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
        """Images sampled for the captions (CFG, top-p 0.8), read by the synthetic world's evaluator: `scene_accuracy`
        (the whole scene as the caption says) and per attribute (`scene_shape`, `scene_color`, ...)."""
        from .layout import prompt_text
        from .synthetic import score_many

        was_training = self.model.training
        self.model.eval()
        batch = self.processor([prompt_text(c) for c in self.captions], padding_side="left", return_tensors="pt")
        out = self.model.generate(
            **batch.to(self.model.device), guidance_scale=self.guidance_scale, generate_image=True, do_sample=True,
            top_p=0.8, top_k=0, max_new_tokens=self.config.image_seq_length,
            generator=torch.Generator().manual_seed(self.seed),
        )
        images = self.processor.decode_image_tokens(out[:, -self.config.image_seq_length:].cpu())
        self.model.train(was_training)
        scores = score_many(images, self.captions)
        return {"scene_accuracy": scores["scene_correct"], **{f"scene_{k}": scores[k] for k in
                ("shape", "color", "size", "position") if k in scores}}


def captions_of(examples, processor, count: int) -> list[str]:
    """The caption of the first `count` examples whose caption the synthetic world can read (`text <break> image`).
    None when the processor's images are smaller than the world's evaluator reads (a user's own pictures through
    another image tokenizer): scene metrics are for the synthetic world's data only."""
    from .synthetic import MIN_RESOLUTION, parse_caption

    if processor.image_tokenizer.resolution < MIN_RESOLUTION:
        return []
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


class NonFiniteTrainingError(RuntimeError):
    """Training produced NaN or infinite weights (`StopOnNonFiniteCallback`)."""


class StopOnNonFiniteCallback(TrainerCallback):
    """Stop training at the first optimizer step that leaves a NaN or infinite trainable weight, raising
    `NonFiniteTrainingError` with the step, the first such tensor and the learning rate.

    A non-finite loss or gradient reaches the weights at the optimizer step (with clipping, one NaN gradient makes
    every update NaN), and transformers' `logging_nan_inf_filter` keeps the logged loss finite, so without this a run
    with `--learning_rate inf` ends with exit code 0 and every weight NaN. The check runs after each optimizer step
    and before the step's checkpoint is saved, so that the last checkpoint on disk, which a resumed run starts from,
    holds finite weights. A step skipped by fp16's gradient scaler leaves the weights finite and is not an error. Its
    cost is one norm over the trainable weights per optimizer step (`torch.nn.utils.get_total_norm`). With sharded
    weights (FSDP, DeepSpeed ZeRO-3) each process checks its own shard.

    Used by `build_trainer`; any `Trainer` takes it: `Trainer(..., callbacks=[StopOnNonFiniteCallback()])`.
    """

    def on_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if model is None:
            return
        weights = [p.detach() for p in model.parameters() if p.requires_grad]
        if not weights or torch.isfinite(torch.nn.utils.get_total_norm(weights)):
            return
        names = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.detach()).all()]
        if not names:  # finite weights whose norm overflowed (fp16): not an error
            return
        step = state.global_step + 1  # global_step counts the steps finished before this one
        rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        raise NonFiniteTrainingError(
            f"Training stopped at step {step}: after its optimizer step, {len(names)} weight tensor(s) are NaN or "
            f"infinite (first: {names[0]}); the learning rate was {rate:g}. A non-finite loss or gradient reached the "
            f"weights (too high a learning rate, an overflow, or bad data). Nothing of step {step} was saved: "
            + (f"the last checkpoint, {last}, holds the weights of an earlier step and is where a resumed run starts. "
               if last else "no checkpoint was written. ")
            + "Lower --learning_rate (or check the data) and run again."
        )


class Cm3LeonTrainer(AtomicCheckpointsMixin, Trainer):
    """`Trainer` with atomic checkpoints (`AtomicCheckpointsMixin`) and its own evaluation collator (causal samples).

    Args:
        eval_data_collator: the collator of evaluation batches (default: `data_collator`, as `Trainer`'s).
        *args, **kwargs: `Trainer`'s.
    """

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


def _resolve(path: str) -> str:
    """`path`, or the package's copy of it where it does not exist here (`hub_configs/<name>` from any directory)."""
    return path if os.path.exists(path) or not (PACKAGE_DIR / path).exists() else str(PACKAGE_DIR / path)


def _build_model(script_args: PretrainArguments, training_args: TrainingArguments):
    """The model (initialised with `training_args.seed`, or loaded) and its processor, checked against each other."""
    from .pretrained import TINY_PATH
    from .processing_cm3leon import Cm3LeonProcessor

    set_seed(training_args.seed)
    if script_args.model_name_or_path:
        model = Cm3LeonForCausalLM.from_pretrained(script_args.model_name_or_path)
    else:
        config = Cm3LeonConfig.from_pretrained(_resolve(script_args.model_config))
        if script_args.config_overrides:
            # transformers' own parser (run_clm's --config_overrides): names a key the config lacks, casts each
            # value to the field's type; then the config's own checks (e.g. heads dividing the width).
            try:
                config.update_from_string(script_args.config_overrides)
                config._validate_layout()
            except ValueError as error:  # transformers' own message names the key but not the flag
                raise ValueError(f"--config_overrides {script_args.config_overrides!r}: {error}") from None
        model = Cm3LeonForCausalLM(config)
    processor = Cm3LeonProcessor.from_pretrained(script_args.processor or TINY_PATH)
    processor.validate_model_config(model.config)
    return model, processor


def build_trainer(script_args: PretrainArguments, training_args: TrainingArguments) -> Cm3LeonTrainer:
    """The model (initialised with `training_args.seed`, or loaded), the data and collators, the metrics, the trainer.

    Args:
        script_args: the data, model, collator and evaluation settings.
        training_args: any `TrainingArguments`; `Cm3LeonPretrainingConfig` carries the paper's defaults.
            `remove_unused_columns` is set to False (the collator reads `retrieved_indices` and `source_index`).
    """
    if script_args.threads:
        torch.set_num_threads(script_args.threads)
    training_args.remove_unused_columns = False  # the collator reads input_ids, retrieved_indices, source_index
    model, processor = _build_model(script_args, training_args)
    config = model.config
    train_examples, train_documents, _ = load_pretokenized(script_args.train_data, processor)
    collator_kwargs = dict(max_length=script_args.max_length or config.max_position_embeddings,
                           num_retrieved_docs=script_args.num_retrieved_docs, seed=training_args.seed)
    collator = Cm3LeonDataCollator(config, documents=train_documents, poisson_lambda=script_args.poisson_lambda,
                                   causal_fraction=script_args.causal_fraction, **collator_kwargs)
    eval_examples = eval_collator = metrics = None
    if script_args.eval_data:
        eval_examples, eval_documents, _ = load_pretokenized(script_args.eval_data, processor)
        if script_args.max_eval_examples:
            eval_examples = eval_examples.select(range(min(len(eval_examples), script_args.max_eval_examples)))
        eval_collator = Cm3LeonDataCollator(config, documents=eval_documents, causal_fraction=1.0, **collator_kwargs)
        count = script_args.eval_num_images
        captions = captions_of(eval_examples, processor, count) if count else []
        metrics = PretrainingMetrics(model, config, processor, captions, script_args.eval_guidance_scale, training_args.seed)

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
        callbacks=[Cm3LeonCollatorEpochCallback(collator), StopOnNonFiniteCallback()],
    )


# ------------------------------------------------------------------------------------------------ a run


def _completed_step(checkpoint: str | None, training_args: TrainingArguments) -> int | None:
    """The checkpoint's step if it already reached `max_steps` (Trainer would train one step more on resume)."""
    if checkpoint is None or training_args.max_steps <= 0:
        return None
    step = json.loads(Path(checkpoint, "trainer_state.json").read_text())["global_step"]
    return step if step >= training_args.max_steps else None


def _finish_completed_run(script_args: PretrainArguments, training_args: TrainingArguments, checkpoint: str) -> None:
    """Write the final model of a run whose last checkpoint reached `max_steps`, if a stop came before it."""
    from transformers.trainer_callback import TrainerState

    if os.path.exists(os.path.join(training_args.output_dir, "model.safetensors")):
        return
    script_args.model_name_or_path = checkpoint
    trainer = build_trainer(script_args, training_args)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    trainer.save_model()
    trainer.save_state()


def run_pretraining(script_args: PretrainArguments, training_args: TrainingArguments) -> Cm3LeonTrainer | None:
    """Train, or resume from the last complete checkpoint of `training_args.output_dir` (unless
    `script_args.no_resume`), then save the final model and its processor (`from_pretrained` and `pipeline()` load
    it) and print a JSON summary. A run that already reached `max_steps` is not trained further: its final model is
    written if a stop came before it, and None is returned.

    Args:
        script_args: the data, model, collator and evaluation settings.
        training_args: any `TrainingArguments`; `Cm3LeonPretrainingConfig` carries the paper's defaults.

    Returns:
        The trainer after training, or None for a run that was already complete.
    """
    resume = None if script_args.no_resume else last_complete_checkpoint(training_args.output_dir)
    done = _completed_step(resume, training_args)
    if done is not None:
        _finish_completed_run(script_args, training_args, resume)
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


__all__ = [
    "Cm3LeonPretrainingConfig",
    "Cm3LeonTrainer",
    "NonFiniteTrainingError",
    "PretrainArguments",
    "PretrainingMetrics",
    "StopOnNonFiniteCallback",
    "build_trainer",
    "captions_of",
    "next_token_nll",
    "run_pretraining",
]
