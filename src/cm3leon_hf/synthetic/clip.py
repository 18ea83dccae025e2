"""The world's small CLIP: tokenizer, model config, sentence-transformers packaging, and the metrics built on it.

This CLIP is the retriever's encoder, the re-ranker, and the feature space of the metrics for the synthetic
world. `training/train_clip.py` trains it; this module holds what both training and users
need:

- `build_tokenizer()`: a word-level `PreTrainedTokenizerFast` over `captions.vocabulary()` (plus digits and
  punctuation, one token each), built offline with `tokenizers`: `<bos> words <eos>`, lower-cased, unknown
  words → `<unk>`. Word level, not BPE: the world's vocabulary is closed (~160 words) and every word is a
  concept the model must bind.
- `clip_config(...)`: a `transformers.CLIPConfig` for 64×64 images. The text tower pools at the first
  `<eos>` (`eos_token_id` is set, so transformers uses the token, not the legacy argmax).
- `pixel_values(arrays)`: the exact preprocessing of the saved processor (`(x / 255 − 0.5) / 0.5`, no resize
  at the training resolution), as a tensor, for fast training loops.
- `save_clip` / `load_clip`: a folder that `sentence_transformers.SentenceTransformer(path)` loads offline,
  with a `Normalize` module, so `encode()` maps PIL images and strings into one unit-norm space.
- Metrics: `clip_score` (mean image–caption cosine), `frechet_distance` (between two feature sets; with
  `encode_images` features this is the world's FID), and `retrieval_top1` (text → image, where any image
  whose scene equals the caption's counts as a hit).

sentence-transformers is the `retrieval` extra; it is imported only by the functions that need it.

Example:

>>> tok = build_tokenizer()
>>> tok.convert_ids_to_tokens(tok("a small red star at (12, 40)")["input_ids"])[:6]
['<bos>', 'a', 'small', 'red', 'star', 'at']
>>> tok("a red dragon")["input_ids"][3] == tok.unk_token_id
True
>>> cfg = clip_config(tok)
>>> cfg.vision_config.image_size, cfg.text_config.eos_token_id == tok.eos_token_id
(64, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from .captions import vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
PUNCTUATION: tuple[str, ...] = tuple(",.;:!?()-<>\"'")
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def build_tokenizer(max_length: int = 64) -> PreTrainedTokenizerFast:
    """The CLIP text tokenizer (see the module docstring). Deterministic: ids follow sorted vocabulary."""
    tokens = [*SPECIAL_TOKENS, *vocabulary(), *"0123456789", *PUNCTUATION]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def build_image_processor(resolution: int = 64) -> CLIPImageProcessorPil:
    """Resize (nearest: palette colours stay exact) and centre-crop to `resolution`, scale to [-1, 1]."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        resample=Image.Resampling.NEAREST,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def clip_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    resolution: int = 64,
    patch_size: int = 8,
    hidden_size: int = 128,
    num_layers: int = 4,
    vision_layers: int | None = None,
    num_heads: int = 4,
    projection_dim: int = 128,
) -> CLIPConfig:
    """A small `CLIPConfig`: both towers `hidden_size` wide (MLP 4× wide) and `num_layers` deep (the vision
    tower `vision_layers` deep if given), text positions up to the tokenizer's `model_max_length`."""
    if resolution % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide resolution {resolution}")
    common = dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_attention_heads=num_heads)
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_hidden_layers=num_layers,
            **common,
        ),
        vision_config=dict(
            image_size=resolution, patch_size=patch_size, num_hidden_layers=vision_layers or num_layers, **common
        ),
        projection_dim=projection_dim,
    )


def pixel_values(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 arrays (H, W, 3) at the model's resolution → normalised (batch, 3, H, W) float tensor, the
    same values the saved processor produces."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (batch, 3, H, W)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (batch / 255.0 - mean) / std


def save_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
    """Save `model` as a sentence-transformers folder (HF weights/config/processor at its root, a
    Transformer module and a Normalize module), loadable offline with `SentenceTransformer(path)`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Transformer

    path = os.fspath(path)
    resolution = model.config.vision_config.image_size
    model.save_pretrained(path)
    CLIPProcessor(image_processor=build_image_processor(resolution), tokenizer=tokenizer).save_pretrained(path)
    SentenceTransformer(modules=[Transformer(path), Normalize()], device="cpu").save(path)


def load_clip(path: str | os.PathLike, device: str = "cpu"):
    """The saved CLIP as a `SentenceTransformer` (offline; no download is attempted for a local path)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(os.fspath(path), device=device, local_files_only=True)


def _pil(images) -> list[Image.Image]:
    return [Image.fromarray(i, mode="RGB") if isinstance(i, np.ndarray) else i for i in images]


def encode_images(encoder, images, batch_size: int = 256) -> np.ndarray:
    """Unit-norm image embeddings (n, dim) from a loaded CLIP (`load_clip`); PIL images or uint8 arrays."""
    return encoder.encode(_pil(images), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)


def encode_texts(encoder, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Unit-norm text embeddings (n, dim)."""
    return encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)


def clip_score(encoder, images, captions: Sequence[str]) -> float:
    """Mean cosine similarity between each image and its caption (the world's CLIP score; Hessel et al.'s
    CLIPScore is 2.5·max(cos, 0) of the same cosine)."""
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    return float((encode_images(encoder, images) * encode_texts(encoder, captions)).sum(1).mean())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n_a, d) and (n_b, d):
    ||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½), as in FID (Heusel et al.). Needs n ≥ 2 per set."""
    from scipy import linalg

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) feature arrays with the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least 2 rows")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def retrieval_top1(text_embeddings: np.ndarray, text_keys: Sequence, image_embeddings: np.ndarray, image_keys: Sequence) -> float:
    """Fraction of texts whose highest-scoring image has the same key (e.g. `Scene.key()`): identical scenes
    in the gallery count as hits."""
    if len(text_embeddings) != len(text_keys) or len(image_embeddings) != len(image_keys):
        raise ValueError("embeddings and keys must have the same lengths")
    best = (np.asarray(text_embeddings) @ np.asarray(image_embeddings).T).argmax(1)
    return float(np.mean([text_keys[i] == image_keys[j] for i, j in enumerate(best)]))
