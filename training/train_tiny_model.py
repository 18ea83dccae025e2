"""The bundled tiny model, end to end: synthetic world → memory bank → pre-tokenized data with retrieved documents →
retrieval-augmented CM3 pretraining. One command; every stage resumes after a stop.

Commands:

```bash
# Reproduce the bundled model (hours on one CPU thread; on a GPU, append `-- --use_cpu false`)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/train_tiny_model.py --config training/recipes/tiny_model.yaml

# Stopped? Run the same command again. Two free cores: --nproc 2 (the same global batch over two processes).
# Bundle an intermediate checkpoint of the run instead of its end:
... --config training/recipes/tiny_model.yaml --bundle_checkpoint outputs/tiny-model/pretrain/checkpoint-4000
# The same recipe without retrieved documents, for the retrieval ablation (same data and steps, its own directory):
... --config training/recipes/tiny_model.yaml --no_retrieval
# Train the bundled model further: the recipe's `continuations` (or --continuations '[{"max_steps": 4000, ...}]') are
# stages that each start from the previous one's weights with a new LR schedule. The bundle is bit for bit the result
# of the stages before the last, so --start_from trains only the last one:
... --config training/recipes/tiny_model.yaml --start_from src/cm3leon_hf/pretrained/cm3leon-tiny
# Only the instruction-tuned model (the recipe's `sft` stages), from the bundled pretrained one:
... --config training/recipes/tiny_model.yaml --sft_only
```

Stages (each a script of `training/`, run as a subprocess with this interpreter; a stage whose output is complete is
skipped, an unfinished one resumes):

1. `build_memory_bank.py`: the world's CLIP embeddings of `train_rows` text-to-image pairs, faiss index.
2. `pretokenize.py`: the same pairs as ids (`text <break> image`), each with `num_retrieved_docs` documents retrieved
   from that bank; and `validation_rows` validation pairs without.
3. `pretrain.py --config <pretrain_config>` with `pretrain_overrides` and the data above; resumes from its last
   complete checkpoint.
3b. each of the recipe's `continuations`: `pretrain.py` again from the previous stage's final weights
   (`--model_name_or_path`), with the stage's flags over the pretraining ones, into `pretrain-continued-<k>/`. A warm
   restart (new optimiser, new warm-up and decay) is what one session can run: each stage ends on a decayed LR, so
   every stage's end is a model worth bundling.
4. bundle (not for `--no_retrieval`): the trained model (`config.json`, `model.safetensors`, `generation_config.json`)
   into `bundle_dir` beside the processor it was trained with, and a memory bank of the first `bundle_bank_rows`
   training pairs into `bundle_dir/memory_bank` (`cm3leon-hf generate --retrieve K` reads it).
5. the recipe's `sft` stages (when it has them): `pretokenize_sft.py` (the world's tasks), `sft.py` (TRL's
   `SFTTrainer`) from the bundle just written, and the instruction-tuned model bundled into the stage's own
   `bundle_dir` (`src/cm3leon_hf/pretrained/cm3leon-tiny-sft`) with its processor and model card.

Outputs under `output_root`: `bank/`, `pretokenized/{train-rag,validation}/`, `pretrain/` (or `pretrain-no-retrieval/`,
whose samples hold no retrieved documents), `pretrain-continued-<k>/`, `sft/{train,validation,model}/`.

Flags are dataclass fields parsed with `trl.TrlParser`: the recipe's keys (`TinyModelRecipe`, from `--config`) and the
run's options (`TinyModelArguments`); each takes dashes or underscores (`--no-retrieval` = `--no_retrieval`).
"""

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class TinyModelRecipe:
    """The end-to-end recipe (`--config training/recipes/tiny_model.yaml`); each key is also a flag."""

    output_root: str = field(metadata={"help": "where the stages write (relative: to the repository)"})
    train_rows: int = field(metadata={"help": "text-to-image pairs of the train split: the bank and the training data"})
    validation_rows: int = field(metadata={"help": "validation pairs, pre-tokenized without retrieval"})
    num_retrieved_docs: int = field(metadata={"help": "documents retrieved per training pair"})
    pretrain_config: str = field(metadata={"help": "the pretraining recipe (training/recipes/pretrain_tiny.yaml)"})
    pretrain_overrides: dict | str | None = field(
        default=None,
        metadata={"help": "pretrain.py flags over pretrain_config's (a mapping; JSON on the command line)"},
    )
    bundle_dir: str = field(
        default="src/cm3leon_hf/pretrained/cm3leon-tiny", metadata={"help": "where the model is bundled"}
    )
    bundle_bank_rows: int = field(default=3000, metadata={"help": "pairs in the bundle's memory bank"})
    model_description: str | None = field(
        default=None, metadata={"help": "a Markdown file of the repository: the model card's description"}
    )
    limitations: str | None = field(default=None, metadata={"help": "the model card's limitations"})
    generation: dict | str | None = field(
        default=None, metadata={"help": "decoding defaults of the bundle's generation config (a mapping; JSON)"}
    )
    continuations: list | str | None = field(
        default=None,
        metadata={"help": "stages after pretraining (a list of mappings; JSON): each trains the previous stage's final "
                          "weights again with these pretrain.py flags over pretrain_config + pretrain_overrides (a new "
                          "optimiser and LR schedule, a warm restart), in pretrain-continued-<k>/; the last is bundled"},
    )

    sft: dict | str | None = field(
        default=None,
        metadata={"help": "the instruction-tuned model's stages after the bundle (a mapping; JSON): `config` (an "
                          "sft.py recipe), `train_rows` and `validation_rows` (the world's rows per task), "
                          "`overrides` (sft.py flags over `config`'s), `bundle_dir`, and for its card "
                          "`model_description` and `limitations`; optional `generation` (decoding defaults)"},
    )

    def __post_init__(self):
        for key in ("pretrain_overrides", "generation", "continuations", "sft"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, json.loads(getattr(self, key)))
        if self.continuations is not None and (
            not isinstance(self.continuations, list) or not all(isinstance(c, dict) for c in self.continuations)
        ):
            raise ValueError(f"--continuations must be a list of mappings of pretrain.py flags, got {self.continuations!r}")
        for key in ("train_rows", "validation_rows"):
            check_positive(getattr(self, key), f"--{key}")
        if self.sft is not None:
            if not isinstance(self.sft, dict):
                raise ValueError(f"--sft must be a mapping, got {self.sft!r}")
            missing = [k for k in SFT_REQUIRED if k not in self.sft]
            unknown = sorted(set(self.sft) - set(SFT_REQUIRED) - set(SFT_OPTIONAL))
            if missing or unknown:
                raise ValueError(f"--sft: missing keys {missing}, unknown keys {unknown} (it takes "
                                 f"{', '.join(SFT_REQUIRED + SFT_OPTIONAL)})")
            for key in ("train_rows", "validation_rows"):
                check_positive(self.sft[key], f"--sft's {key}")


