"""Artifacts shipped inside the package, so that everything works offline on a fresh machine.

`TINY_PATH` is the bundled tiny CM3Leon, a model directory like any on the Hub: the trained model (`config.json`,
`model.safetensors`, `generation_config.json` with CFG on by default, `README.md` its model card), its processor (the
text BPE in `tokenizer.json`/`tokenizer_config.json`, `processor_config.json`, the VQ image tokenizer in diffusers
format in `image_tokenizer/`) and a memory bank of 3,000 training pairs (`memory_bank/`, for retrieval at inference).
`training/train_tiny_model.py --config training/recipes/tiny_model.yaml` reproduces the model and the bank from the
processor; `training/train_text_tokenizer.py`, `training/train_image_tokenizer.py` and `training/build_processor.py`
the processor.

`TINY_SFT_PATH` is the same model after the paper's multi-task instruction tuning (CL §4) on the synthetic world's
seven tasks, with its own processor and model card (no memory bank): it edits and infills images, draws from boxes and
from edge or segmentation maps, captions and answers questions. `training/train_tiny_model.py --config
training/recipes/tiny_model.yaml --sft_only` reproduces it from `TINY_PATH`.

`CLIP_PATH` is the synthetic world's small CLIP, a `sentence_transformers.SentenceTransformer` folder that encodes texts
and images into one space (the retriever's encoder, the re-ranker and the metric's feature space). It was trained by
`training/train_clip.py` for the documented 5,817 steps, with that script's earlier hand-written loop (`eval_results.json`
inside holds its figures and arguments).

>>> from transformers import AutoModelForCausalLM, AutoProcessor
>>> processor = AutoProcessor.from_pretrained(TINY_PATH)
>>> processor.image_seq_length, processor.image_tokenizer.resolution
(64, 64)
>>> AutoModelForCausalLM.from_pretrained(TINY_PATH).generation_config.guidance_scale
1.25
>>> from sentence_transformers import SentenceTransformer
>>> SentenceTransformer(str(CLIP_PATH)).encode(["a red star at the top left on a white background"]).shape
(1, 128)
"""

from pathlib import Path

TINY_PATH = Path(__file__).resolve().parent / "cm3leon-tiny"
TINY_SFT_PATH = Path(__file__).resolve().parent / "cm3leon-tiny-sft"
CLIP_PATH = Path(__file__).resolve().parent / "clip-synthetic"

__all__ = ["CLIP_PATH", "TINY_PATH", "TINY_SFT_PATH"]
