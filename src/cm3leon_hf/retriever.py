"""CM3Leon's retrieval strategy (CL §2.1) over a `Cm3LeonMemoryBank`, and retrieval-augmented prompts.

The retriever encodes text or image queries with the frozen CLIP that built the bank (`memory_bank.py`: storage,
consistency checks, index choices), searches the bank and filters the candidates as the paper does; it returns
`RetrievedDocument`s, with ids for the collator and text + image for prompts.

```
 Cm3LeonRetriever(bank, encoder).retrieve(texts=[...], k=2) → list[list[RetrievedDocument]]
 build_retrieval_prompt(documents, query_text)  →  ("t1 <break> <image> <break> … query <break>", [images])
 Cm3LeonProcessor(text, images)                  →  <eos> t1 <break> [image codes] <break> … query <break>
```

Choices the paper leaves open, made here (each one is tested in `tests/test_retrieval*.py`):

- **Strategy** (CL §2.1): relevance order; candidates scoring above `max_score=0.9` are skipped ("too similar to the
  query"); duplicates are skipped — the same row, the same content (text and image bytes) as an already chosen
  document, the query pair itself (by content, and by `exclude` source indices); candidates are over-fetched
  (`k * overfetch`) and the search widened (x4 each round) when filtering leaves fewer than `k`. The threshold is an
  absolute cosine, so its effect depends on the encoder: with the synthetic world's small CLIP, near-identical scenes
  score above 0.9 and are skipped, as the paper intends (`max_score` is an argument).
- **k.** `k` larger than the bank is an error; fewer than `k` documents surviving the filters (after widening to the whole
  bank) returns fewer with a warning.
- **Query dropout** (CL §2.1: "drops some tokens of the query … 20%"): each whitespace-separated word of a text query is
  dropped independently with probability 0.2 (at least one word is kept), only when `training=True`. Words, not the
  encoder's BPE tokens: the rule then does not depend on which CLIP is plugged in, and a dropped word never leaves a
  half word behind. Images are never dropped out.
- **Training retrieval** (our reading of "we retrieve two documents each, based on image and text …
  randomly select three"): `retrieve_for_training` retrieves 2 documents with the (dropped-out) caption and 2 with the
  image, merges them without duplicates (topping up from the next-ranked candidates when the two lists overlap), and
  samples 3 in random order with a seeded generator. `training/pretokenize.py` does it once for a whole training set
  (resumably, storing the documents' rows for `Cm3LeonDataCollator`).
- **Prompt layout** (metaseq's CM3Leon prompt builder), written once in `layout.py` (`build_retrieval_prompt`): conditional
  `<eos> t1 <break> <image> <break> t2 <break> <image> <break> query <break>`; unconditional (CFG) keeps the documents
  and replaces the query text by `<mask:0>`: `<eos> t1 <break> <image> <break> … <mask:0> <break>`, which is exactly
  the no-retrieval unconditional prompt `<eos> <mask:0> <break>` with the documents in front, so both streams end with
  `<break>` and continue with image tokens. The leading `<eos>` is left to `Cm3LeonProcessor` (which starts every
  document with it) unless `prepend_eos=True`.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np
from PIL import Image

from .layout import build_retrieval_prompt  # noqa: F401  (re-exported: the prompt of retrieved documents)
from .memory_bank import CONTENT_HASH_COLUMN, SOURCE_INDEX_COLUMN, Cm3LeonMemoryBank, content_hash


def query_dropout(text: str, p: float, generator: np.random.Generator) -> str:
    """Drop each whitespace-separated word of `text` independently with probability `p`; at least one word stays.

    CL §2.1's query dropout (20% of the query's tokens), applied to words (see the module docstring).

    >>> import numpy as np
    >>> query_dropout("a small red circle at the top left", 0.2, np.random.default_rng(0))
    'a small at the top left'
    >>> query_dropout("a small red circle", 0.0, np.random.default_rng(0))
    'a small red circle'
    """
    words = text.split()
    if p == 0 or not words:
        return text
    keep = generator.random(len(words)) >= p
    if not keep.any():
        keep[generator.integers(len(words))] = True
    return " ".join(word for word, kept in zip(words, keep) if kept)


@dataclass
class RetrievedDocument:
    """One retrieved memory-bank document, ready for the collator (ids) and for prompts (text + image).

    Attributes:
        row (`int`): row of the bank (= faiss id).
        score (`float`): relevance, the exact inner product of the unit query and document embeddings (CLIP cosine).
        text (`str`): the document's text.
        image (`PIL.Image.Image` or `None`): the document's image, when the bank has an image column.
        image_ids (`list[int]` or `None`): pre-tokenized VQ codes of the image, when the bank has an `image_ids` column.
        input_ids (`list[int]` or `None`): the pre-tokenized document, when the bank has an `input_ids` column.
        source_index (`int`): the row of the dataset the bank was built from.
        content_hash (`str`): `content_hash(text, image)`.
        query_modality (`str`): `"text"` or `"image"`, the kind of query that found the document.
        extra (`dict`): every other column of the bank row, carried through unchanged.
    """

    row: int
    score: float
    text: str
    image: Image.Image | None
    image_ids: list[int] | None
    input_ids: list[int] | None
    source_index: int
    content_hash: str
    query_modality: str
    extra: dict = field(default_factory=dict)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class Cm3LeonRetriever:
    """CM3Leon's retriever (CL §2.1): CLIP relevance over a memory bank, with the paper's filters and query dropout.

    Args:
        bank (`Cm3LeonMemoryBank`): the memory bank.
        encoder (`sentence_transformers.SentenceTransformer`): the encoder that built the bank (checked).
        k (`int`, defaults to 2): documents per query (CL Table 1's best setting, `num_retrieved_doc=2` in the code).
        max_score (`float`, defaults to 0.9): candidates scoring above it are skipped (CL §2.1 "≤ 0.9").
        query_dropout (`float`, defaults to 0.2): fraction of the words of a text query dropped in training.
        overfetch (`int`, defaults to 4): candidates fetched per wanted document before filtering.
        seed (`int`, defaults to 0): seed of the retriever's own `numpy` generator (query dropout, training selection);
            every method also takes a `generator`.
        batch_size (`int`, defaults to 64): encoder batch size.

    Example (shapes: `len(results) == len(texts)`, `len(results[i]) == k`):

    ```python
    >>> import tempfile
    >>> from sentence_transformers import SentenceTransformer
    >>> from cm3leon_hf.pretrained import CLIP_PATH
    >>> from cm3leon_hf.synthetic import build_task
    >>> encoder = SentenceTransformer(str(CLIP_PATH))
    >>> pairs = build_task("text_to_image", num_train=500, num_validation=0, num_test=0, num_heldout=0)["train"]
    >>> bank = Cm3LeonMemoryBank.build(pairs, encoder, tempfile.mkdtemp() + "/bank", text_column="caption",
    ...                                image_column="images", show_progress_bar=False)
    >>> retriever = Cm3LeonRetriever(bank, encoder)
    >>> docs = retriever.retrieve(texts=["a red circle at the top left"], k=2)[0]
    >>> len(docs), all(d.score <= 0.9 for d in docs), type(docs[0].image).__name__
    (2, True, 'PngImageFile')
    >>> prompt, images = build_retrieval_prompt(docs, "a red circle at the top left")
    >>> prompt.count("<image>"), len(images), prompt.endswith("<break> a red circle at the top left <break>")
    (2, 2, True)

    ```
    """

    def __init__(self, bank: Cm3LeonMemoryBank, encoder, *, k: int = 2, max_score: float = 0.9,
                 query_dropout: float = 0.2, overfetch: int = 4, seed: int = 0, batch_size: int = 64):
        for name, value in (("k", k), ("overfetch", overfetch), ("batch_size", batch_size)):
            _check_positive_int(name, value)
        if not 0 <= query_dropout < 1:
            raise ValueError(f"query_dropout must be in [0, 1), got {query_dropout}.")
        if len(bank) == 0:
            raise ValueError("The memory bank is empty.")
        bank.check_encoder(encoder)
        self.bank = bank
        self.encoder = encoder
        self.k = k
        self.max_score = max_score
        self.query_dropout = query_dropout
        self.overfetch = overfetch
        self.batch_size = batch_size
        self.generator = np.random.default_rng(seed)
        columns = set(bank.dataset.column_names)
        self._text_column = bank.manifest["text_column"]
        self._image_column = bank.manifest["image_column"]
        self._image_ids_column = "image_ids" if "image_ids" in columns and self._image_column != "image_ids" else None
        self._input_ids_column = "input_ids" if "input_ids" in columns else None

    def encode_queries(self, texts: Sequence[str] | None = None, images: Sequence[Image.Image] | None = None, *,
                       training: bool = False, generator: np.random.Generator | None = None) -> np.ndarray:
        """Unit query embeddings, float32 of shape `(num_queries, dim)`, for texts or images (exactly one of them).

        With `training=True`, text queries first go through `query_dropout` (never at inference)."""
        if (texts is None) == (images is None):
            raise ValueError("Pass exactly one of `texts` or `images`.")
        if texts is not None:
            if isinstance(texts, str):
                raise ValueError("`texts` must be a list of strings, not a string.")
            if training and self.query_dropout > 0:
                generator = generator or self.generator
                texts = [query_dropout(t, self.query_dropout, generator) for t in texts]
            inputs = list(texts)
        else:
            inputs = list(images)
        if not inputs:
            raise ValueError("No queries given.")
        embeddings = self.encoder.encode(inputs, batch_size=self.batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(embeddings, dtype=np.float32)

    def retrieve(self, texts: Sequence[str] | None = None, images: Sequence[Image.Image] | None = None, *,
                 k: int | None = None, training: bool = False, exclude: Sequence[Sequence[int]] | None = None,
                 exclude_content: Sequence[str | None] | None = None,
                 generator: np.random.Generator | None = None) -> list[list[RetrievedDocument]]:
        """Retrieve `k` documents for each text query or each image query (exactly one of `texts`/`images`).

        Args:
            k (`int`, *optional*): documents per query, defaults to the retriever's `k`. More than the bank holds is an
                error; fewer surviving the filters returns fewer with a warning.
            training (`bool`): apply query dropout to text queries.
            exclude (`list[list[int]]`, *optional*): per query, `source_index` values never to return (e.g. the query
                pair's own row when the bank is the training set).
            exclude_content (`list[str | None]`, *optional*): per query, a `content_hash` never to return (the query
                pair's content; `retrieve_for_training` passes it).

        Returns:
            `list[list[RetrievedDocument]]`: per query, documents in decreasing relevance, each scoring `<= max_score`,
            no two with the same row or content.
        """
        if k is not None:
            _check_positive_int("k", k)
        modality = "text" if texts is not None else "image"
        queries = self.encode_queries(texts, images, training=training, generator=generator)
        return self._retrieve_embeddings(queries, self.k if k is None else k, modality, exclude, exclude_content)

    def retrieve_for_training(self, texts: Sequence[str], images: Sequence[Image.Image], *, num_docs: int = 3,
                              docs_per_modality: int = 2, exclude: Sequence[Sequence[int]] | None = None,
                              generator: np.random.Generator | None = None) -> list[list[RetrievedDocument]]:
        """Documents for training pairs `(texts[i], images[i])`: our reading of CL §2.1.

        Retrieves `docs_per_modality` documents with the caption (query dropout on) and as many with the image,
        merges the two lists without duplicates (same row or content; text-side first), and samples `num_docs` of them
        without replacement, in random order. When the two lists overlap so much that fewer than `num_docs` distinct
        documents remain, the next-ranked candidates of both lists (alternating, text first) fill the gap. The pair
        itself (same content, or a `source_index` in `exclude[i]`) is never returned. Deterministic given the
        retriever's seed or `generator`.
        """
        if len(texts) != len(images):
            raise ValueError(f"texts and images must pair up, got {len(texts)} texts and {len(images)} images.")
        generator = generator or self.generator
        pair_hashes = [content_hash(t, im) for t, im in zip(texts, images)]
        depth = max(docs_per_modality, num_docs)
        by_text = self.retrieve(texts=texts, k=depth, training=True, exclude=exclude, exclude_content=pair_hashes,
                                generator=generator)
        by_image = self.retrieve(images=images, k=depth, exclude=exclude, exclude_content=pair_hashes)
        selected = []
        for from_text, from_image in zip(by_text, by_image):
            first = from_text[:docs_per_modality] + from_image[:docs_per_modality]
            reserve = [d for pair in zip_longest(from_text[docs_per_modality:], from_image[docs_per_modality:])
                       for d in pair if d is not None]
            merged = _distinct(first, limit=None)
            merged += _distinct(reserve, limit=num_docs - len(merged), seen=merged)
            order = generator.permutation(len(merged))[:num_docs]
            selected.append([merged[j] for j in order])
        return selected

    def _retrieve_embeddings(self, queries, k, modality, exclude, exclude_content):
        num_rows = len(self.bank)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if k > num_rows:
            raise ValueError(f"k={k} is larger than the memory bank ({num_rows} documents).")
        exclude = [set(e) for e in exclude] if exclude is not None else [set() for _ in queries]
        exclude_content = list(exclude_content) if exclude_content is not None else [None] * len(queries)
        if len(exclude) != len(queries) or len(exclude_content) != len(queries):
            raise ValueError(f"exclude/exclude_content must have one entry per query ({len(queries)}).")
        chosen = [[] for _ in queries]
        pending = list(range(len(queries)))
        fetch = min(num_rows, k * self.overfetch)
        while pending:
            _, rows = self.bank.search(queries[pending], fetch)
            unique = np.unique(rows[rows >= 0])
            stored = self.bank.embeddings(unique)
            position = {int(r): j for j, r in enumerate(unique)}
            sources, hashes = self.bank.row_keys(unique)
            source_of = dict(zip(unique.tolist(), sources))
            hash_of = dict(zip(unique.tolist(), hashes))
            still = []
            for q, candidates in zip(pending, rows):
                candidates = [int(r) for r in candidates if r >= 0]
                exact = stored[[position[r] for r in candidates]] @ queries[q] if candidates else np.zeros(0)
                picked, seen = [], {exclude_content[q]}
                for j in np.argsort(-exact, kind="stable"):
                    row, score = candidates[j], float(exact[j])
                    if score > self.max_score or source_of[row] in exclude[q] or hash_of[row] in seen:
                        continue
                    picked.append((row, score))
                    seen.add(hash_of[row])
                    if len(picked) == k:
                        break
                chosen[q] = picked
                if len(picked) < k and fetch < num_rows:
                    still.append(q)
            pending = still
            fetch = min(num_rows, fetch * 4)
        short = sum(len(c) < k for c in chosen)
        if short:
            warnings.warn(f"{short} of {len(queries)} queries got fewer than k={k} documents after the filters "
                          f"(score <= {self.max_score}, no duplicates, exclusions).", stacklevel=3)
        return [self._to_documents(c, modality) for c in chosen]

    def _to_documents(self, picked, modality):
        rows = [row for row, _ in picked]
        documents = []
        for (row, score), values in zip(picked, self.bank.documents(rows)):
            text = values.pop(self._text_column)
            image = values.pop(self._image_column)
            if isinstance(image, list) and len(image) == 1 and isinstance(image[0], (Image.Image, list)):
                image = image[0]
            image_ids = values.pop(self._image_ids_column) if self._image_ids_column else None
            if image_ids is None and not isinstance(image, Image.Image):
                image_ids = image
            input_ids = values.pop(self._input_ids_column) if self._input_ids_column else None
            documents.append(RetrievedDocument(
                row=row, score=score, text=text, image=image if isinstance(image, Image.Image) else None,
                image_ids=image_ids, input_ids=input_ids, source_index=int(values.pop(SOURCE_INDEX_COLUMN)),
                content_hash=values.pop(CONTENT_HASH_COLUMN), query_modality=modality, extra=values,
            ))
        return documents


def _distinct(documents, limit, seen=()):
    """`documents` without repeats of a row or a content hash (also none of `seen`'s), at most `limit` of them."""
    keys = {k for d in seen for k in (d.row, d.content_hash)}
    out = []
    for doc in documents:
        if limit is not None and len(out) >= limit:
            break
        if doc.row not in keys and doc.content_hash not in keys:
            out.append(doc)
            keys.update((doc.row, doc.content_hash))
    return out