SFT_REQUIRED = ("config", "train_rows", "validation_rows", "bundle_dir")
SFT_OPTIONAL = ("overrides", "model_description", "limitations", "generation")


def check_positive(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class TinyModelArguments:
    """Which stages run, and how."""

    no_retrieval: bool = field(default=False, metadata={"help": "train without retrieved documents (the ablation)"})
    stop_after: Literal["bank", "pretokenize", "pretrain", "bundle"] | None = field(
        default=None, metadata={"help": "run the stages up to this one (`bundle`: not the recipe's `sft` stages)"}
    )
    sft_only: bool = field(
        default=False,
        metadata={"help": "run only the recipe's `sft` stages: instruction-tune the bundled pretrained model "
                          "(bundle_dir, bit for bit the pretraining stages' result) and bundle the result"},
    )
    nproc: int = field(
        default=1,
        metadata={"help": "pretrain with this many processes (torchrun, gloo on CPU), each a share of the same global "
                          "batch: the same training, faster where there are cores to spare"},
    )
    bundle_checkpoint: str | None = field(
        default=None,
        metadata={"help": "bundle this checkpoint of the run (e.g. outputs/tiny-model/pretrain/checkpoint-4000) "
                          "instead of training to the end: an intermediate model, reproduced by running the recipe to "
                          "that step (checkpoints resume exactly)"},
    )
    start_from: str | None = field(
        default=None,
        metadata={"help": "weights taken as the result of every stage before the last continuation (e.g. the bundled "
                          "model, which is bit for bit that result), so that only the last continuation trains"},
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})


def make_parser():
    from trl import TrlParser

    epilog = ("--config RECIPE.yaml  the recipe (training/recipes/tiny_model.yaml): any of these flags; flags given on "
              "the command line override it")
    parser = TrlParser((TinyModelRecipe, TinyModelArguments), description=__doc__.split("\n\n")[0], epilog=epilog)
    parser.add_argument("pretrain_args", nargs="*", help="more pretrain.py flags, after `--` (e.g. -- --max_steps 100)")
    return parser


