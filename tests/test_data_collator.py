"""Cm3LeonDataCollator: the CM3 objective (spans inside one modality, moved to the end, undone exactly), labels,
truncation that never cuts a document, the span-count distribution, determinism and bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cm3leon_hf.data_collator import IGNORE_INDEX, Cm3LeonCollatorEpochCallback, Cm3LeonDataCollator
from cm3leon_hf.layout import Cm3LeonLayout


@pytest.fixture
def layout(tiny_config):
    return Cm3LeonLayout.of(tiny_config)


def random_document(rng, layout, text_length=None):
    """`text <break> image` with random BPE-range text ids and a full image of random codes."""
    text_length = int(rng.integers(1, 12)) if text_length is None else text_length
    text = rng.integers(100, 1000, text_length).tolist()
    image = (layout.image_token_offset + rng.integers(0, layout.image_vocab_size, layout.image_seq_length)).tolist()
    return layout.document(text, image)


@pytest.fixture
def corpus(layout):
    rng = np.random.default_rng(0)
    return [{"input_ids": random_document(rng, layout)} for _ in range(64)]


def features(corpus, rows, num_docs=3, rng=None):
    rng = rng or np.random.default_rng(1)
    out = []
    for row in rows:
        others = [i for i in range(len(corpus)) if i != row]
        out.append({"input_ids": corpus[row]["input_ids"], "source_index": row,
                    "retrieved_indices": rng.choice(others, num_docs, replace=False).tolist()})
    return out


def unpadded(batch, row):
    length = int(batch["attention_mask"][row].sum())
    return batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist()


def spans_of(layout, ids):
    """The infill targets `<mask:i> span <eoss>` of a masked sample, as {sentinel: span}."""
    body = ids[:-1] if ids[-1] == layout.eos_token_id else ids
    places = [i for i, t in enumerate(body) if t == layout.mask_token_id]
    if len(places) < 2:
        return {}
    spans, i, rest = {}, 0, body[places[1]:]
    while i < len(rest):
        end = rest.index(layout.eoss_token_id, i)
        spans[rest[i]] = rest[i + 1 : end]
        i = end + 1
    return spans


def test_samples_undo_to_the_layout_and_spans_stay_in_one_modality(layout, corpus):
    collator = Cm3LeonDataCollator(layout, documents=corpus, max_length=1024, seed=3)
    masked_samples = 0
    for start in range(0, 64, 8):
        feats = features(corpus, range(start, start + 8), rng=np.random.default_rng(start))
        batch = collator(feats)
        for row, feature in enumerate(feats):
            ids, _ = unpadded(batch, row)
            docs = [corpus[i]["input_ids"] for i in feature["retrieved_indices"]]
            original = layout.sequence(feature["input_ids"], docs)
            assert layout.undo_infill(ids) == original
            spans = spans_of(layout, ids)
            masked_samples += bool(spans)
            sentinels = [t for t in ids if t in layout.sentinel_token_ids]
            # every sentinel twice: once in place, once before its span; numbered 0, 1, ... in order
            assert sorted(sentinels) == sorted(list(layout.sentinel_token_ids[: len(spans)]) * 2)
            for span in spans.values():
                assert span and not set(span) & layout.structural_token_ids
                kinds = {layout.is_image_token(t) for t in span}
                assert len(kinds) == 1  # one modality: never across <break> (undo_infill above proves the placement)
    assert 0.4 < masked_samples / 64 < 0.85  # P(n > 0) = 1 - e^-1 = 0.63


def test_labels_are_the_ids_except_sentinels_and_padding(layout, corpus):
    batch = Cm3LeonDataCollator(layout, documents=corpus, max_length=1024, seed=5)(features(corpus, range(16)))
    expected = batch["input_ids"].clone()
    expected[torch.isin(expected, torch.tensor(layout.sentinel_token_ids))] = IGNORE_INDEX
    expected[batch["attention_mask"] == 0] = IGNORE_INDEX
    assert torch.equal(batch["labels"], expected)
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()  # padding was exercised
    assert set(batch["input_ids"][batch["attention_mask"] == 0].tolist()) == {layout.pad_token_id}
    for row in range(16):  # right padding: ones then zeros
        mask = batch["attention_mask"][row]
        assert torch.equal(mask, torch.sort(mask, descending=True).values)


def test_span_count_follows_clamped_poisson(layout):
    collator = Cm3LeonDataCollator(layout, max_length=1024, seed=0)
    rng = np.random.default_rng(0)
    counts = np.bincount([collator.num_spans(rng) for _ in range(4000)], minlength=17)
    pmf = stats.poisson.pmf(np.arange(5), 1.0)
    expected = np.append(pmf, 1 - pmf.sum()) * 4000  # 0, 1, 2, 3, 4, >= 5
    observed = np.append(counts[:5], counts[5:].sum())
    assert stats.chisquare(observed, expected).pvalue > 0.01
    # paper form: causal share fixed, otherwise Clamp(Poisson(1), 1, 16)
    paper = Cm3LeonDataCollator(layout, max_length=1024, causal_fraction=0.25)
    draws = np.array([paper.num_spans(rng) for _ in range(4000)])
    assert abs((draws == 0).mean() - 0.25) < 0.03
    positive = draws[draws > 0]
    assert abs((positive == 1).mean() - 2 * math.exp(-1)) < 0.04  # P(max(X, 1) = 1) = P(0) + P(1)
    assert positive.max() <= len(layout.sentinel_token_ids)


def test_requested_spans_are_placed_in_long_samples(layout, corpus):
    collator = Cm3LeonDataCollator(layout, documents=corpus, max_length=1024, seed=0)
    rng = np.random.default_rng(7)
    ids = layout.sequence(corpus[0]["input_ids"], [corpus[i]["input_ids"] for i in (1, 2, 3)])
    placed = []
    for n in (1, 2, 3, 4):
        for _ in range(50):
            spans = collator.sample_spans(ids, n, rng)
            placed.append(len(spans) == n)
            assert spans == sorted(spans)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
            segments = layout.segments(ids)
            assert all(any(s <= a and b <= e for s, e, _ in segments) for a, b in spans)
    assert np.mean(placed) > 0.95


def test_truncation_drops_retrieved_documents_first_and_never_cuts_an_image(layout, corpus):
    query_length = len(corpus[0]["input_ids"]) + 2
    doc_lengths = [len(corpus[i]["input_ids"]) + 1 for i in (1, 2, 3)]
    # room for the query and its last document only (+ the infill tokens of up to 2 spans)
    max_length = query_length + doc_lengths[2] + 6
    collator = Cm3LeonDataCollator(layout, documents=corpus, max_length=max_length, seed=0)
    for seed in range(40):
        collator.seed = seed
        batch = collator([{"input_ids": corpus[0]["input_ids"], "source_index": 0, "retrieved_indices": [1, 2, 3]}])
        ids, _ = unpadded(batch, 0)
        assert len(ids) <= max_length
        original = layout.undo_infill(ids)
        assert original in (
            layout.sequence(corpus[0]["input_ids"], [corpus[3]["input_ids"]]),
            layout.sequence(corpus[0]["input_ids"]),
        )
        for start, end, is_image in layout.segments(original):
            if is_image:
                assert end - start == layout.image_seq_length
    # a query that cannot fit alone is named
    short = Cm3LeonDataCollator(layout, documents=corpus, max_length=query_length - 1)
    with pytest.raises(ValueError, match=r"Example 0 is \d+ tokens long .* cannot fit even without retrieved"):
        short([{"input_ids": corpus[0]["input_ids"], "source_index": 0}])


def test_spans_shrink_to_fit_when_no_document_is_left(layout, corpus):
    query = corpus[0]["input_ids"]
    collator = Cm3LeonDataCollator(layout, max_length=len(query) + 2 + 3, causal_fraction=0.0, seed=0)
    for seed in range(20):
        collator.seed = seed
        ids, _ = unpadded(collator([{"input_ids": query, "source_index": 0}]), 0)
        assert len(ids) <= len(query) + 5 and len(spans_of(layout, ids)) <= 1
        assert layout.undo_infill(ids) == layout.sequence(query)


def test_randomness_is_a_function_of_seed_epoch_and_example(layout, corpus):
    collator = Cm3LeonDataCollator(layout, documents=corpus, max_length=1024, seed=11)
    feats = features(corpus, range(12))
    whole = collator(feats)
    alone = [unpadded(collator([f]), 0)[0] for f in feats]
    assert [unpadded(whole, i)[0] for i in range(12)] == alone  # batch composition does not matter
    collator.epoch = 1
    assert [unpadded(collator(feats), i)[0] for i in range(12)] != alone  # a new epoch masks anew
    callback = Cm3LeonCollatorEpochCallback(collator)
    callback.on_epoch_begin(None, type("State", (), {"epoch": 2.0})(), None)
    assert collator.epoch == 2


def test_bad_input_is_named(layout, corpus, tiny_config):
    with pytest.raises(ValueError, match="no `documents`"):
        Cm3LeonDataCollator(layout, max_length=1024)(features(corpus, [0]))
    with pytest.raises(ValueError, match="max_length"):
        Cm3LeonDataCollator(layout)
    assert Cm3LeonDataCollator(tiny_config).max_length == tiny_config.max_position_embeddings
    for kwargs, message in (({"max_spans": 17}, "max_spans"), ({"causal_fraction": 1.5}, "causal_fraction"),
                            ({"poisson_lambda": float("nan")}, "poisson_lambda"),
                            ({"num_retrieved_docs": -1}, "num_retrieved_docs")):
        with pytest.raises(ValueError, match=message):
            Cm3LeonDataCollator(layout, max_length=1024, **kwargs)


def test_nested_or_non_integer_ids_are_named(layout, corpus):
    """A processor's output for one text is a batch of one (`[[...]]`): named, with the fix, not a TypeError deep in
    the layout; float ids are refused, numpy and tensor ids accepted."""
    collator = Cm3LeonDataCollator(layout, documents=corpus, max_length=1024)
    ids = corpus[0]["input_ids"]
    with pytest.raises(ValueError, match=r"Example 0 of the batch's input_ids must be a flat sequence.*take \[0\]"):
        collator([{"input_ids": [list(ids)], "retrieved_indices": []}])
    with pytest.raises(ValueError, match="flat sequence of token ids, found float"):
        collator([{"input_ids": [float(i) for i in ids], "retrieved_indices": []}])
    nested = Cm3LeonDataCollator(layout, documents=[{"input_ids": [list(ids)]}], max_length=1024)
    with pytest.raises(ValueError, match="A document retrieved for example 0 of the batch must be a flat"):
        nested([{"input_ids": ids, "retrieved_indices": [0]}])
    as_list = collator([{"input_ids": list(ids), "retrieved_indices": [], "source_index": 0}])
    as_tensor = collator([{"input_ids": torch.tensor(ids), "retrieved_indices": [], "source_index": 0}])
    assert torch.equal(as_list["input_ids"], as_tensor["input_ids"])


def test_empty_retrieved_documents_are_left_out(layout, corpus):
    documents = [*corpus, {"input_ids": []}]  # a row skipped at pre-tokenization
    collator = Cm3LeonDataCollator(layout, documents=documents, max_length=1024, causal_fraction=1.0)
    ids, _ = unpadded(collator([{"input_ids": corpus[0]["input_ids"], "source_index": 0,
                                 "retrieved_indices": [64, 5]}]), 0)
    assert ids == layout.sequence(corpus[0]["input_ids"], [corpus[5]["input_ids"]])
