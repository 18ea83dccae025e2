"""Multi-task instruction tuning of CM3Leon (CL §4) with TRL's `SFTTrainer`, on data pre-tokenized by
`training/pretokenize_sft.py` (`cm3leon_hf.sft_data`); adapters (LoRA, …) through PEFT's `peft_config`.

What is ours and what is TRL's: the data (the paper's task templates, the mixture balancing, pre-tokenized ids with a
`completion_mask`) and the defaults (`Cm3LeonSFTConfig`) are ours; the loop, the loss (whole sequence, or completion
only with `completion_only_loss=True`: TRL builds the labels from `completion_mask`), packing (`packing=True`: TRL's
best-fit-decreasing packing, padding-free, `position_ids` restarting at each example so that attention never crosses
an example — the model reads packed rows from `position_ids`), the schedule, the adapters (`get_peft_config`) and
resuming are TRL's and transformers'. Checkpoints are written atomically (`AtomicCheckpointsMixin`).

Example (a few steps on the synthetic world's tasks; `training/sft.py` is the command):

>>> import tempfile
>>> from cm3leon_hf import Cm3LeonProcessor
>>> from cm3leon_hf.pretrained import TINY_PATH
>>> from cm3leon_hf.sft_data import pretokenize_sft
>>> from cm3leon_hf.synthetic import build_tasks
>>> from trl import ModelConfig
>>> rows = build_tasks(("caption", "vqa"), num_train=4, num_validation=0, num_test=0, num_heldout=0)["train"]
>>> data = tempfile.mkdtemp()
>>> _ = pretokenize_sft(rows, Cm3LeonProcessor.from_pretrained(TINY_PATH), data, show_progress_bar=False)
>>> args = SFTArguments(train_data=data, balance=False)
>>> config = Cm3LeonSFTConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2,
...                           report_to="none", use_cpu=True, disable_tqdm=True)
>>> trainer = build_sft_trainer(args, config, ModelConfig(model_name_or_path=TINY_PATH))
>>> _ = trainer.train()  # doctest: +ELLIPSIS
{'train_runtime': ..., 'train_loss': ...}
>>> trainer.state.global_step
2
"""

import json
import os
from dataclasses import dataclass, field

import torch
from transformers.trainer_callback import TrainerState
from trl import SFTConfig, SFTTrainer

from .checkpointing import AtomicCheckpointsMixin, last_complete_checkpoint
from .modeling_cm3leon import Cm3LeonForCausalLM
from .pretokenized import load_pretokenized
from .processing_cm3leon import Cm3LeonProcessor
from .sft_data import MIXTURE_THRESHOLDS, balance
from .trainer import StopOnNonFiniteCallback, _completed_step


