"""The arguments of retrieval-augmented CM3 pretraining (`cm3leon_hf.trainer`), as TRL keeps `SFTConfig` apart from
`SFTTrainer`: `PretrainArguments` (the data, the model, the collator and the evaluation images) and
`Cm3LeonPretrainingConfig` (`TrainingArguments` with the paper's optimiser as defaults). `training/pretrain.py` parses
both with `trl.TrlParser` (`--config` YAML recipes in `training/recipes/`, flags override them).

Example:

>>> from transformers import HfArgumentParser
>>> parser = HfArgumentParser((PretrainArguments, Cm3LeonPretrainingConfig))
>>> script_args, training_args = parser.parse_args_into_dataclasses(
...     ["--train_data", "outputs/pretokenized/train", "--output_dir", "outputs/run", "--max_steps", "100"])
>>> script_args.num_retrieved_docs, training_args.adam_beta2, training_args.weight_decay
(3, 0.98, 0.1)
"""

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .logits_process import check_guidance_scale


@dataclass
class PretrainArguments:
    """What pretraining adds to `TrainingArguments`: the pre-tokenized data, the model, the CM3 collator's settings
    and the evaluation. Numbers are checked when the arguments are made (before any data or model loads), and an
    error names the flag."""

    train_data: str = field(metadata={"help": "a training/pretokenize.py output directory"})
    eval_data: str | None = field(default=None, metadata={"help": "pre-tokenized evaluation data"})
    model_config: str = field(
        default="hub_configs/cm3leon-tiny",
        metadata={"help": "a Cm3LeonConfig directory (hub_configs/<name> also resolves to the package's copy)"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "override --model_config's fields when training from scratch, as transformers' run_clm "
                          "does: 'hidden_size=384,num_attention_heads=6'"},
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
    eval_guidance_scale: float = field(default=3.0, metadata={"help": "guidance_scale of the evaluation images"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (1 is fastest for tiny on 2 cores)"})
    no_resume: bool = field(default=False, metadata={"help": "do not resume from the last checkpoint"})

    def __post_init__(self):
        for name, low in (("num_retrieved_docs", 0), ("eval_num_images", 0), ("max_length", 1),
                          ("max_eval_examples", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name} must be at least {low}, got {value}")
        if not (self.poisson_lambda > 0 and math.isfinite(self.poisson_lambda)):
            raise ValueError(f"--poisson_lambda must be a finite number > 0, got {self.poisson_lambda}")
        if self.causal_fraction is not None and not 0 <= self.causal_fraction <= 1:
            raise ValueError(f"--causal_fraction must be in [0, 1], got {self.causal_fraction}")
        if self.config_overrides is not None and not all(
                item.count("=") == 1 and item.split("=")[0] for item in self.config_overrides.split(",")):
            raise ValueError(f"--config_overrides must be key=value pairs separated by commas, got "
                             f"{self.config_overrides!r}")
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError("--config_overrides changes a new model's config: it cannot be combined with "
                             "--model_name_or_path (those weights have their shape)")
        check_guidance_scale(self.eval_guidance_scale, "--eval_guidance_scale")  # generate's one check of a scale


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

    def __post_init__(self):
        # transformers accepts these and fails later: max_steps 0 in a ZeroDivisionError, an infinite learning rate
        # with NaN weights saved as a finished run
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be a positive number of steps, or -1 to train --num_train_epochs "
                             f"epochs; got {self.max_steps}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"--learning_rate must be a finite number >= 0, got {self.learning_rate}")
        super().__post_init__()


__all__ = ["Cm3LeonPretrainingConfig", "PretrainArguments"]
