"""`Cm3LeonDataCollator`: retrieval-augmented CM3 training samples (CL §2.1–2.2, CM3 §2) from pre-tokenized documents.

Each example is a pre-tokenized document (`input_ids`: `text <break> image`, no `<eos>`; see `training/pretokenize.py`)
with, optionally, the rows of its retrieved documents (`retrieved_indices`, rows of `documents`). The collator lays
them out as `<eos> doc1 <break> … docN <break> query <eos>` (`cm3leon_hf.layout`), applies the CM3 causal-masked
objective, truncates, pads, and writes the labels.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .layout import Cm3LeonLayout

IGNORE_INDEX = -100


def _flat_ids(ids, what: str, vocab_size: int | None = None) -> list[int]:
    """`ids` as a list of ints, or a clear error: a nested list is usually a processor's batched output; an empty
    one, or an id outside `[0, vocab_size)`, is nothing the model can train on."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            hint = " (a batch of one? take [0] of a processor's input_ids)" if isinstance(token, (list, tuple)) else ""
            raise ValueError(f"{what} must be a flat sequence of token ids, found {type(token).__name__} {token!r:.40}{hint}")
    ids = [int(token) for token in ids]
    if not ids:
        raise ValueError(f"{what} is empty: a row that pre-tokenization skipped? Train on the examples "
                         f"`load_pretokenized` returns, which leave those out.")
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(t for t in ids if t < 0 or t >= vocab_size)
        raise ValueError(f"{what} holds the id {bad}, outside the vocabulary [0, {vocab_size}): data tokenized for "
                         f"another model? Pre-tokenize it with this model's processor.")
    return ids


@dataclass
class Cm3LeonDataCollator:
    r"""
    Data collator for CM3Leon pretraining: retrieved documents in front, the CM3 causal-masked objective, labels.

    For every example:

    1. **Layout.** `<eos> doc1 <break> … docN <break> query <eos>` (CL Fig. 9) with the first `num_retrieved_docs` of
       the example's `retrieved_indices` (rows of `documents`, each a pre-tokenized document).
    2. **Span count.** `n ~ Clamp(Poisson(poisson_lambda), 0, max_spans)`; `n = 0` is a purely causal sample. With
       `causal_fraction` set, a sample is causal with that probability and otherwise `n ~ Clamp(Poisson, 1, max_spans)`
       (CM3's paper form).
    3. **Spans** (metaseq's CM3 sampler): `n²` candidate spans, each from two uniform positions over the sequence
       (`start = ⌊u₁·L⌋`, `end = ⌊u₂·L + ½⌋`, sorted), are clipped to the segment they overlap most (a segment is one
       modality: one image's codes or one text, between `<eos>`/`<break>`; CL §2.2: no masking across `<break>`); the
       first `n` non-empty, non-intersecting ones are kept.
    4. **Masking** (`Cm3LeonLayout.infill`): span `i` is replaced by `<mask:i>` and appended as `<mask:i> span <eoss>`
       before the closing `<eos>`.
    5. **Labels**: the ids, with `-100` on every sentinel `<mask:i>` (CM3: sentinels carry no loss) and on padding. The
       model shifts them (next-token prediction). Every other token, retrieved documents included, has weight 1 (CL
       §2.2 drops RA-CM3's query up-weighting).
    6. **Truncation** never cuts a document: while the sample (with its `3n` infill tokens) is longer than
       `max_length`, the first retrieved document is dropped; without documents, `n` is lowered to what fits; a query
       that does not fit alone (`len + 2 > max_length`) is an error naming the example (`training/pretokenize.py
       --max-length` skips such examples ahead of training, with a count).
    7. **Padding** on the right to the longest sample (or a multiple of `pad_to_multiple_of`), with `attention_mask`.

    Choices the paper leaves open, made here:

    - **Span count** follows metaseq, the code CM3Leon was trained with: Poisson(1) clamped at 0, so `e⁻¹ ≈ 37%` of the
      samples are causal; CM3's paper clamps at 1. Both are available (`causal_fraction`).
    - **Retrieved documents can be masked** like the query: every token is part of the document the model learns.
    - **Context budget**: up to `num_retrieved_docs=3` documents (CL §2.1 samples three) as long as they fit; the first
      one is dropped first (retrieval order is random, CL §2.1 "randomly select three"), keeping those next to the query.
    - **Randomness** is a pure function of `(seed, epoch, source_index)` when examples carry `source_index` (as
      pre-tokenized data does): the same sample whatever the batch size, the number of processes or data-loader
      workers, and after resuming (`Cm3LeonCollatorEpochCallback` sets `epoch` so that each epoch masks anew).
      Without `source_index` a generator seeded with `seed` is used in call order (each data-loader worker gets a
      copy of it, so give examples a `source_index` when using workers).

    Args:
        layout (`Cm3LeonLayout`, `Cm3LeonConfig` or `Cm3LeonProcessor`): the vocabulary's special ids and image range.
        documents (`datasets.Dataset` or a sequence of dicts, *optional*): where `retrieved_indices` point; rows with
            `input_ids`. An empty document (an example skipped at pre-tokenization) is left out.
        max_length (`int`, *optional*): longest sample; defaults to the config's `max_position_embeddings`.
        num_retrieved_docs (`int`, defaults to 3): documents put in front, at most.
        poisson_lambda (`float`, defaults to 1.0), max_spans (`int`, *optional*: the number of sentinels),
        causal_fraction (`float`, *optional*): the span count, see above.
        pad_to_multiple_of (`int`, *optional*), seed (`int`, defaults to 0), epoch (`int`, defaults to 0).

    Example (ids of the tiny configuration: `<pad>` 0, `<eos>` 1, `<break>` 2, `<eoss>` 3, `<mask:i>` 4 + i; images of
    2 codes here, at 1024):

    ```python
    >>> from cm3leon_hf.layout import Cm3LeonLayout
    >>> layout = Cm3LeonLayout(eos_token_id=1, break_token_id=2, eoss_token_id=3, pad_token_id=0,
    ...                        sentinel_token_ids=(4, 5), image_token_offset=1024, image_vocab_size=2048,
    ...                        image_seq_length=2)
    >>> documents = [{"input_ids": [310, 2, 1040, 1041]}, {"input_ids": [300, 301, 2, 1030, 1031]}]
    >>> collator = Cm3LeonDataCollator(layout, documents=documents, max_length=32, seed=4)
    >>> batch = collator([{"input_ids": [300, 301, 2, 1030, 1031], "retrieved_indices": [0], "source_index": 1},
    ...                   {"input_ids": [310, 2, 1040, 1041], "source_index": 0}])
    >>> batch["input_ids"].tolist()
    [[1, 310, 2, 1040, 1041, 2, 300, 301, 2, 1030, 1031, 1], [1, 4, 2, 5, 4, 310, 3, 5, 1040, 1041, 3, 1]]
    >>> batch["labels"].tolist()[1]
    [1, -100, 2, -100, -100, 310, 3, -100, 1040, 1041, 3, 1]

    ```
    The first sample is causal (n = 0), with document 0 in front of the query; the second masks two spans, the text
    (`<mask:0>`) and the image (`<mask:1>`) of its document, and appends `<mask:0> 310 <eoss> <mask:1> 1040 1041 <eoss>`.
    """

    layout: Any
    documents: Any = None
    max_length: int | None = None
    num_retrieved_docs: int = 3
    poisson_lambda: float = 1.0
    max_spans: int | None = None
    causal_fraction: float | None = None
    pad_to_multiple_of: int | None = None
    seed: int = 0
    epoch: int = 0
    return_tensors: str = "pt"
    _generator: np.random.Generator = field(default=None, init=False, repr=False)
    _vocab_size: int = field(default=None, init=False, repr=False)

    def __post_init__(self):
        source = self.layout
        if not isinstance(source, Cm3LeonLayout):
            self.layout = Cm3LeonLayout.of(source)
        # ids at or past it are not the model's (the config's vocab_size; a bare layout's ends with the image codes)
        self._vocab_size = getattr(source, "vocab_size", None) or (
            self.layout.image_token_offset + self.layout.image_vocab_size)
        positions = getattr(source, "max_position_embeddings", None)
        if self.max_length is None:
            self.max_length = positions
            if self.max_length is None:
                raise ValueError("`max_length` is needed when the collator is not built from a Cm3LeonConfig.")
        if positions is not None and self.max_length > positions:
            raise ValueError(f"`max_length` ({self.max_length}) is more than the model's {positions} positions: its "
                             f"samples could not be trained on. Use at most {positions}.")
        if self.pad_to_multiple_of is not None and (isinstance(self.pad_to_multiple_of, bool) or not isinstance(
                self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1):
            raise ValueError(f"`pad_to_multiple_of` must be a positive integer or None, got {self.pad_to_multiple_of!r}.")
        if self.max_spans is None:
            self.max_spans = len(self.layout.sentinel_token_ids)
        if not 0 <= self.max_spans <= len(self.layout.sentinel_token_ids):
            raise ValueError(
                f"`max_spans` ({self.max_spans}) must be in [0, {len(self.layout.sentinel_token_ids)}] (the sentinels)."
            )
        if not (math.isfinite(self.poisson_lambda) and self.poisson_lambda >= 0):
            raise ValueError(f"`poisson_lambda` must be a finite number >= 0, got {self.poisson_lambda!r}.")
        if self.causal_fraction is not None and not 0 <= self.causal_fraction <= 1:
            raise ValueError(f"`causal_fraction` must be in [0, 1], got {self.causal_fraction!r}.")
        if self.num_retrieved_docs < 0:
            raise ValueError(f"`num_retrieved_docs` must be >= 0, got {self.num_retrieved_docs}.")
        if self.max_length < 3:
            raise ValueError(f"`max_length` must be at least 3, got {self.max_length}.")
        if self.return_tensors != "pt":
            raise ValueError(f"Only return_tensors='pt' is supported, got {self.return_tensors!r}.")
        self._generator = np.random.default_rng(self.seed)

    # ------------------------------------------------------------------------------------------------ sampling

    def num_spans(self, rng: np.random.Generator) -> int:
        """Draw the number of CM3 spans of one sample (see the class docstring)."""
        if self.causal_fraction is not None:
            if rng.random() < self.causal_fraction:
                return 0
            return int(min(max(rng.poisson(self.poisson_lambda), 1), self.max_spans))
        return int(min(rng.poisson(self.poisson_lambda), self.max_spans))

    def sample_spans(self, ids: Sequence[int], num_spans: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """Up to `num_spans` sorted, non-intersecting spans of `ids`, each inside one segment (see the class docstring)."""
        if num_spans == 0:
            return []
        segments = self.layout.segments(ids)
        if not segments:
            return []
        starts = np.array([s for s, _, _ in segments])
        ends = np.array([e for _, e, _ in segments])
        length = len(ids)
        draws = rng.random((num_spans * num_spans, 2))
        kept: list[tuple[int, int]] = []
        for u1, u2 in draws:
            start, end = sorted((int(u1 * length), int(u2 * length + 0.5)))
            overlap = np.minimum(ends, end) - np.maximum(starts, start)
            best = int(overlap.argmax())
            if overlap[best] <= 0:
                continue
            span = (max(start, starts[best]), min(end, ends[best]))
            if all(span[1] <= s or span[0] >= e for s, e in kept):
                kept.append((int(span[0]), int(span[1])))
                if len(kept) == num_spans:
                    break
        return sorted(kept)

    def _rng(self, feature: dict) -> np.random.Generator:
        index = feature.get("source_index")
        if index is None:
            return self._generator
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    # ------------------------------------------------------------------------------------------------ collation

    def _retrieved(self, features: list[dict]) -> list[list[list[int]]]:
        wanted = [list(f.get("retrieved_indices") or [])[: self.num_retrieved_docs] for f in features]
        flat = sorted({i for rows in wanted for i in rows})
        if not flat:
            return [[] for _ in features]
        if self.documents is None:
            raise ValueError("Examples carry `retrieved_indices` but the collator has no `documents` to read them from.")
        if flat[0] < 0 or flat[-1] >= len(self.documents):
            bad = flat[0] if flat[0] < 0 else flat[-1]
            raise ValueError(f"`retrieved_indices` holds {bad}, not a row of the {len(self.documents)} documents: the "
                             f"indices must come from the pre-tokenization of these documents.")
        if isinstance(self.documents, Sequence) and not hasattr(self.documents, "column_names"):
            found = [self.documents[i]["input_ids"] for i in flat]
        else:  # one batched Arrow read for the whole batch
            found = self.documents[flat]["input_ids"]
        by_row = dict(zip(flat, found))
        return [[list(by_row[i]) for i in rows if len(by_row[i])] for rows in wanted]

    def example(self, query: Sequence[int], retrieved: Sequence[Sequence[int]], rng: np.random.Generator,
                name: str = "") -> list[int]:
        """One sample's ids (laid out, masked, truncated; not padded)."""
        layout = self.layout
        query = _flat_ids(query, f"Example{name}'s input_ids", self._vocab_size)
        if len(query) + 2 > self.max_length:
            raise ValueError(
                f"Example{name} is {len(query) + 2} tokens long with its <eos> tokens, more than max_length="
                f"{self.max_length}: it cannot fit even without retrieved documents (pre-tokenize with --max-length "
                f"to skip such examples)."
            )
        num_spans = self.num_spans(rng)
        retrieved = [_flat_ids(d, f"A document retrieved for example{name}", self._vocab_size) for d in retrieved]
        length = len(query) + 2 + sum(len(d) + 1 for d in retrieved)
        while retrieved and length + 3 * num_spans > self.max_length:
            length -= len(retrieved.pop(0)) + 1
        num_spans = min(num_spans, (self.max_length - length) // 3)
        ids = layout.sequence(query, retrieved)
        return layout.infill(ids, self.sample_spans(ids, num_spans, rng))

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("The batch is empty: the collator needs at least one example.")
        retrieved = self._retrieved(features)
        samples = []
        for i, (feature, docs) in enumerate(zip(features, retrieved)):
            name = f" {feature['source_index']}" if feature.get("source_index") is not None else f" {i} of the batch"
            samples.append(self.example(feature["input_ids"], docs, self._rng(feature), name))
        width = max(map(len, samples))
        if self.pad_to_multiple_of:
            width = min(self.max_length, math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        input_ids = torch.full((len(samples), width), self.layout.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, ids in enumerate(samples):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        sentinels = torch.tensor(self.layout.sentinel_token_ids)
        labels = labels.masked_fill(torch.isin(input_ids, sentinels), IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Cm3LeonCollatorEpochCallback(TrainerCallback):
    """Tell a `Cm3LeonDataCollator` which epoch begins, so that every epoch draws new spans (and a resumed run draws the
    spans of the uninterrupted one). Add it to the `Trainer`'s callbacks next to the collator. With
    `dataloader_persistent_workers=True` the workers keep the epoch they started with."""

    def __init__(self, collator: Cm3LeonDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int((state.epoch or 0) + 1e-6)  # the index of the epoch that begins


__all__ = ["Cm3LeonCollatorEpochCallback", "Cm3LeonDataCollator", "IGNORE_INDEX"]
