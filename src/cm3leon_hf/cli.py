"""The `cm3leon-hf` command line.

    cm3leon-hf generate "a red circle at the top left" -o out.png   # the image, from the bundled tiny model
    cm3leon-hf generate "a red circle" -n 4 -o out.png --grid        # 4 images in one captioned grid
    cm3leon-hf demo -o demo.png                                      # a captioned grid for a handful of prompts
    cm3leon-hf info cm3leon-7b                                      # vocabulary layout, sizes, parameter count
"""

import argparse
import sys
from pathlib import Path

# In the world's caption style; none holds a held-out (shape, colour) pair.
DEMO_PROMPTS = (
    "a large red circle at the top left on a white background",
    "a medium blue square in the center on a black background",
    "a small green star at the bottom right on a white background",
    "a large pink triangle at the top edge on a black background",
    "a medium cyan cross on the left and a large orange diamond on the right on a white background",
)


def info(args: argparse.Namespace) -> None:
    """Print a config's vocabulary layout and sizes, and count the parameters on the `meta` device (no memory)."""
    import torch

    from . import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM

    shipped = HUB_CONFIGS / args.path
    config = Cm3LeonConfig.from_pretrained(shipped if not Path(args.path).exists() and shipped.is_dir() else args.path)
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


def check_prompt(processor, prompt: str, allow_unknown_words: bool = False) -> None:
    """Refuse an empty prompt, and one with words the model never learned (`Cm3LeonProcessor.unknown_words`: the
    byte-level BPE encodes any text, and a word it never saw falls apart into pieces that the model draws as noise),
    unless `allow_unknown_words`. Case does not matter: the processor folds it."""
    if not prompt.strip():
        raise SystemExit("error: the prompt is empty.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
        bad = prompt[error.start]
        what = f"the byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise SystemExit(f"error: the prompt is not UTF-8 text: {what} at character {error.start}. Write it in UTF-8 "
                         "(a terminal or file in another encoding passes other bytes).") from None
    unknown = processor.unknown_words(prompt)
    if unknown and not allow_unknown_words:
        raise SystemExit(
            f"error: the model never learned the words {unknown} of {prompt!r}, so it cannot draw them. The bundled "
            f"tiny model knows the synthetic world's words, e.g. {DEMO_PROMPTS[0]!r}. Pass --allow-unknown-words to "
            f"generate anyway."
        )


def check_output(output: Path, images: int) -> list[Path]:
    """The files `output` names for `images` images (itself for one; `out-0.png`, `out-1.png`… for several),
    checked before anything is generated: a PNG/JPEG/... suffix PIL writes, not a directory, and a folder that exists
    or can be created, writable."""
    import os

    from PIL import Image

    Image.init()
    if output.is_dir():
        raise SystemExit(f"error: -o {output} is a directory; give a file name such as {output / 'out.png'}.")
    if output.suffix.lower() not in Image.EXTENSION:
        raise SystemExit(f"error: -o {output}: give an image file name with a suffix such as .png (got "
                         f"{output.suffix or 'none'}).")
    paths = [output] if images == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(images)]
    for path in paths:
        if path.is_dir():
            raise SystemExit(f"error: -o {path} is a directory; give a file name such as {path / 'out.png'}.")
    folder = output.parent
    while not folder.exists():  # the nearest existing folder must let us create the rest
        folder = folder.parent
    if not folder.is_dir():
        raise SystemExit(f"error: -o {output}: {folder} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"error: -o {output}: the folder {folder} is not writable.")
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK):
            raise SystemExit(f"error: -o {path} exists and is not writable.")
    return paths


# Images generated in one batch when nothing is re-ranked: `-n 1000` writes its files 16 at a time, never holding
# more (re-ranking needs all of a prompt's candidates at once: at most MAX_CANDIDATES).
CHUNK = 16
MAX_CANDIDATES = 1024
MAX_GRID_IMAGES = 64