def parse_args(argv=None) -> tuple[dict, TinyModelArguments, list[str]]:
    """The recipe (as a mapping), the run's arguments and the extra pretrain.py flags; a bad value exits with a
    message naming the flag (a recipe without its keys: the keys it lacks)."""
    parser = make_parser()
    try:
        recipe, args, extra = parser.parse_args_and_config(argv)
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))
    return asdict(recipe), args, extra.pretrain_args


def as_flags(options: dict | None) -> list[str]:
    """A mapping of a script's options as its command-line words: `{"max_steps": 10}` → `["--max_steps", "10"]`."""
    return [word for key, value in (options or {}).items() for word in (f"--{key}", str(value))]


def run(script: str, *args: str, launcher: list[str] = ()) -> None:
    command = [sys.executable, *launcher, str(HERE / script), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def is_complete(directory: Path) -> bool:
    return (directory / "manifest.json").exists()


MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "README.md")


def write_bundle(trained: Path, bundle_dir: Path, card: dict, generation: dict | None = None,
                 processor_from: Path | None = None) -> Path:
    """Write the trained model's files (`config.json`, `model.safetensors`, `generation_config.json` with `generation`'s
    decoding defaults, the model card `README.md` from `card`) into `bundle_dir`, with its processor (`trained`'s, or
    `processor_from`'s) when the bundle has none. The model's files replace the bundle's; its other files stay.
    Written as a whole (`cm3leon_hf.atomic.atomic_directory`): a stop leaves the old bundle or the new one, never a
    mix."""
    import shutil

    from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
    from cm3leon_hf.atomic import atomic_directory

    bundle_dir.mkdir(parents=True, exist_ok=True)
    model = Cm3LeonForCausalLM.from_pretrained(trained)
    processor = Cm3LeonProcessor.from_pretrained(processor_from or trained)
    processor.validate_model_config(model.config)
    for key, value in (generation or {}).items():  # `update` would skip keys it does not know
        setattr(model.generation_config, key, value)
    with atomic_directory(bundle_dir) as staging:  # the bundle's files that staging lacks are carried over
        # Named after the bundle, not the checkpoint it came from (whose path means nothing to a user).
        model.save_pretrained(staging, model_card_kwargs={**card, "repo_id": bundle_dir.name})
        if not (bundle_dir / "processor_config.json").exists():
            processor.save_pretrained(staging)
        for path in sorted(staging.iterdir()):
            # The package is the code: no stale copies of it inside the package. Of the rest, the bundle keeps its own.
            if path.name.endswith(".py") or (path.name not in MODEL_FILES and (bundle_dir / path.name).exists()):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    return bundle_dir


def card_text(recipe: dict, training_data: str) -> dict:
    """The model card's fields: the training data, and the recipe's description (a Markdown file of the repository:
    what the model is, its figures) and limitations when it has them."""
    card = {"training_data": training_data}
    if recipe.get("model_description"):
        card["model_description"] = (REPO / recipe["model_description"]).read_text().strip()
    if recipe.get("limitations"):
        card["limitations"] = recipe["limitations"].strip()
    return card


def bundle(trained: Path, bundle_dir: Path, recipe: dict, quiet: list[str], step: int | None = None) -> Path:
    """The pretrained model into `bundle_dir` (`write_bundle`, with the recipe's decoding defaults and a model card
    naming its training data), and a memory bank of `bundle_bank_rows` pairs into `bundle_dir/memory_bank` (its build
    resumes)."""
    training_data = (
        f"The synthetic world of `cm3leon_hf.synthetic`: {recipe['train_rows']:,} text-to-image pairs of its train "
        f"split, each with {recipe['num_retrieved_docs']} documents retrieved from a memory bank of the same pairs; "
        f"retrieval-augmented CM3 pretraining (`training/train_tiny_model.py --config training/recipes/tiny_model.yaml`)"
        + (f", its checkpoint at step {step:,} of {recipe_steps(recipe):,}."
           if step is not None and step != recipe_steps(recipe) else f", {recipe_steps(recipe):,} steps")
        + (f", then {len(continued)} continuation stage{'s' * (len(continued) > 1)} of "
           f"{' + '.join(f'{n:,}' for n in continued)} steps, each from the previous stage's weights with a new LR "
           "schedule." if (continued := continuation_steps(recipe)) and step is None else "." * (step is None))
    )
    write_bundle(trained, bundle_dir, card_text(recipe, training_data), recipe.get("generation"))
    bank = bundle_dir / "memory_bank"
    if not is_complete(bank):
        run("build_memory_bank.py", "--synthetic_task", "text_to_image", "--synthetic_rows",
            str(int(recipe.get("bundle_bank_rows", 3000))), "--output_dir", str(bank), *quiet)
    return bundle_dir


