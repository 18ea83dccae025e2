"""Score VQ image tokenizers on the synthetic world: what the exact evaluator reads back from their reconstructions.

PSNR stops predicting what matters here above ~34 dB (bench/RESULTS.md): one pixel too many on an 11-pixel circle
makes it a diamond. So tokenizers for this world are chosen on the evaluator's reading of reconstructed scenes of the
`validation` split (the `test` split is for `tests/test_image_tokenizer_quality.py` only). For each tokenizer this
prints one JSON line: PSNR, the fraction of scenes read back exactly (`scene_correct`), per attribute and by number of
objects, and, with `--context`, how often an object of a three-object scene is misread there and when drawn alone
(the gap is what a region's codes owe to the rest of the image: bench/RESULTS.md, "Where the limit was"). The
library is `cm3leon_hf.image_tokenizer_evaluation`.

Commands:

```bash
# The shipped VQ:
python training/evaluate_image_tokenizer.py src/cm3leon_hf/pretrained/cm3leon-tiny/image_tokenizer --context
# Every checkpoint of a run (each `checkpoint-<step>/vq` is a diffusers VQModel directory):
python training/evaluate_image_tokenizer.py runs/vq/checkpoint-*/vq --num_scenes 1000
```

The tokenizers are positional; every other flag is a dataclass field parsed with `trl.TrlParser` (`--config FILE.yaml`
supplies any of them, and each takes dashes or underscores: `--num-scenes` = `--num_scenes`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cm3leon_hf.image_tokenizer_evaluation import evaluate_freeform, evaluate_scenes, load_image_tokenizer
from cm3leon_hf.synthetic import SPLITS, Scene, make_row


@dataclass
class EvaluationArguments:
    """What is scored besides the scenes' reading, on how many scenes of which split."""

    split: str = field(default="validation", metadata={"help": f"The split of the scenes: {', '.join(SPLITS)}."})
    num_scenes: int = field(default=1000, metadata={"help": "Scenes of the text_to_image task, from index 0."})
    context: bool = field(default=False, metadata={"help": "Also read three-object scenes' objects drawn alone."})
    freeform: int = field(
        default=0,
        metadata={"help": "Also N free-form drawings (cm3leon_hf.synthetic.freeform, a seed no training run draws "
                          "from) and the three user drawings: PSNR, and the share of drawings at >= 28 dB."},
    )
    batch_size: int = field(default=100, metadata={"help": "Images per encode/decode call."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads."})

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("num_scenes", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.freeform < 0:
            raise ValueError(f"--freeform must be at least 0, got {self.freeform}")


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    parser = TrlParser(EvaluationArguments, description=__doc__.split("\n\n")[0], epilog=epilog)
    parser.add_argument("paths", type=Path, nargs="+", help="Cm3LeonImageTokenizer or diffusers VQModel directories.")
    return parser


def parse_args(argv=None) -> tuple[list[Path], EvaluationArguments]:
    """The tokenizers' paths and the arguments; a bad value exits with a message naming the flag."""
    parser = make_parser()
    try:
        args, positional = parser.parse_args_and_config(argv)
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))
    return positional.paths, args


def main(argv=None) -> list[dict]:
    paths, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [make_row("text_to_image", args.split, i) for i in tqdm(range(args.num_scenes), desc="scenes", leave=False)]
    scenes = [Scene.from_json(r["scene"]) for r in rows]
    images = [r["images"][0] for r in rows]
    results = []
    for path in paths:
        result = {"path": str(path), "split": args.split, "scenes": len(scenes)}
        image_tokenizer = load_image_tokenizer(path)
        result.update(evaluate_scenes(image_tokenizer, scenes, images, batch_size=args.batch_size,
                                      context=args.context))
        if args.freeform:
            result["freeform"] = evaluate_freeform(image_tokenizer, args.freeform, args.batch_size)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
