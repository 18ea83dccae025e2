"""Retrieval-augmented CM3 pretraining of CM3Leon (CL §2): transformers `Trainer` + `Cm3LeonDataCollator` on data
pre-tokenized by `training/pretokenize.py`. The library is `cm3leon_hf.trainer` (what is ours and what is
transformers', the paper's optimiser) and `cm3leon_hf.pretraining_config` (every flag).

Commands:

```bash
# Pre-tokenize once (see training/pretokenize.py), then train the tiny config on one CPU thread
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretrain.py --config training/recipes/pretrain_tiny.yaml

# Override anything on the command line (TRL-style: --config YAML, then flags)
... --config training/recipes/pretrain_tiny.yaml --max_steps 2000 --output_dir outputs/pretrain-tiny-short

# Another shape from the same config (transformers' run_clm convention; from scratch only)
... --config training/recipes/pretrain_tiny.yaml --config_overrides hidden_size=384,num_attention_heads=6,intermediate_size=1536

# Interrupted? Run the same command again: it resumes from the last complete checkpoint of --output_dir
# (--no_resume starts over in the same directory).

# Several processes (DDP; gloo on CPU, NCCL on GPUs): the same script under torchrun or accelerate
torchrun --nproc_per_node 2 training/pretrain.py --config training/recipes/pretrain_tiny.yaml --ddp_backend gloo
accelerate launch --num_processes 8 training/pretrain.py --config training/recipes/pretrain_350m.yaml

# FSDP on GPUs (shards parameters, gradients and optimizer state; wraps each Cm3LeonDecoderLayer):
accelerate launch --num_processes 8 training/pretrain.py --config training/recipes/pretrain_350m.yaml \
    --fsdp "full_shard auto_wrap" --fsdp_config '{"transformer_layer_cls_to_wrap": ["Cm3LeonDecoderLayer"]}'
```
"""

from cm3leon_hf.pretraining_config import Cm3LeonPretrainingConfig, PretrainArguments
from cm3leon_hf.trainer import run_pretraining


def main(script_args: PretrainArguments, training_args: Cm3LeonPretrainingConfig):
    """Train, or resume from the last complete checkpoint; a finished run is not trained further (returns None)."""
    return run_pretraining(script_args, training_args)


def make_parser():
    from trl import TrlParser

    # TrlParser reads --config itself and does not list it: say so where users look.
    epilog = ("--config RECIPE.yaml  a YAML file of any of these flags (training/recipes/); flags given on the command "
              "line override it")
    return TrlParser((PretrainArguments, Cm3LeonPretrainingConfig), epilog=epilog)


if __name__ == "__main__":
    parser = make_parser()
    try:
        arguments = parser.parse_args_and_config()
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))
    from cm3leon_hf.trainer import NonFiniteTrainingError

    try:
        main(*arguments)
    except NonFiniteTrainingError as error:  # a clear message and exit code 1, not a traceback through Trainer
        raise SystemExit(f"error: {error}") from None
