"""Documents into memory-bank rows: the CLIP embedding of each text-image pair, its content hash, and the encoder's
identity (`memory_bank.py` stores the rows and searches them).

A document is encoded as the normalised mean of its normalised text and image embeddings (CL §2.1, the retriever's
bi-encoder). Rows whose text is missing/blank or whose image is missing are left out, so every row is a usable
mixed-modal document. An encoder is identified by its name, its dimension and its embeddings of a fixed probe text and
probe image: banks compare those (cosine >= `FINGERPRINT_MIN_COSINE`) to refuse queries from another encoder.
"""

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from datasets import List, Value
from PIL import Image

EMBEDDING_COLUMN = "embedding"
SOURCE_INDEX_COLUMN = "source_index"
CONTENT_HASH_COLUMN = "content_hash"
RESERVED_COLUMNS = (EMBEDDING_COLUMN, SOURCE_INDEX_COLUMN, CONTENT_HASH_COLUMN)

PROBE_TEXT = "a red circle above a blue square on a white background"
FINGERPRINT_MIN_COSINE = 0.999


def probe_image() -> Image.Image:
    """The fixed 64x64 RGB image whose embedding fingerprints an encoder (a colour gradient with a square)."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1).copy()
    pixels[16:48, 16:48] = (200, 30, 30)
    return Image.fromarray(pixels, mode="RGB")


def content_hash(text: str, image: Any) -> str:
    """sha1 of a document's content: its text and its image (PIL pixels, or a sequence of image ids).

    Two documents with equal text and pixel-identical images (or equal image ids) get the same hash; the retriever uses
    it to skip duplicates and the query pair itself.

    >>> from PIL import Image
    >>> a = content_hash("a red square", Image.new("RGB", (4, 4), (255, 0, 0)))
    >>> a == content_hash("a red square", Image.new("RGB", (4, 4), (255, 0, 0))), a == content_hash("a red square", [1, 2])
    (True, False)
    """
    digest = hashlib.sha1(text.encode("utf-8") + b"\0")
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    else:
        digest.update(np.asarray(image, dtype=np.int64).tobytes())
    return digest.hexdigest()


def encoder_name(encoder) -> str:
    """A Hub id as it is; a local directory by its last component (a bank moves between machines: the identity that
    counts is the probe embeddings, and an absolute path of the building machine means nothing elsewhere)."""
    first = encoder[0]
    model = getattr(first, "model", None) or getattr(first, "auto_model", None)
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(encoder).__name__)
    return Path(name).name if os.path.isabs(name) else name


def encoder_dim(encoder) -> int:
    get_dim = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(get_dim())


def encoder_identity(encoder) -> dict:
    """The JSON-able identity of a sentence-transformers encoder: name, dimension and probe embeddings.

    Raises `ValueError` when the encoder does not encode both texts and images (a text-only model is not a CLIP).
    """
    modalities = set(getattr(encoder, "modalities", ()) or ())
    if not {"text", "image"} <= modalities:
        raise ValueError(
            f"The encoder must embed both texts and images into one space (a CLIP model); it supports "
            f"{sorted(modalities) or 'text only'}."
        )
    text = encoder.encode([PROBE_TEXT], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    image = encoder.encode([probe_image()], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return {
        "name": encoder_name(encoder),
        "dim": encoder_dim(encoder),
        "probe_text": PROBE_TEXT,
        "text_probe_embedding": [round(float(v), 6) for v in text[0]],
        "image_probe_embedding": [round(float(v), 6) for v in image[0]],
    }


def same_encoder(identity: dict, other: dict) -> bool:
    """Whether two `encoder_identity` records are one encoder: same dimension, probe embeddings at cosine >=
    `FINGERPRINT_MIN_COSINE`."""
    if identity.get("dim") != other.get("dim"):
        return False
    for key in ("text_probe_embedding", "image_probe_embedding"):
        if float(np.dot(identity[key], other[key])) < FINGERPRINT_MIN_COSINE:
            return False
    return True


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def encode_shard(part, start, progress, *, encoder, text_column, image_column, image_decoder, batch_size, dim):
    """The bank rows of `part` (source rows `start`, `start + 1`, …): its mixed-modal rows with `source_index`,
    `content_hash` and `embedding` (`dim` float32, unit norm) added; `progress` advances by the rows read. Texts and
    images are encoded in separate calls of `batch_size`; `image_decoder` turns image ids into PIL images."""
    kept, hashes, embeddings = [], [], []
    offset = 0
    for batch in part.iter(batch_size=batch_size):
        texts, images = batch[text_column], [_single_image(im, image_decoder) for im in batch[image_column]]
        keep = [
            j for j, (t, im) in enumerate(zip(texts, images))
            if isinstance(t, str) and t.strip() and im is not None
        ]
        if keep:
            texts = [texts[j] for j in keep]
            stored_images = [images[j] for j in keep]
            pixels = image_decoder(stored_images) if image_decoder is not None else stored_images
            text_emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)
            image_emb = encoder.encode(pixels, batch_size=batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
            embeddings.append(_unit_rows((text_emb + image_emb) / 2).astype(np.float32))
            hashes.extend(content_hash(t, im) for t, im in zip(texts, stored_images))
            kept.extend(offset + j for j in keep)
        offset += len(images)
        progress.update(len(images))
    shard = part.select(kept).flatten_indices()
    shard = shard.add_column(SOURCE_INDEX_COLUMN, np.asarray(kept, dtype=np.int64) + start, feature=Value("int64"))
    shard = shard.add_column(CONTENT_HASH_COLUMN, hashes, feature=Value("string"))
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    return shard.add_column(EMBEDDING_COLUMN, list(matrix), feature=List(Value("float32"), length=dim))


def _single_image(value, image_decoder):
    """A row's image: the value itself, or the one element of a list of images (`None` when missing/empty).

    Image ids (with `image_decoder`) are a list of ints, so only PIL lists are unwrapped; an empty id list is missing.
    """
    if value is None:
        return None
    if image_decoder is not None:
        return value if len(value) > 0 and not isinstance(value[0], (list, tuple)) else one_image(value)
    return one_image(value)


def one_image(value, what: str = "A memory-bank document"):
    """A row's image when the image column may hold a list: the value, or the single element of a list (`None` when
    missing or empty); a list of several is an error naming `what` has one image (a bank document, a training pair)."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) > 1:
        raise ValueError(f"{what} has one image; a row of the image column holds {len(value)}.")
    return value[0] if value else None
