"""Every SFT task of the synthetic world, scored by the world's exact evaluator (no hand judgement): a pretrained model
prompted zero-shot against the same model after instruction tuning (`training/sft.py`), on rows of the test split.

Each task is prompted as `cm3leon_hf.sft_data.format_example` writes its training documents (the prompt part) and
decoded as the paper does for it:

  text_to_image  "{caption} <break>" -> an image; the model's saved decoding (its generation config: CFG, top-p)
                 scene accuracy: every stated attribute, the count and the background right (`evaluator.score`)
  spatial        the boxes prompt -> an image, CFG 3 (CL §4.1), scene accuracy against the row's scene
  structure      edge / segmentation map + caption -> an image, CFG 3 (CL §4.1), scene accuracy
  edit           source image + instruction -> an image, instruct-CFG (text 7.5, image 1.5, CL §4.1); success: the
                 edited image reads back as the target scene (the stated change made, nothing else changed)
  infill         the masked image -> the whole image, CFG 3; success: the restored image reads back as the scene
  caption        "<mask:0> <break> image <mask:0>" -> text to <eoss>, greedy; accuracy: the caption parses
                 (`parse_caption`) and everything it states holds in the image's scene, with every object described
  vqa            the question with the answer masked -> text to <eoss>, greedy; exact match

Beside each task's accuracy, partial credit: the mean of the evaluator's per-attribute scores (shape, colour, size,
position of the matched objects, background, object count) where it applies; for captions the scene's attributes as
read from the caption.

Images are sampled with top-p 0.8 and one seed per row, the same for every model.

    python bench/sft.py --models src/cm3leon_hf/pretrained/cm3leon-tiny outputs/sft/tiny --rows 50 \\
        --output bench/sft.json
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

IMAGE_TASKS = {"text_to_image": None, "spatial": 3.0, "structure": 3.0, "infill": 3.0, "edit": 7.5}
EDIT_IMAGE_GUIDANCE = 1.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="saved CM3Leon directories (or base+adapter)")
    parser.add_argument("--rows", type=int, default=50, help="rows of each task's test split")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scales", nargs="+", default=[], metavar="TASK=SCALE[,IMAGE_SCALE]",
                        help="other guidance than the paper's, e.g. edit=3,1.5 structure=1.25 (1: no guidance)")
    parser.add_argument("--output", help="write the rows as JSON here")
    return parser.parse_args(argv)


def load(path: str):
    """A saved model, or a PEFT adapter directory (its base from `adapter_config.json`), merged."""
    from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor

    if (Path(path) / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(Cm3LeonForCausalLM.from_pretrained(base), path).merge_and_unload()
    else:
        model = Cm3LeonForCausalLM.from_pretrained(path)
    processor = Cm3LeonProcessor.from_pretrained(path)
    processor.validate_model_config(model.config)
    return model.eval(), processor


def image_of(model, processor, task: str, prompt: str, images: list, row: dict, seed: int):
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    sampling = {"do_sample": True, "top_p": 0.8, "top_k": 0, "generator": generator, "generate_image": True,
                "max_new_tokens": config.image_seq_length}
    if task == "edit":
        streams = processor.encode_prompt(row["instruction"], image=images[0])
        out = model.generate(**streams, guidance_scale=IMAGE_TASKS["edit"], image_guidance_scale=EDIT_IMAGE_GUIDANCE,
                             **sampling)
    else:
        ids = processor(prompt, images=images or None, return_tensors="pt")
        unconditional = processor.encode_prompt("unused")  # <eos> <mask:0> <break>: CFG's stream
        guidance = {} if IMAGE_TASKS[task] is None else {
            "guidance_scale": IMAGE_TASKS[task], "uncond_input_ids": unconditional["uncond_input_ids"],
            "uncond_attention_mask": unconditional["uncond_attention_mask"]}
        out = model.generate(**ids, **guidance, **sampling)
    return processor.decode_image_tokens(out[0, -config.image_seq_length:])[0]


def text_of(model, processor, prompt: str, images: list) -> str:
    ids = processor(prompt, images=images, return_tensors="pt")
    layout = processor.layout
    out = model.generate(**ids, do_sample=False, max_new_tokens=96, eos_token_id=[layout.eoss_token_id, layout.eos_token_id])
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    text = [s for s in processor.decode(new, skip_special_tokens=True, incomplete_images="codes") if isinstance(s, str)]
    return " ".join(text).strip()


PARTS = ("shape", "color", "size", "position", "background", "count")


def agreement(scores: dict) -> float:
    """The mean of `compare_scenes`'s per-attribute scores (shape, colour, size, position, background, object count)
    that apply: partial credit, where `scene_correct` gives none."""
    parts = [scores[k] for k in PARTS if scores[k] is not None]
    return sum(parts) / len(parts)


def score_row(model, processor, task: str, row: dict, index: int, seed: int) -> tuple[bool, float]:
    """(right, partial credit) of the model's output for one row (`score_output`)."""
    from cm3leon_hf.sft_data import format_example

    prompt, completion, images = format_example(task, row, index=index)
    if task in IMAGE_TASKS:
        return score_output(task, row, image_of(model, processor, task, prompt, images[:-1], row, seed))
    return score_output(task, row, text_of(model, processor, prompt, images))


