"""The `cm3leon-hf` command line.

    cm3leon-hf info hub_configs/cm3leon-7b        # vocabulary layout, sizes and exact parameter count
"""

import argparse
import sys


def info(args: argparse.Namespace) -> None:
    """Print a config's vocabulary layout and sizes, and count the parameters on the `meta` device (no memory)."""
    import torch

    from . import Cm3LeonConfig, Cm3LeonForCausalLM

    config = Cm3LeonConfig.from_pretrained(args.path)
    with torch.device("meta"):
        model = Cm3LeonForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.path}")
    print(f"  parameters        {count:,}")
    print(f"  layers x width    {config.num_hidden_layers} x {config.hidden_size}, {config.num_attention_heads} heads, "
          f"FFN {config.intermediate_size} ({config.hidden_act})")
    print(f"  context           {config.max_position_embeddings}")
    print(f"  vocabulary        {config.vocab_size}: text [0, {config.text_vocab_size}), image codes "
          f"[{config.image_token_offset}, {config.image_token_offset + config.image_vocab_size})")
    print(f"  tokens per image  {config.image_seq_length}")
    print(f"  special ids       pad {config.pad_token_id}, eos {config.eos_token_id}, break {config.break_token_id}, "
          f"eoss {config.eoss_token_id}, mask:0..{config.num_sentinel_tokens - 1} "
          f"{config.sentinel_token_start_id}..{config.sentinel_token_ids[-1]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cm3leon-hf", description="CM3Leon for the Hugging Face ecosystem.")
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="describe a config or saved model directory")
    info_parser.add_argument("path", help="directory with a config.json (e.g. hub_configs/cm3leon-350m)")
    info_parser.set_defaults(func=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