def pretrain_settings(recipe: dict) -> dict:
    """The pretraining recipe's settings with the end-to-end recipe's `pretrain_overrides` applied."""
    return {**(yaml.safe_load((REPO / recipe["pretrain_config"]).read_text()) or {}),
            **(recipe.get("pretrain_overrides") or {})}


def recipe_steps(recipe: dict) -> int:
    return int(pretrain_settings(recipe)["max_steps"])


def continuation_steps(recipe: dict) -> list[int]:
    """The steps of each continuation stage."""
    return [int({**pretrain_settings(recipe), **c}["max_steps"]) for c in recipe.get("continuations") or ()]


def checkpoint_step(checkpoint: Path) -> int:
    """The global step of a `Trainer` checkpoint directory (its `trainer_state.json`), with a clear error otherwise."""
    import json

    state = checkpoint / "trainer_state.json"
    if not (checkpoint / "model.safetensors").is_file() or not state.is_file():
        raise ValueError(f"{checkpoint} is not a complete training checkpoint (model.safetensors, trainer_state.json)")
    return int(json.loads(state.read_text())["global_step"])


def main(argv=None) -> Path:
    recipe, args, pretrain_args = parse_args(argv)
    root = Path(recipe["output_root"])
    if not root.is_absolute():
        root = REPO / root
    quiet = ["--no_progress"] if args.no_progress else []
    bundle_dir = Path(recipe["bundle_dir"])
    bundle_dir = bundle_dir if bundle_dir.is_absolute() else REPO / bundle_dir
    if args.bundle_checkpoint is not None:
        if args.no_retrieval:
            raise ValueError("--bundle_checkpoint bundles the retrieval-trained model; --no_retrieval is the ablation")
        checkpoint = Path(args.bundle_checkpoint)
        return bundle(checkpoint, bundle_dir, recipe, quiet, step=checkpoint_step(checkpoint))
    if args.sft_only:
        if not recipe.get("sft"):
            raise ValueError("--sft_only runs the recipe's `sft` stages; the recipe has none")
        if not (bundle_dir / "model.safetensors").is_file():
            raise ValueError(f"--sft_only starts from the bundled pretrained model, and {bundle_dir} holds none: run "
                             "the recipe without --sft_only first")
        return instruction_tune(recipe, root, bundle_dir, args, quiet)
    source = ["--synthetic_task", "text_to_image", "--synthetic_rows", str(recipe["train_rows"])]

    bank = root / "bank"
    if not is_complete(bank):
        run("build_memory_bank.py", *source, "--output_dir", str(bank), *quiet)
    if args.stop_after == "bank":
        return bank

    train = root / "pretokenized" / "train-rag"
    if not is_complete(train):
        run("pretokenize.py", *source, "--memory_bank", str(bank), "--num_retrieved_docs",
            str(recipe["num_retrieved_docs"]), "--output_dir", str(train), *quiet)
    validation = root / "pretokenized" / "validation"
    if not is_complete(validation):
        run("pretokenize.py", "--synthetic_task", "text_to_image", "--synthetic_split", "validation",
            "--synthetic_rows", str(recipe["validation_rows"]), "--output_dir", str(validation), *quiet)
    if args.stop_after == "pretokenize":
        return train

    docs = 0 if args.no_retrieval else recipe["num_retrieved_docs"]
    stages = pretraining_stages(recipe, root, args)
    for k, (output, overrides, start) in enumerate(stages):
        if k < len(stages) - 1 and args.start_from is not None:
            continue  # its result is --start_from
        pretrain(recipe, overrides, output, train, validation, docs, args, pretrain_args,
                 start=args.start_from if k == len(stages) - 1 and args.start_from is not None else start)
    output = stages[-1][0]
    if args.no_retrieval or args.stop_after == "pretrain":
        return output
    bundled = bundle(output, bundle_dir, recipe, quiet)
    if args.stop_after == "bundle" or not recipe.get("sft"):
        return bundled
    return instruction_tune(recipe, root, bundled, args, quiet)