def score_output(task: str, row: dict, output) -> tuple[bool, float]:
    """(right, partial credit) of an output for one row: for an image task the image, read back by the evaluator
    against what the prompt states (`scene_correct`, and `agreement`); for a caption the text, parsed back into a
    scene (right: everything it states holds and it describes every object; partial: the scene's attributes as read
    from the caption); for VQA the answer, exact match (1.0 / 0.0)."""
    from cm3leon_hf.synthetic.evaluator import compare_scenes, read_scene
    from cm3leon_hf.synthetic.parsing import parse_caption
    from cm3leon_hf.synthetic.scene import Scene

    scene = Scene.from_json(row["scene"])
    if task in IMAGE_TASKS:
        target = parse_caption(row["caption"]) if task == "text_to_image" else scene  # what the prompt states
        scores = compare_scenes(read_scene(output), target)
        return bool(scores["scene_correct"]), agreement(scores)
    if task == "vqa":
        right = output.rstrip(".").strip() == row["answer"]
        return right, float(right)
    try:
        stated = parse_caption(output)
    except ValueError:
        return False, 0.0
    right = bool(stated.objects) and bool(compare_scenes(scene, stated)["scene_correct"]) and \
        len(stated.objects) == len(scene.objects)
    return right, agreement(compare_scenes(stated, scene))


def main(argv=None):
    global EDIT_IMAGE_GUIDANCE
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for item in args.scales:  # the paper's scales are the defaults; the tiny model may want others (chosen on validation)
        task, _, values = item.partition("=")
        if task not in IMAGE_TASKS or task == "text_to_image" or not values:
            raise SystemExit(f"--scales {item!r}: expected TASK=SCALE[,IMAGE_SCALE] for one of "
                             f"{[t for t in IMAGE_TASKS if t != 'text_to_image']}")
        scale, _, image_scale = values.partition(",")
        IMAGE_TASKS[task] = float(scale)
        if image_scale:
            if task != "edit":
                raise SystemExit(f"--scales {item!r}: only edit takes an image scale")
            EDIT_IMAGE_GUIDANCE = float(image_scale)
    from cm3leon_hf.synthetic import TASKS, build_task

    tasks = args.tasks or list(TASKS)
    sizes = {f"num_{s}": args.rows if s == args.split else 0 for s in ("train", "validation", "test", "heldout")}
    data = {t: build_task(t, **sizes)[args.split] for t in tasks}
    results = []
    for path in args.models:
        model, processor = load(path)
        started = time.perf_counter()
        row_out = {"model": path}
        for task in tasks:
            scored = [score_row(model, processor, task, data[task][i], i, args.seed * 100_003 + i)
                      for i in tqdm(range(len(data[task])), desc=f"{Path(path).name} {task}", leave=False)]
            row_out[task] = sum(right for right, _ in scored) / len(scored)
            row_out[f"{task}_partial"] = round(sum(partial for _, partial in scored) / len(scored), 4)
        row_out["minutes"] = round((time.perf_counter() - started) / 60, 1)
        results.append(row_out)
        print(json.dumps(row_out), flush=True)
    print(f"\n{args.rows} {args.split} rows per task; {platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); guidance {IMAGE_TASKS}, edit image scale {EDIT_IMAGE_GUIDANCE}")
    print("| model | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for r in results:
        print(f"| {r['model']} | " + " | ".join(f"{r[t]:.2f}" for t in tasks) + " |")
    print("\nPartial credit (the mean of the evaluator's per-attribute scores; VQA: exact match):")
    for r in results:
        print(f"| {r['model']} | " + " | ".join(f"{r[t + '_partial']:.2f}" for t in tasks) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": args.rows, "split": args.split, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