def check_counts(args: argparse.Namespace) -> None:
    """Refuse image counts that cannot do what they say, before anything loads: fewer candidates than images (the
    best `-n` of `--num-candidates`), more candidates than one batch should hold, a grid too wide to look at."""
    candidates = args.num_candidates or args.num_images
    if candidates < args.num_images:
        raise SystemExit(f"error: --num-candidates ({candidates}) must be at least -n/--num-images "
                         f"({args.num_images}): the best {args.num_images} of the candidates are kept.")
    if (candidates > args.num_images or args.rerank) and candidates > MAX_CANDIDATES:
        raise SystemExit(f"error: re-ranking generates all {candidates} candidates of a prompt as one batch; at most "
                         f"{MAX_CANDIDATES}. Without re-ranking (no --rerank, --num-candidates at most -n), -n has no "
                         f"limit: images are written {CHUNK} at a time.")
    if getattr(args, "grid", False) and args.num_images > MAX_GRID_IMAGES:
        raise SystemExit(f"error: --grid puts all images in one row: at most {MAX_GRID_IMAGES}, got -n "
                         f"{args.num_images}. Without --grid each image is its own file.")


def caption_grid(rows: list[tuple[str, list]], cell: int = 128):
    """One captioned row of images per prompt: `rows` is `[(prompt, [PIL images]), ...]`; images are scaled to `cell`
    pixels with nearest-neighbour resampling, so that the model's pixels stay sharp."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    band, pad = 22, 4
    columns = max(len(images) for _, images in rows)
    text_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(prompt, font=font)) for prompt, _ in rows)
    width = max(columns * (cell + pad) + pad, text_width + 2 * pad)
    # A grey page, so that white and black images both show their edges.
    grid = Image.new("RGB", (width, len(rows) * (band + cell + pad) + pad), (200, 200, 200))
    draw = ImageDraw.Draw(grid)
    y = pad
    for prompt, images in rows:
        draw.text((pad, y + 2), prompt, fill="black", font=font)
        y += band
        for i, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (pad + i * (cell + pad), y))
        y += cell + pad
    return grid


def _reranker(args: argparse.Namespace):
    """The world's CLIP, loaded once per command (None when no re-ranking is asked)."""
    candidates = args.num_candidates or args.num_images
    if not (candidates > args.num_images or args.rerank):
        return None
    from sentence_transformers import SentenceTransformer

    from .pretrained import CLIP_PATH

    return SentenceTransformer(str(CLIP_PATH))


def _generation_kwargs(args: argparse.Namespace, seed_offset: int, reranker=None, retriever=None) -> dict:
    import torch

    kwargs = dict(
        guidance_scale=args.guidance_scale, decoding=args.decoding, top_p=args.top_p, temperature=args.temperature,
        num_images_per_prompt=args.num_images, progress_bar=not args.quiet,
        generator=torch.Generator().manual_seed((args.seed + seed_offset) % 2**64),
    )
    if reranker is not None:
        kwargs.update(num_candidates=args.num_candidates or args.num_images, reranker=reranker)
    if args.retrieve:
        kwargs.update(num_retrieved_docs=args.retrieve, retriever=retriever)
    return kwargs


def _retriever(args: argparse.Namespace):
    from sentence_transformers import SentenceTransformer

    from .memory_bank import Cm3LeonMemoryBank
    from .pretrained import CLIP_PATH
    from .retriever import Cm3LeonRetriever

    bank_dir = Path(args.memory_bank or Path(args.model) / "memory_bank")
    if not (bank_dir / "manifest.json").exists():
        raise SystemExit(f"error: --retrieve needs a memory bank; none at {bank_dir} (pass --memory-bank).")
    return Cm3LeonRetriever(Cm3LeonMemoryBank.load(bank_dir), SentenceTransformer(str(CLIP_PATH)), query_dropout=0.0)


def _pipeline(args: argparse.Namespace):
    import torch
    from transformers import pipeline

    from . import pipelines  # noqa: F401  (registers "text-to-image")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:  # transformers' "Loading weights" bars
        from transformers.utils import logging

        logging.disable_progress_bar()
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"error: {args.model} holds no model (config.json); pass --model a saved CM3Leon directory.")
    return pipeline("text-to-image", model=str(args.model))


