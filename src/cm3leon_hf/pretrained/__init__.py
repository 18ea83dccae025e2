"""Artifacts shipped inside the package, so that everything works offline on a fresh machine.

`TINY_PATH` is the tiny configuration's trained processor (`Cm3LeonProcessor.from_pretrained(TINY_PATH)`): the text
BPE (`tokenizer.json`, `tokenizer_config.json`), `processor_config.json` and the VQ image tokenizer in diffusers format
(`image_tokenizer/`). They are the outputs of the commands in `training/train_text_tokenizer.py`,
`training/train_image_tokenizer.py` and `training/build_processor.py`.

`CLIP_PATH` is the synthetic world's small CLIP, a `sentence_transformers.SentenceTransformer` folder that encodes texts
and images into one space (the retriever's encoder, the re-ranker and the metric's feature space). It is the output of
the documented `training/train_clip.py` run (`eval_results.json` inside holds its figures).

>>> from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor
>>> processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
>>> processor.image_seq_length, processor.image_tokenizer.resolution
(64, 64)
>>> from sentence_transformers import SentenceTransformer
>>> SentenceTransformer(str(CLIP_PATH)).encode(["a red star at the top left on a white background"]).shape
(1, 128)
"""

from pathlib import Path

TINY_PATH = Path(__file__).resolve().parent / "cm3leon-tiny"
CLIP_PATH = Path(__file__).resolve().parent / "clip-synthetic"

__all__ = ["CLIP_PATH", "TINY_PATH"]
