"""Multi-task instruction tuning of CM3Leon (CL §4) with TRL's `SFTTrainer`, on data pre-tokenized by
`training/pretokenize_sft.py`. The library is `cm3leon_hf.sft` (what is ours, what is TRL's, the paper's defaults).

Commands:

```bash
# Fine-tune the bundled tiny model on the synthetic world's tasks (the recipe: training/recipes/sft_tiny.yaml)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/sft.py --config training/recipes/sft_tiny.yaml

# LoRA instead of full fine-tuning (PEFT, through TRL's ModelConfig flags)
... --config training/recipes/sft_tiny.yaml --use_peft --lora_r 16 --lora_alpha 32 \
    --lora_target_modules q_proj k_proj v_proj out_proj fc1 fc2 --output_dir outputs/sft/tiny-lora

# Loss on the completion only (TRL's completion mask) instead of the whole sequence (the paper)
... --config training/recipes/sft_tiny.yaml --completion_only_loss true

# Interrupted? Run the same command again: it resumes from the last complete checkpoint of --output_dir.
# Several processes: the same script under torchrun or accelerate launch, as TRL's sft.py.
```
"""

from trl import ModelConfig

from cm3leon_hf.sft import Cm3LeonSFTConfig, SFTArguments, run_sft


def main(script_args: SFTArguments, training_args: Cm3LeonSFTConfig, model_args: ModelConfig):
    return run_sft(script_args, training_args, model_args)


def make_parser():
    from trl import TrlParser

    epilog = ("--config RECIPE.yaml  a YAML file of any of these flags (training/recipes/); flags given on the command "
              "line override it")
    return TrlParser((SFTArguments, Cm3LeonSFTConfig, ModelConfig), epilog=epilog)


if __name__ == "__main__":
    parser = make_parser()
    try:
        arguments = parser.parse_args_and_config()
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))
    main(*arguments)
