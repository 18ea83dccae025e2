"""The paper's Table 1 and Fig. 4 in miniature: text-to-image quality of a trained CM3Leon on held-out prompts of the
synthetic world, per decoding strategy and number of retrieved documents, scored by the world's exact evaluator and
its CLIP.

For each condition it generates one image per prompt (the pooled strategy: 8 candidates, CLIP re-ranked, best kept)
and prints scene accuracy (every stated attribute right), per-attribute accuracy, CLIP score (image–caption cosine in
the world's CLIP), and the Fréchet distance between the CLIP image embeddings of the generated images and those of the
prompts' real renders (the world's FID; with a few hundred images it is biased upwards, so compare rows of one run,
not runs of different sizes). The reference in every run is plain sampling (no guidance) of the same model on the
same prompts, and every row prints its scene accuracy relative to that.

Conditions:
  plain         sampling from the model's distribution (top-p 1, temperature 1), no guidance: the reference
  top-p         top-p 0.8, no guidance (what top-p alone adds, apart from CFG)
  top-p+cfg     CFG + top-p 0.8 (the paper's demo setting)
  temp+cfg      CFG + temperature 0.8 (top-p 1)
  cd-k          CD-K, k 5, alpha 0.5, amateur temperature 0.5
  pooled+rerank the paper's "1/2 top-p + 1/2 CD-K": 4 + 4 candidates, the world's CLIP keeps the best

CFG's scale is `--guidance-scale`, by default the `guidance_scale` saved in `--model`'s generation config (the paper's 3
where it saves none), the same for every model of the run. Each condition runs with 0, 1 and 2 documents retrieved
from `--memory-bank` (query: the prompt). `--baseline` adds the rows of a model trained without retrieved documents
(the retrieval ablation) and `--heldout-prompts` those of the held-out split ((shape, colour) pairs never seen in
training); both without documents, unless `--all-docs` (the no-retrieval model never saw a document in front).

    python bench/quality.py --model outputs/tiny-model/pretrain --baseline outputs/tiny-model/pretrain-no-retrieval \\
        --memory-bank outputs/tiny-model/bank --prompts 200 --heldout-prompts 200 --output bench/quality.json
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

DECODINGS = {
    "plain": dict(decoding="top-p", top_p=1.0, guidance=False),
    "top-p": dict(decoding="top-p", top_p=0.8, guidance=False),
    "top-p+cfg": dict(decoding="top-p", top_p=0.8, guidance=True),
    "temp+cfg": dict(decoding="temperature", temperature=0.8, guidance=True),
    "cd-k": dict(decoding="cd-k", guidance=False),
    "pooled+rerank": dict(decoding="pooled", top_p=0.8, guidance=True, num_candidates=8),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved CM3Leon directory with its processor")
    parser.add_argument("--baseline", help="the same recipe trained without retrieval (optional)")
    parser.add_argument("--label", default="retrieval-trained",
                        help="--model's name in the rows (e.g. no-retrieval, to score the baseline in a run of its own)")
    parser.add_argument("--memory-bank", help="memory bank for the 1- and 2-document rows (none: only 0 documents)")
    parser.add_argument("--prompts", type=int, default=200, help="prompts of the test split")
    parser.add_argument("--heldout-prompts", type=int, default=0, help="prompts of the held-out split")
    parser.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=list(DECODINGS))
    parser.add_argument("--docs", nargs="+", type=int, default=[0, 1, 2], help="retrieved documents per prompt")
    parser.add_argument("--all-docs", action="store_true",
                        help="--docs also for --baseline and the held-out split (default: 0 documents there)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="CFG scale of the guided rows (default: --model's saved guidance_scale, else 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    return parser.parse_args(argv)


def prompts_of(split: str, count: int) -> tuple[list[str], list, list[int]]:
    """Captions, their real renders and their object counts (1-3) for the first `count` rows of `split`."""
    from cm3leon_hf.synthetic import Scene, make_row

    rows = [make_row("text_to_image", split, i) for i in range(count)]
    return ([r["caption"] for r in rows], [r["images"][0] for r in rows],
            [len(Scene.from_json(r["scene"]).objects) for r in rows])


def generate(pipe, prompts: list[str], spec: dict, docs: int, retriever, reranker, args) -> list:
    """One image per prompt under `spec`, in batches, reproducible from `args.seed`."""
    kwargs = dict(decoding=spec["decoding"], progress_bar=False, num_images_per_prompt=1)
    # Scale 1 is the conditional stream alone (uncond + 1 * (cond - uncond)): the model's own distribution.
    kwargs["guidance_scale"] = args.guidance_scale if spec["guidance"] else 1.0
    for key in ("top_p", "temperature", "num_candidates"):
        if key in spec:
            kwargs[key] = spec[key]
    if "num_candidates" in spec:
        kwargs["reranker"] = reranker
    if docs:
        kwargs.update(retriever=retriever, num_retrieved_docs=docs)
    images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        generator = torch.Generator().manual_seed(args.seed + start)
        outputs = pipe(batch, batch_size=len(batch), generator=generator, **kwargs)
        images.extend(result[0]["image"] for result in outputs)
    return images


def score(images, prompts, real_features, encoder, objects) -> dict:
    """The evaluator's and CLIP's figures; scene accuracy also per object count (`scene_1obj`, ...; the issue's bounds
    are for one and two objects)."""
    from cm3leon_hf.synthetic import score as score_one
    from cm3leon_hf.synthetic import score_many
    from cm3leon_hf.synthetic.clip import clip_score, encode_images, frechet_distance

    scores = score_many(images, prompts)
    correct = np.array([bool(score_one(image, prompt)["scene_correct"]) for image, prompt in zip(images, prompts)])
    objects = np.asarray(objects)
    features = encode_images(encoder, images)
    return {
        "scene_accuracy": scores["scene_correct"],
        **{f"scene_{n}obj": float(correct[objects == n].mean()) if (objects == n).any() else None for n in (1, 2, 3)},
        **{k: scores.get(k) for k in ("shape", "color", "size", "position", "background", "count")},
        "clip_score": clip_score(encoder, images, prompts),
        "frechet_distance": frechet_distance(features, real_features),
    }


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer
    from transformers import pipeline

    import cm3leon_hf.pipelines  # noqa: F401
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.pretrained import CLIP_PATH
    from cm3leon_hf.retriever import Cm3LeonRetriever
    from cm3leon_hf.synthetic.clip import encode_images

    encoder = SentenceTransformer(str(CLIP_PATH))
    retriever = None
    docs_options = args.docs
    if args.memory_bank:
        retriever = Cm3LeonRetriever(Cm3LeonMemoryBank.load(args.memory_bank), encoder, query_dropout=0.0)
    elif any(args.docs):
        print("no --memory-bank: only the 0-document rows", file=sys.stderr)
        docs_options = [0]
    if args.guidance_scale is None:
        from transformers import GenerationConfig

        saved = getattr(GenerationConfig.from_pretrained(args.model), "guidance_scale", None)
        args.guidance_scale = float(saved) if saved is not None else 3.0
    models = {args.label: args.model}
    if args.baseline:
        models["no-retrieval"] = args.baseline
    splits = {"test": args.prompts}
    if args.heldout_prompts:
        splits["heldout"] = args.heldout_prompts
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"CFG {args.guidance_scale}")
    rows = []
    for split, count in splits.items():
        prompts, real, objects = prompts_of(split, count)
        real_features = encode_images(encoder, real)
        for model_name, path in models.items():
            pipe = pipeline("text-to-image", model=path)
            reference = None
            docs_here = docs_options if args.all_docs or (split == "test" and model_name == args.label) else [0]
            conditions = [(d, k) for d in args.decodings for k in docs_here]
            if "plain" not in args.decodings:
                conditions.insert(0, ("plain", 0))
            for decoding, docs in tqdm(conditions, desc=f"{split} / {model_name}"):
                start = time.perf_counter()
                images = generate(pipe, prompts, DECODINGS[decoding], docs, retriever, encoder, args)
                row = {"split": split, "model": model_name, "decoding": decoding, "docs": docs, "prompts": count,
                       **score(images, prompts, real_features, encoder, objects), "seconds": round(time.perf_counter() - start, 1)}
                if decoding == "plain" and docs == 0:
                    reference = row["scene_accuracy"]
                row["vs_plain"] = None if not reference else row["scene_accuracy"] / reference
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print_table(rows)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| split | model | decoding | docs | scene | 1 obj | 2 obj | 3 obj | shape | colour | size | position | CLIP "
          "| FD | vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["split"], r["model"], r["decoding"], r["docs"]]
        cells += [f"{r[k]:.3f}" if r[k] is not None else "–" for k in ("scene_accuracy", "scene_1obj", "scene_2obj",
                                                                        "scene_3obj", "shape", "color", "size",
                                                                        "position", "clip_score")]
        cells += [f"{r['frechet_distance']:.3f}", "–" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