@dataclass
class SFTArguments:
    """What SFT adds to `SFTConfig` and TRL's `ModelConfig` (the model to start from, `model_name_or_path`, and the
    adapter: `use_peft`, `lora_r`, `lora_target_modules`, …): the pre-tokenized data and the mixture."""

    train_data: str = field(metadata={"help": "a training/pretokenize_sft.py output directory"})
    eval_data: str | None = field(default=None, metadata={"help": "pre-tokenized evaluation data"})
    balance: bool = field(
        default=True, metadata={"help": "balance the tasks: each within [0.3x, 3x] of the mean task size (CL E.1)"}
    )
    mixture_thresholds: list[float] = field(
        default_factory=lambda: list(MIXTURE_THRESHOLDS), metadata={"help": "the balancing's low and high thresholds"}
    )
    max_eval_examples: int | None = field(default=None, metadata={"help": "use the first N evaluation examples"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (1 is fastest for tiny on 2 cores)"})
    no_resume: bool = field(default=False, metadata={"help": "do not resume from the last checkpoint"})

    def __post_init__(self):
        if len(self.mixture_thresholds) != 2:
            raise ValueError(f"--mixture_thresholds takes two numbers (low high), got {self.mixture_thresholds}")
        for name in ("max_eval_examples", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")


@dataclass
class Cm3LeonSFTConfig(SFTConfig):
    """`SFTConfig` with the paper's fine-tuning choices as defaults (CL App. E.1, Table 4): sequences packed (to the
    model's context, `max_length=None`, which `build_sft_trainer` sets to `max_position_embeddings`), warm-up 150,
    the loss on the whole sequence (CL: "we concatenate the model input and output and train them using the same
    objective"; `completion_only_loss=True` for TRL's completion-only loss), and CM3's AdamW betas and clipping.
    The learning rate is the 760M/7B models' 5e-5; a tiny model wants more (`training/recipes/sft_tiny.yaml`)."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (CL Table 4: 5e-5)."})
    warmup_steps: float = field(default=150, metadata={"help": "Linear warm-up steps (CL Table 4: 150)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2 (CM3: 0.98)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (OPT: 0.1)."})
    packing: bool = field(default=True, metadata={"help": "Pack examples into rows of max_length (CL E.1)."})
    completion_only_loss: bool | None = field(
        default=False, metadata={"help": "Loss on the completion only (default: the whole sequence, as CL)."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Row length (default: the model's context)."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept."})
    # TRL turns checkpointing on under its deprecated name (a FutureWarning from transformers); off, by its new name:
    # it only slows small models. `--activation_checkpointing true` for large ones.
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )


class Cm3LeonSFTTrainer(AtomicCheckpointsMixin, SFTTrainer):
    """TRL's `SFTTrainer` with atomic checkpoints (a stop never leaves a half-written `checkpoint-N`)."""


def _load(directory: str, processor, limit: int | None = None):
    examples, _, manifest = load_pretokenized(directory, processor)
    if manifest.get("kind") != "sft":
        raise ValueError(f"{directory} holds pretraining data, not SFT data: make it with training/pretokenize_sft.py")
    examples = examples.select_columns(["input_ids", "completion_mask", "task"])
    return examples.select(range(min(limit, len(examples)))) if limit else examples


def build_sft_trainer(script_args: SFTArguments, training_args: SFTConfig, model_args) -> Cm3LeonSFTTrainer:
    """The model, its processor (checked against each other and against the data's vocabulary), the balanced data
    and TRL's trainer.

    Args:
        script_args: the data and the mixture.
        training_args: any `SFTConfig`; `Cm3LeonSFTConfig` carries the paper's defaults. `max_length=None` becomes
            the model's `max_position_embeddings`.
        model_args: a `trl.ModelConfig`: `model_name_or_path` (a saved CM3Leon, e.g. the bundled tiny), and with
            `use_peft` an adapter (`trl.get_peft_config`: LoRA on `lora_target_modules`, e.g. `q_proj k_proj v_proj
            out_proj fc1 fc2`), which `SFTTrainer` puts on the model; only the adapter trains.
    """
    from trl import get_peft_config

    if script_args.threads:
        torch.set_num_threads(script_args.threads)
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: the pretrained CM3Leon to fine-tune")
    model = Cm3LeonForCausalLM.from_pretrained(model_args.model_name_or_path)
    processor = Cm3LeonProcessor.from_pretrained(model_args.model_name_or_path)
    processor.validate_model_config(model.config)
    if training_args.max_length is None:
        training_args.max_length = model.config.max_position_embeddings
    elif training_args.max_length > model.config.max_position_embeddings:
        raise ValueError(f"--max_length {training_args.max_length} is longer than the model's context "
                         f"({model.config.max_position_embeddings} positions)")
    train = _load(script_args.train_data, processor)
    if script_args.balance:
        train = balance(train, tuple(script_args.mixture_thresholds), seed=training_args.seed)
    train = train.remove_columns("task")
    evaluation = None
    if script_args.eval_data:
        evaluation = _load(script_args.eval_data, processor, script_args.max_eval_examples).remove_columns("task")
    return Cm3LeonSFTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=processor, peft_config=get_peft_config(model_args),
                             callbacks=[StopOnNonFiniteCallback()])  # a NaN step stops the run, before its checkpoint


def run_sft(script_args: SFTArguments, training_args: SFTConfig, model_args) -> Cm3LeonSFTTrainer | None:
    """Train, or resume from the last complete checkpoint of `training_args.output_dir` (unless `no_resume`), then
    save the final model (or adapter) with its processor and print a JSON summary. Arguments as `build_sft_trainer`.
    A run whose last checkpoint reached `max_steps` is not trained further (`Trainer` would count one more step on
    resume and write a checkpoint past the end): its final model is written from that checkpoint if a stop came
    before it, and None is returned."""
    resume = None if script_args.no_resume else last_complete_checkpoint(training_args.output_dir)
    done = _completed_step(resume, training_args)
    if done is not None:
        final = ("adapter_model.safetensors", "model.safetensors")
        if not any(os.path.exists(os.path.join(training_args.output_dir, name)) for name in final):
            trainer = build_sft_trainer(script_args, training_args, model_args)
            trainer._load_from_checkpoint(resume)  # the weights (or the adapter) of the checkpoint, as `train` would
            trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
            trainer.save_model()
            trainer.save_state()
        print(json.dumps({"output_dir": training_args.output_dir, "global_step": done, "complete": True}), flush=True)
        return None
    trainer = build_sft_trainer(script_args, training_args, model_args)
    if resume and trainer.is_world_process_zero():
        print(f"Resuming from {resume}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        summary = {"output_dir": training_args.output_dir, "global_step": result.global_step,
                   "train_loss": result.training_loss}
        print(json.dumps(summary), flush=True)
    return trainer


__all__ = ["Cm3LeonSFTConfig", "Cm3LeonSFTTrainer", "SFTArguments", "build_sft_trainer", "run_sft"]
