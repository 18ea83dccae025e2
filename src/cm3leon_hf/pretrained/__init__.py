"""Artifacts shipped inside the package, so that everything works offline on a fresh machine.

`CLIP_PATH` is the synthetic world's small CLIP, a `sentence_transformers.SentenceTransformer` folder that encodes texts
and images into one space (the retriever's encoder, the re-ranker and the metric's feature space). It is the output of
the documented `training/train_clip.py` run (`eval_results.json` inside holds its figures).

>>> from sentence_transformers import SentenceTransformer
>>> SentenceTransformer(str(CLIP_PATH)).encode(["a red star at the top left on a white background"]).shape
(1, 128)
"""

from pathlib import Path

CLIP_PATH = Path(__file__).resolve().parent / "clip-synthetic"

__all__ = ["CLIP_PATH"]