def instruction_tune(recipe: dict, root: Path, start: Path, args: TinyModelArguments, quiet: list[str]) -> Path:
    """The recipe's `sft` stages, from the bundled pretrained model `start`: the world's tasks pre-tokenized
    (`pretokenize_sft.py`, `train_rows` per task, and `validation_rows`) into `sft/{train,validation}/`, multi-task
    SFT (`sft.py --config <config>` with `overrides`, resuming by itself) into `sft/model/`, and the result bundled
    into the stage's `bundle_dir` with its own model card (no memory bank: it is the pretrained bundle's)."""
    sft = recipe["sft"]
    data = root / "sft"
    train, validation, output = data / "train", data / "validation", data / "model"
    if not is_complete(train):
        run("pretokenize_sft.py", "--synthetic_rows", str(sft["train_rows"]), "--processor", str(start),
            "--output_dir", str(train), *quiet)
    if not is_complete(validation):
        run("pretokenize_sft.py", "--synthetic_rows", str(sft["validation_rows"]), "--split", "validation",
            "--processor", str(start), "--output_dir", str(validation), *quiet)
    flags = as_flags(sft.get("overrides"))
    run("sft.py", "--config", str(REPO / sft["config"]), "--model_name_or_path", str(start), "--train_data",
        str(train), "--eval_data", str(validation), "--output_dir", str(output), *flags,
        *(["--disable_tqdm", "true"] if args.no_progress else []))
    steps = int(json.loads((output / "trainer_state.json").read_text())["global_step"])
    training_data = (
        f"Instruction-tuned from `{start.name}` (the pretrained tiny model bundled beside it) on the synthetic world "
        f"of `cm3leon_hf.synthetic`: its {len(task_names())} tasks ({', '.join(task_names())}), "
        f"{int(sft['train_rows']):,} rows each, in the paper's templates (`cm3leon_hf.sft_data`); multi-task SFT with "
        f"TRL's `SFTTrainer` (`training/sft.py --config {sft['config']}`), {steps:,} steps "
        f"(`training/train_tiny_model.py --config training/recipes/tiny_model.yaml --sft_only`)."
    )
    bundle_dir = Path(sft["bundle_dir"])
    bundle_dir = bundle_dir if bundle_dir.is_absolute() else REPO / bundle_dir
    # The processor is the pretrained bundle's as it is now (SFT does not change it; a decoder-only VQ fine-tune
    # shipped in the bundle after the SFT run keeps every code, so the tuned model reads and writes the same ids).
    return write_bundle(output, bundle_dir, card_text(sft, training_data), sft.get("generation"), processor_from=start)


def task_names() -> list[str]:
    from cm3leon_hf.synthetic import TASKS

    return list(TASKS)


def pretraining_stages(recipe: dict, root: Path, args: TinyModelArguments) -> list[tuple[Path, dict, Path | None]]:
    """(output directory, pretrain.py flags over pretrain_config, weights to start from) of each pretraining stage: the
    recipe's pretraining, then each of its `continuations` from the previous stage's final weights."""
    base = dict(recipe.get("pretrain_overrides") or {})
    if args.no_retrieval:
        return [(root / "pretrain-no-retrieval", base, None)]
    stages = [(root / "pretrain", base, None)]
    # A continuation starts from weights, which have their shape: the base stage's --config_overrides is not theirs.
    inherited = {k: v for k, v in base.items() if k != "config_overrides"}
    for k, continuation in enumerate(recipe.get("continuations") or (), start=1):
        stages.append((root / f"pretrain-continued-{k}", {**inherited, **continuation}, stages[-1][0]))
    if args.start_from is not None and len(stages) == 1:
        raise ValueError("--start_from stands for the stages before the last continuation; the recipe has none")
    return stages


def pretrain(recipe: dict, overrides: dict, output: Path, train: Path, validation: Path, docs: int,
             args: TinyModelArguments, pretrain_args: list[str], start: Path | str | None = None) -> None:
    """One pretraining stage: training/pretrain.py (resuming by itself) with the recipe's flags, from `start`'s
    weights when given; with `--nproc`, the same global batch over that many processes."""
    settings = {**pretrain_settings(recipe), **overrides}
    flags = as_flags(overrides)
    if start is not None:
        flags += ["--model_name_or_path", str(start)]
    launcher = []
    if args.nproc > 1:
        batch = int(settings.get("per_device_train_batch_size", 8))
        if batch % args.nproc:
            raise ValueError(f"--nproc {args.nproc} does not divide the batch of {batch}")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
        flags += ["--per_device_train_batch_size", str(batch // args.nproc), "--ddp_backend", "gloo",
                  "--ddp_find_unused_parameters", "false"]  # every parameter is used: skip the extra graph walk
    run("pretrain.py", "--config", str(REPO / recipe["pretrain_config"]), "--train_data", str(train),
        "--eval_data", str(validation), "--output_dir", str(output), "--num_retrieved_docs", str(docs),
        *flags, *(["--disable_tqdm", "true"] if args.no_progress else []), *pretrain_args, launcher=launcher)

if __name__ == "__main__":
    main()
