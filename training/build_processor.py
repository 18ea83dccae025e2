"""Bundle a trained text tokenizer and VQ image tokenizer into a `Cm3LeonProcessor` for a model config.

The processor's vocabulary layout (`text_vocab_size`, `image_token_offset`) is taken from the config, and the result
is checked against it (`validate_model_config`) before it is saved.

Commands:

```bash
# The shipped tiny processor (after train_text_tokenizer.py and train_image_tokenizer.py):
python training/build_processor.py --model_config hub_configs/cm3leon-tiny \
    --text_tokenizer runs/text_tokenizer_tiny --image_tokenizer runs/image_tokenizer_tiny/image_tokenizer \
    --output_dir src/cm3leon_hf/pretrained/cm3leon-tiny --no_remote_code
```

By default the saved directory carries the processor's code and an `auto_map` (`trust_remote_code=True` loading from
the Hub without our package). `--no_remote_code` leaves them out: the copy shipped inside the package is loaded by the
package itself, and a second copy of its code there could only go stale.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor


@dataclass
class BuildProcessorArguments:
    """The parts, the config whose vocabulary layout they take, and where the processor goes."""

    model_config: str = field(metadata={"help": "Directory of a Cm3LeonConfig (config.json)."})
    text_tokenizer: str = field(metadata={"help": "Output of train_text_tokenizer.py."})
    image_tokenizer: str = field(metadata={"help": "A saved Cm3LeonImageTokenizer."})
    output_dir: str = field(metadata={"help": "Where the processor is saved."})
    remote_code: bool = field(
        default=True,
        metadata={"help": "Save the processor's code and `auto_map` with it (default), for loading without this "
                          "package; --no_remote_code leaves them out."},
    )


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser(BuildProcessorArguments, description=__doc__.split("\n\n")[0], epilog=epilog)


def parse_args(argv=None) -> BuildProcessorArguments:
    """The arguments; a bad value exits with a message naming the flag."""
    parser = make_parser()
    try:
        return parser.parse_args_and_config(argv)[0]
    except ValueError as error:  # a recipe key that is no flag
        parser.error(str(error))


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = Cm3LeonConfig.from_pretrained(args.model_config)
    processor = Cm3LeonProcessor(
        tokenizer=AutoTokenizer.from_pretrained(args.text_tokenizer),
        image_tokenizer=Cm3LeonImageTokenizer.from_pretrained(args.image_tokenizer),
        text_vocab_size=config.text_vocab_size,
        image_token_offset=config.image_token_offset,
    )
    processor.validate_model_config(config)
    if not args.remote_code:
        processor._auto_class = None  # this instance only: no code copies, no auto_map
    output_dir = Path(args.output_dir)
    processor.save_pretrained(output_dir)
    size = sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file())
    summary = {"output_dir": str(output_dir), "bytes": size, "image_seq_length": processor.image_seq_length}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
