"""Bundle a trained text tokenizer and VQ image tokenizer into a `Cm3LeonProcessor` for a model config.

The processor's vocabulary layout (`text_vocab_size`, `image_token_offset`) is taken from the config, and the result
is checked against it (`validate_model_config`) before it is saved.

Commands:

```bash
# The shipped tiny processor (after train_text_tokenizer.py and train_image_tokenizer.py):
python training/build_processor.py --model-config hub_configs/cm3leon-tiny \
    --text-tokenizer runs/text_tokenizer_tiny --image-tokenizer runs/image_tokenizer_tiny/image_tokenizer \
    --output-dir src/cm3leon_hf/pretrained/cm3leon-tiny --no-remote-code
```

By default the saved directory carries the processor's code and an `auto_map` (`trust_remote_code=True` loading from
the Hub without our package). `--no-remote-code` leaves them out: the copy shipped inside the package is loaded by the
package itself, and a second copy of its code there could only go stale.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-config", type=Path, required=True, help="Directory of a Cm3LeonConfig (config.json).")
    parser.add_argument("--text-tokenizer", type=Path, required=True, help="Output of train_text_tokenizer.py.")
    parser.add_argument("--image-tokenizer", type=Path, required=True, help="A saved Cm3LeonImageTokenizer.")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--remote-code",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Save the processor's code and `auto_map` with it (default), for loading without this package.",
    )
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
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
    processor.save_pretrained(args.output_dir)
    size = sum(p.stat().st_size for p in args.output_dir.rglob("*") if p.is_file())
    summary = {"output_dir": str(args.output_dir), "bytes": size, "image_seq_length": processor.image_seq_length}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
