"""Make a CM3Leon processor and config around a public image tokenizer: Janus, Emu3 or Chameleon's VQ-VAE.

The output directory holds our text BPE with the chosen VQ-VAE (and its own image processor), a `Cm3LeonConfig` whose
image vocabulary and tokens per image are the tokenizer's, and a model card; `training/pretokenize.py --processor DIR`
and `training/pretrain.py --model_config DIR --processor DIR` take it as it is. The library is
`cm3leon_hf.convert_image_tokenizer` (what is read from where).

Commands:

```bash
# Janus-Pro's VQ-VAE (384² → 576 tokens, 16,384 codes) from the whole model, on the tiny architecture
python training/convert_image_tokenizer.py --image_tokenizer deepseek-community/Janus-Pro-1B \
    --output_dir cm3leon-janus --max_position_embeddings 2048

# The paper's shape: Chameleon's VQ-VAE (512² → 1,024 tokens, 8,192 codes) on the 350M config of CL Table 3
python training/convert_image_tokenizer.py --image_tokenizer facebook/chameleon-7b \
    --base_config src/cm3leon_hf/hub_configs/cm3leon-350m --output_dir cm3leon-350m-chameleon-vq

# Emu3's VQ-VAE has no fixed resolution: choose one
python training/convert_image_tokenizer.py --image_tokenizer BAAI/Emu3-Gen-hf --resolution 256 \
    --output_dir cm3leon-emu3 --max_position_embeddings 2048
```

A local directory works as well as a Hub id (nothing is downloaded then). Flags are dataclass fields parsed with
`trl.TrlParser` (`--config FILE.yaml` supplies any of them).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ConvertImageTokenizerArguments:
    """The image tokenizer, the architecture it goes with and where the result goes."""

    image_tokenizer: str = field(metadata={"help": "a whole Janus/Emu3/Chameleon model, its VQ-VAE alone, or a saved "
                                                   "TransformersVQImageTokenizer (directory or Hub id)"})
    output_dir: str = field(metadata={"help": "where the processor, config.json and README.md go"})
    text_processor: str | None = field(
        default=None, metadata={"help": "the processor whose text BPE is kept (default: the bundled tiny model's)"}
    )
    base_config: str | None = field(
        default=None, metadata={"help": "a Cm3LeonConfig directory for the architecture (default: cm3leon-tiny)"}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "the context, when the base config's is too short for this tokenizer"}
    )
    resolution: int | None = field(default=None, metadata={"help": "Emu3's image side (its VQ has none of its own)"})
    revision: str | None = field(default=None, metadata={"help": "the Hub revision of --image_tokenizer"})
    remote_code: bool = field(
        default=True, metadata={"help": "save the processor's code with it (--no_remote_code leaves it out)"}
    )


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser(ConvertImageTokenizerArguments, description=__doc__.split("\n\n")[0], epilog=epilog)


def main(argv=None) -> dict:
    parser = make_parser()
    try:
        args = parser.parse_args_and_config(argv)[0]
    except ValueError as error:  # a recipe key that is no flag
        parser.error(str(error))
    from cm3leon_hf.convert_image_tokenizer import convert_image_tokenizer

    config = convert_image_tokenizer(
        args.image_tokenizer, args.output_dir, text_processor=args.text_processor, base_config=args.base_config,
        max_position_embeddings=args.max_position_embeddings, resolution=args.resolution,
        remote_code=args.remote_code, **({"revision": args.revision} if args.revision else {}),
    )
    summary = {"output_dir": str(Path(args.output_dir)), **{key: getattr(config, key) for key in (
        "image_vocab_size", "image_seq_length", "text_vocab_size", "vocab_size", "max_position_embeddings")}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