def _write(image, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    print(f"wrote {output.resolve()}")


def generate(args: argparse.Namespace) -> None:
    """The images for one prompt: one file per image (`-o out.png`: `out.png` for one image, `out-0.png`… for
    several), or one captioned row with `--grid`."""
    check_counts(args)
    paths = check_output(args.output, 1 if args.grid else args.num_images)
    pipe = _pipeline(args)
    check_prompt(pipe.processor, args.prompt, args.allow_unknown_words)
    retriever = _retriever(args) if args.retrieve else None
    reranker = _reranker(args)
    kwargs = _generation_kwargs(args, 0, reranker, retriever)
    if args.grid or reranker is not None:  # all at once: one grid, or the best of all candidates
        images = [r["image"] for r in pipe(args.prompt, **kwargs)]
        if args.grid:
            _write(caption_grid([(args.prompt, images)]), args.output)
            return
        for image, path in zip(images, paths):
            _write(image, path)
        return
    # CHUNK images per batch, each written as soon as it is drawn; the generator carries on from batch to batch (up
    # to CHUNK images, one batch as before).
    for start in range(0, args.num_images, CHUNK):
        kwargs["num_images_per_prompt"] = min(CHUNK, args.num_images - start)
        for result, path in zip(pipe(args.prompt, **kwargs), paths[start:]):
            _write(result["image"], path)


def demo(args: argparse.Namespace) -> None:
    """A captioned grid: one row per prompt (`DEMO_PROMPTS`, or `--prompts`), then, without `--prompts`, one row per
    task of the instruction-tuned `--tasks-model` (`task_rows`). The CLIP re-ranker (and a retriever) load once for
    all prompts."""
    check_counts(args)
    check_output(args.output, 1)
    tasks = args.tasks_model is not None and not args.prompts
    if tasks and not (Path(args.tasks_model) / "config.json").exists():
        raise SystemExit(f"error: --tasks-model {args.tasks_model} holds no model (config.json); pass a saved "
                         "instruction-tuned CM3Leon, or --no-tasks.")
    pipe = _pipeline(args)
    prompts = args.prompts or list(DEMO_PROMPTS)
    for prompt in prompts:
        check_prompt(pipe.processor, prompt, args.allow_unknown_words)
    reranker = _reranker(args)
    retriever = _retriever(args) if args.retrieve else None
    rows = []
    for i, prompt in enumerate(prompts):
        if not args.quiet:
            print(f"[{i + 1}/{len(prompts)}] {prompt}", file=sys.stderr)
        rows.append((prompt, [r["image"] for r in pipe(prompt, **_generation_kwargs(args, i, reranker, retriever))]))
    if tasks:
        rows += task_rows(args.tasks_model, args.num_images, args.seed, args.quiet)
    _write(caption_grid(rows), args.output)


# The instruction-tuned model's tasks in the demo, one row each: (label, the world's task, its condition if any).
DEMO_TASKS = (
    ("boxes", "spatial", None),
    ("edge map", "structure", "edge"),
    ("segmentation map", "structure", "segmentation"),
    ("edit", "edit", None),
    ("infill", "infill", None),
    ("caption", "caption", None),
    ("question", "vqa", None),
)


def _task_example(task: str, condition: str | None) -> dict:
    """The first row of the world's `test` split for `task` (with that `condition`, for structure maps)."""
    from .synthetic import make_row

    for index in range(100):
        row = make_row(task, "test", index)
        if condition is None or row["condition"] == condition:
            return row
    raise RuntimeError(f"no {condition} row among the first 100 of {task}")  # the world draws both conditions


def task_rows(model: str | Path, num_images: int = 4, seed: int = 0, quiet: bool = False) -> list[tuple[str, list]]:
    """One captioned row per task of an instruction-tuned model (`DEMO_TASKS`, on the world's `test` rows), each
    through the pipeline a user would call, with the model's decoding for it: boxes with `text-to-image` and the saved
    CFG; edge and segmentation maps, edits and infilling with `image-text-to-image`'s `task=` presets (the model's
    saved scales for them, else the paper's); captions and answers with transformers' `image-text-to-text` (greedy,
    to `<eoss>`). A row is `(text, [input image, outputs...])`; the
    text of a caption or an answer is the model's."""
    import torch
    from transformers import pipeline

    from . import pipelines  # noqa: F401  (registers the pipelines)
    from .sft_data import format_messages
    from .synthetic.tasks import box_text

    loaded = {}

    def pipe(kind: str):  # each pipeline loads the model once for all its rows
        if kind not in loaded:
            loaded[kind] = pipeline(kind, model=str(model))
        return loaded[kind]

    rows = []
    for i, (label, task, condition) in enumerate(DEMO_TASKS):
        if not quiet:
            print(f"[task {i + 1}/{len(DEMO_TASKS)}] {label}", file=sys.stderr)
        row = _task_example(task, condition)
        generator = torch.Generator().manual_seed((seed + 1000 + i) % 2**64)
        common = dict(num_images_per_prompt=num_images, generator=generator, progress_bar=not quiet)
        if task == "spatial":
            user = format_messages(task, row)["messages"][0]["content"][0]["text"]
            drawn = pipe("text-to-image")(user, **common)  # the model's saved CFG
            rows.append((f"{label}: {user}", [r["image"] for r in drawn]))
        elif task in ("structure", "edit", "infill"):
            preset = condition or task
            prompt = row["instruction"] if task == "edit" else row["caption"] if task == "structure" else \
                box_text(row["region"])
            drawn = pipe("image-text-to-image")(row["images"][0], prompt=prompt, task=preset, **common)
            rows.append((f"{label}: {prompt}", [row["images"][0], *(r["image"] for r in drawn)]))
        else:
            turn = format_messages(task, row)["messages"][0]
            content = [{"type": "image", "image": row["images"][0]} if part["type"] == "image" else part
                       for part in turn["content"]]
            out = pipe("image-text-to-text")(
                text=[{"role": "user", "content": content}], max_new_tokens=96, return_full_text=False,
                generate_kwargs={"do_sample": False})
            question = row["question"] + " " if task == "vqa" else ""
            rows.append((f"{label}: {question}-> {out[0]['generated_text'].strip()}", [row["images"][0]]))
    return rows


def _bounded(kind, low, name: str, *, inclusive: bool = True, high=None):
    """An argparse type: `kind` (int/float) at least `low` (or above it), at most `high`, or a usage error naming it."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None
        if value != value or (value < low if inclusive else value <= low) or (high is not None and value > high):
            bound = f"{'at least' if inclusive else 'above'} {low}" + (f" and at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text}")
        return value

    return parse


def _checked(check, flag: str):
    """An argparse type from a library check (`check(value, name)` raising `ValueError`): a float that the library
    would refuse is a usage error naming the flag, with the library's own rule."""

    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        try:
            return check(value, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_generation_arguments(parser: argparse.ArgumentParser, num_images: int, decoding: str = "top-p",
                              num_candidates: int | None = None) -> None:
    from .logits_process import check_guidance_scale
    from .pretrained import TINY_PATH

    parser.add_argument("--model", default=str(TINY_PATH), help="a saved CM3Leon directory (default: the bundled tiny)")
    parser.add_argument("-n", "--num-images", type=_bounded(int, 1, "--num-images"), default=num_images, help="images per prompt")
    parser.add_argument("--seed", type=_bounded(int, 0, "--seed", high=2**64 - 1), default=0,
                        help="the sampling seed, 0 to 2**64 - 1 (the demo's prompt i draws with seed + i)")
    parser.add_argument("--guidance-scale", type=_checked(check_guidance_scale, "--guidance-scale"), default=None,
                        help="CFG scale (1: the conditional stream only; default: the model's saved guidance_scale)")
    parser.add_argument("--decoding", default=decoding, choices=["top-p", "temperature", "cd-k", "pooled"],
                        help=f"sampling strategy (pooled: the paper's ½ top-p + ½ CD-K candidates; default: {decoding})")
    parser.add_argument("--top-p", type=_bounded(float, 0, "--top-p", inclusive=False, high=1), default=None,
                        help="nucleus sampling's p (default: the model's saved top_p)")
    parser.add_argument("--temperature", type=_bounded(float, 0, "--temperature", inclusive=False), default=1.0)
    parser.add_argument("--num-candidates", type=_bounded(int, 1, "--num-candidates"), default=num_candidates,
                        help="generate this many per prompt and keep the best by the world's CLIP (the paper: 8; "
                        f"default: {num_candidates or '--num-images'})")
    parser.add_argument("--rerank", action="store_true", help="order the images by CLIP score")
    parser.add_argument("--retrieve", type=_bounded(int, 0, "--retrieve"), default=0, metavar="K",
                        help="put K documents retrieved from the model's memory bank in front of the prompt")
    parser.add_argument("--memory-bank", default=None, help="a memory bank directory (default: <model>/memory_bank)")
    parser.add_argument("--threads", type=_bounded(int, 1, "--threads"), default=1, help="torch threads (1 is fastest for the tiny model)")
    parser.add_argument("--allow-unknown-words", action="store_true",
                        help="generate even when the prompt has words the model never learned (they draw noise)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .pretrained import TINY_SFT_PATH

    parser = argparse.ArgumentParser(prog="cm3leon-hf", description="CM3Leon for the Hugging Face ecosystem.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate_parser = commands.add_parser(
        "generate", help="generate images for a prompt, one file per image",
        description="Images for a prompt, one file per image (-o out.png: out.png for one image, out-0.png, "
        "out-1.png... for several; --grid: one captioned grid). The default draws one sample per image with the "
        "model's saved decoding: 10 of 24 scenes right on the bundled tiny model, against 17 of 24 with the demo's "
        "re-ranked decoding (--decoding pooled --num-candidates 32: 32 samples per prompt instead of one per image, "
        "re-ranked by the world's CLIP): use it for the best images.")
    generate_parser.add_argument("prompt")
    generate_parser.add_argument("-o", "--output", type=Path, default=Path("cm3leon.png"),
                                 help="image file (default: cm3leon.png); with -n N, N files named after it")
    generate_parser.add_argument("--grid", action="store_true", help="write all images as one captioned grid to -o")
    _add_generation_arguments(generate_parser, num_images=1)
    generate_parser.set_defaults(func=generate)
    demo_parser = commands.add_parser(
        "demo", help="a captioned PNG grid of images for a handful of prompts",
        description="A captioned PNG grid, one row per prompt, drawn the way the paper draws its best images: 32 "
        "candidates per prompt from the pooled ½ top-p + ½ CD-K decoding with CFG, the world's CLIP keeps the 4 that "
        "match the prompt best (--decoding, --num-candidates and -n change it).")
    demo_parser.add_argument("-o", "--output", type=Path, default=Path("cm3leon-demo.png"))
    demo_parser.add_argument("--prompts", nargs="+", help="instead of the built-in prompts (and no task rows)")
    demo_parser.add_argument(
        "--tasks-model", default=str(TINY_SFT_PATH) if TINY_SFT_PATH.exists() else None,
        help="an instruction-tuned CM3Leon: one more row per task (boxes, edge and segmentation maps, edit, infill, "
             "caption, question), each from a test example of the synthetic world (default: the bundled "
             "cm3leon-tiny-sft)")
    demo_parser.add_argument("--no-tasks", dest="tasks_model", action="store_const", const=None,
                             help="only the text-to-image rows")
    _add_generation_arguments(demo_parser, num_images=4, decoding="pooled", num_candidates=32)
    demo_parser.set_defaults(func=demo)
    info_parser = commands.add_parser("info", help="describe a config or saved model directory")
    info_parser.add_argument("path", help="a directory with a config.json, or the name of a shipped configuration (cm3leon-tiny, -350m, -760m, -7b)")
    info_parser.set_defaults(func=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
