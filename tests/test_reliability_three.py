"""Reliability, round three (issue 28): nothing deleted that a command did not write, no training that ends
"successfully" with non-finite weights, every corrupt file named, and the inputs that generation, the collator,
pre-tokenization and the CLI used to accept or crash on. Each test failed before its fix."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cm3leon_hf import Cm3LeonProcessor, pretokenized
from cm3leon_hf.pretrained import CLIP_PATH, TINY_PATH
from cm3leon_hf.synthetic import build_task
from conftest import REPO


@pytest.fixture(scope="module")
def processor():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH)


@pytest.fixture(scope="module")
def pairs():
    return build_task("text_to_image", num_train=12, num_validation=0, num_test=0, num_heldout=0)["train"]


def pretokenize(pairs, processor, directory, **kwargs):
    return pretokenized.pretokenize(pairs, processor, directory, text_column="caption", image_column="images",
                                    show_progress_bar=False, **kwargs)


def tree(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ------------------------------------------------------------------------------------ 1. nothing deleted not ours


@pytest.mark.parametrize("overwrite", [False, True])
def test_pretokenize_refuses_a_folder_of_other_files_and_deletes_nothing(tmp_path, pairs, processor, overwrite):
    """It used to replace `D/data/` (deleting `D/data/precious.csv`), and `overwrite` emptied `D`."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.csv").write_text("a,b\n1,2\n")
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"is not empty and does not hold pre-tokenized data .*"
                                         r"data, notes.txt.*Nothing was deleted"):
        pretokenize(pairs, processor, tmp_path, overwrite=overwrite)
    assert tree(tmp_path) == before
    assert (tmp_path / "data" / "precious.csv").read_text() == "a,b\n1,2\n"


def test_overwrite_removes_only_what_pretokenize_wrote(tmp_path, pairs, processor):
    pretokenize(pairs, processor, tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("my notes about this data")
    with pytest.raises(ValueError, match="already holds pre-tokenized data; pass overwrite=True"):
        pretokenize(pairs, processor, tmp_path / "out")
    data = pretokenize(pairs, processor, tmp_path / "out", overwrite=True)
    assert len(data) == len(pairs)
    assert (tmp_path / "out" / "README.md").read_text() == "my notes about this data"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "data", "manifest.json"]


def test_pretokenize_script_refuses_an_unrelated_folder(tmp_path):
    sys.path.insert(0, str(REPO / "training"))
    try:
        import pretokenize as script
    finally:
        sys.path.remove(str(REPO / "training"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    argv = ["--synthetic_task", "text_to_image", "--synthetic_rows", "4", "--output_dir", str(tmp_path),
            "--no_progress", "true", "--overwrite", "true"]
    with pytest.raises(ValueError, match="Nothing was deleted"):
        script.main(argv)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_sft_pretokenize_refuses_an_unrelated_folder(tmp_path, processor):
    from cm3leon_hf.sft_data import pretokenize_sft

    rows = build_task("caption", num_train=4, num_validation=0, num_test=0, num_heldout=0)["train"]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "mine.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="Nothing was deleted"):
            pretokenize_sft(rows, processor, tmp_path, task="caption", overwrite=overwrite, show_progress_bar=False)
    assert (tmp_path / "shards" / "mine.txt").read_text() == "keep"


@pytest.fixture(scope="module")
def encoder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(CLIP_PATH), device="cpu")


def test_memory_bank_refuses_a_folder_of_other_files_and_keeps_notes_beside_a_rebuilt_bank(tmp_path, pairs, encoder):
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank

    def build(directory, **kwargs):
        return Cm3LeonMemoryBank.build(pairs, encoder, directory, text_column="caption", image_column="images",
                                       show_progress_bar=False, **kwargs)

    (tmp_path / "other" / "rows").mkdir(parents=True)
    (tmp_path / "other" / "rows" / "table.parquet").write_bytes(b"PAR1")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="does not hold a memory bank .*Nothing was deleted"):
            build(tmp_path / "other", overwrite=overwrite)
    assert tree(tmp_path / "other") == ["rows", "rows/table.parquet"]

    bank = build(tmp_path / "bank")
    (tmp_path / "bank" / "NOTES.md").write_text("built for the demo")
    rebuilt = build(tmp_path / "bank", overwrite=True)
    assert len(rebuilt) == len(bank)
    assert (tmp_path / "bank" / "NOTES.md").read_text() == "built for the demo"


# ------------------------------------------------------------------------------------ 4. damaged files named


def arrow_file(directory):
    return next((directory / "data").glob("*.arrow"))


def test_flipped_bytes_in_pretokenized_data_are_found_before_training(tmp_path, pairs, processor):
    pretokenize(pairs, processor, tmp_path / "out")
    path = arrow_file(tmp_path / "out")
    content = bytearray(path.read_bytes())
    content[-200] ^= 0x01  # a token id, not the schema: the data would load and train on a wrong token
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=rf"damaged: data/{path.name} differs .*sha256.*--overwrite"):
        pretokenized.load_pretokenized(tmp_path / "out", processor)


def test_truncated_pretokenized_data_is_named(tmp_path, pairs, processor):
    pretokenize(pairs, processor, tmp_path / "out")
    path = arrow_file(tmp_path / "out")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"damaged: data/{path.name} has 100 bytes"):
        pretokenized.load_pretokenized(tmp_path / "out")
    # data written before the manifest listed its files: still named, from loading
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["files"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"pre-tokenized data in .*data/ does not load"):
        pretokenized.load_pretokenized(tmp_path / "out")


# ------------------------------------------------------------------------------------ 2. no NaN weights saved


def pretraining_args(output_dir, **overrides):
    from cm3leon_hf.pretraining_config import Cm3LeonPretrainingConfig

    settings = dict(output_dir=str(output_dir), use_cpu=True, seed=0, max_steps=4, per_device_train_batch_size=4,
                    warmup_steps=0, save_steps=1, logging_steps=1, report_to=[], disable_tqdm=True,
                    dataloader_num_workers=0)
    return Cm3LeonPretrainingConfig(**{**settings, **overrides})


def test_a_step_that_breaks_the_weights_stops_the_run_and_the_last_checkpoint_stays_finite(tmp_path, pairs,
                                                                                          processor):
    """`--learning_rate inf` used to exit 0 with every weight NaN. 1e20 is finite (so the flag's check lets it
    through): the first step's weights are huge but finite, the next step's loss overflows."""
    from safetensors.torch import load_file

    from cm3leon_hf.checkpointing import last_complete_checkpoint
    from cm3leon_hf.pretraining_config import PretrainArguments
    from cm3leon_hf.trainer import NonFiniteTrainingError, run_pretraining

    pretokenize(pairs, processor, tmp_path / "data")
    script_args = PretrainArguments(train_data=str(tmp_path / "data"), num_retrieved_docs=0, eval_num_images=0)
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step \d+: .*NaN or infinite.*learning rate was "
                                                     r"[0-9.]+e\+\d+.*last checkpoint, .*checkpoint-\d+.*Lower --learning_rate") as info:
        run_pretraining(script_args, pretraining_args(tmp_path / "run", learning_rate=1e20))
    last = last_complete_checkpoint(str(tmp_path / "run"))
    assert last is not None and not (tmp_path / "run" / "model.safetensors").exists()
    stopped_at = int(str(info.value).split("stopped at step ")[1].split(":")[0])
    assert last.endswith(f"checkpoint-{stopped_at - 1}")
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(last, "model.safetensors")).values())


@pytest.mark.parametrize("flag, value, message", [
    ("--max_steps", "0", "--max_steps must be a positive number of steps, or -1"),
    ("--learning_rate", "inf", "--learning_rate must be a finite number >= 0"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number >= 0"),
])
def test_pretrain_refuses_a_run_that_cannot_train(tmp_path, flag, value, message):
    command = [sys.executable, str(REPO / "training" / "pretrain.py"), "--train_data", str(tmp_path / "nowhere"),
               "--output_dir", str(tmp_path / "out"), flag, value]
    result = subprocess.run(command, capture_output=True, text=True)  # PYTHONPATH: the package under test
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A copy of the bundled tiny model and processor (without its memory bank), to damage."""
    import shutil

    directory = tmp_path_factory.mktemp("saved") / "tiny"
    shutil.copytree(TINY_PATH, directory, ignore=shutil.ignore_patterns("memory_bank"))
    return directory


@pytest.fixture
def damaged(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "tiny")
    return tmp_path / "tiny"


def cut(path, keep=None):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2 if keep is None else keep])


@pytest.mark.parametrize("file, loader, message", [
    ("model.safetensors", "model", r"model in .* is damaged: model.safetensors has \d+ bytes, its header describes"),
    ("generation_config.json", "model", r"damaged: generation_config.json is not valid JSON"),
    ("config.json", "model", r"damaged: config.json is not valid JSON"),
    ("tokenizer.json", "processor", r"processor in .* is damaged: tokenizer.json is not valid JSON"),
    ("image_tokenizer/diffusion_pytorch_model.safetensors", "processor",
     r"image tokenizer in .*image_tokenizer is damaged: diffusion_pytorch_model.safetensors has"),
])
def test_a_truncated_file_is_named_with_what_to_do(damaged, file, loader, message):
    """These were SafetensorError "incomplete metadata", a bare JSONDecodeError, or (generation_config.json) a model
    that loaded with the saved decoding silently dropped."""
    from cm3leon_hf import Cm3LeonForCausalLM

    cut(damaged / file)
    load = Cm3LeonForCausalLM.from_pretrained if loader == "model" else Cm3LeonProcessor.from_pretrained
    with pytest.raises(OSError, match=message + r".*save or download it again"):
        load(damaged)


def test_a_missing_image_tokenizer_or_folder_is_named(damaged, tmp_path):
    import shutil

    from cm3leon_hf import Cm3LeonForCausalLM

    shutil.rmtree(damaged / "image_tokenizer")
    with pytest.raises(FileNotFoundError, match=r"image_tokenizer holds no image tokenizer.*copy that folder too"):
        Cm3LeonProcessor.from_pretrained(damaged)
    for load in (Cm3LeonForCausalLM.from_pretrained, Cm3LeonProcessor.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder\. Give a folder saved with save_pretrained"):
            load(tmp_path / "nowhere")
        with pytest.raises(FileNotFoundError, match=r"no such folder"):
            load("./nowhere/tiny")


def test_resume_passes_over_a_damaged_checkpoint_for_the_one_before(tmp_path, pairs, processor, capsys):
    from cm3leon_hf.checkpointing import last_complete_checkpoint
    from cm3leon_hf.pretraining_config import PretrainArguments
    from cm3leon_hf.trainer import run_pretraining

    pretokenize(pairs, processor, tmp_path / "data")
    script_args = PretrainArguments(train_data=str(tmp_path / "data"), num_retrieved_docs=0, eval_num_images=0)
    run = tmp_path / "run"
    run_pretraining(script_args, pretraining_args(run, max_steps=3, learning_rate=1e-3))
    assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-3")
    cut(run / "checkpoint-3" / "optimizer.pt")
    cut(run / "checkpoint-2" / "trainer_state.json")
    (run / "model.safetensors").unlink()  # as if stopped before the final save
    with pytest.warns(UserWarning) as caught:
        assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-1")
    messages = [str(w.message) for w in caught]
    assert any("checkpoint-3 is damaged (optimizer.pt is not a whole torch file" in m for m in messages)
    assert any("checkpoint-2 is damaged (trainer_state.json is not valid JSON" in m for m in messages)
    with pytest.warns(UserWarning, match="resuming from the checkpoint before it"):
        run_pretraining(script_args, pretraining_args(run, max_steps=3, learning_rate=1e-3))
    assert f"Resuming from {run / 'checkpoint-1'}" in capsys.readouterr().out
    assert (run / "model.safetensors").exists() and last_complete_checkpoint(str(run)) == str(run / "checkpoint-3")


# ------------------------------------------------------------------------------------ 3. generate's inputs


@pytest.fixture(scope="module")
def tiny():
    from cm3leon_hf import Cm3LeonForCausalLM

    return Cm3LeonForCausalLM.from_pretrained(TINY_PATH).eval()


@pytest.mark.parametrize("mask_shape", [(1, 9), (1, 2), (3, 4)])
def test_unguided_generate_refuses_a_mask_of_another_shape(tiny, mask_shape):
    """(1, 9) on 4 ids used to run and return other tokens than no mask; (1, 2) and (3, 4) crashed in torch."""
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(ValueError, match=rf"attention mask of `input_ids` has shape {re_tuple(mask_shape)}, its ids \(1, 4\)"):
        tiny.generate(ids, attention_mask=torch.ones(mask_shape, dtype=torch.long), max_new_tokens=2,
                      do_sample=False, image_token_constraint=False)


def re_tuple(shape):
    return r"\(" + ", ".join(map(str, shape)) + r"\)"


def test_generate_names_a_1d_or_empty_prompt(tiny):
    with pytest.raises(ValueError, match=r"shape \(3,\); it needs \(batch_size, length\) \(one prompt: `input_ids\[None\]`\)"):
        tiny.generate(torch.tensor([1, 5, 6]), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="The prompt is empty"):
        tiny.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2, do_sample=False)


def test_logits_vocab_range_must_be_a_range_of_the_vocabulary(tiny):
    """(5, 2) returned logits of width 0."""
    for bad in [(5, 2), (-1, 4), (0, tiny.config.vocab_size + 1)]:
        with pytest.raises(ValueError, match=r"`logits_vocab_range` must be \(start, end\) ids with 0 <= start < end"):
            tiny(torch.tensor([[1, 5]]), logits_vocab_range=bad)
    assert tiny(torch.tensor([[1, 5]]), logits_vocab_range=(2, 5)).logits.shape == (1, 2, 3)


@pytest.mark.parametrize("top_p", [1.5, 0, -0.1, 7])
def test_top_p_outside_0_1_is_refused_by_generate_the_pipeline_and_a_saved_config(tiny, top_p, tmp_path):
    from transformers import pipeline

    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match=r"`top_p` must be a number in \(0, 1\]"):
        tiny.generate(ids, max_new_tokens=2, do_sample=True, top_p=top_p)
    pipe = pipeline("text-to-image", model=str(TINY_PATH))
    with pytest.raises(ValueError, match=r"`top_p` must be a number in \(0, 1\]"):
        pipe("a red square", top_p=top_p)
    saved = tiny.generation_config.top_p
    try:
        tiny.generation_config.top_p = top_p  # as a generation_config.json with "top_p": 7 loads
        with pytest.raises(ValueError, match=r"`top_p of the generation config \(generation_config.json\)` must be"):
            tiny.generate(ids, max_new_tokens=2, do_sample=True)
    finally:
        tiny.generation_config.top_p = saved


# ------------------------------------------------------------------------------------ 5. the collator


@pytest.fixture(scope="module")
def collator_setup(tiny, processor):
    layout = processor.layout
    image = [layout.image_token_offset + i for i in range(layout.image_seq_length)]
    documents = [{"input_ids": layout.document([100 + i, 200], image)} for i in range(3)]
    return tiny.config, documents


@pytest.mark.parametrize("feature, message", [
    ({"input_ids": [1, 99999]}, r"Example 0 of the batch's input_ids holds the id 99999, outside the vocabulary"),
    ({"input_ids": [-5, 300]}, r"holds the id -5, outside the vocabulary"),
    ({"input_ids": []}, r"input_ids is empty"),
    ({"input_ids": [300, 301], "retrieved_indices": [-1]}, r"`retrieved_indices` holds -1, not a row of the 3 documents"),
    ({"input_ids": [300, 301], "retrieved_indices": [3]}, r"`retrieved_indices` holds 3, not a row of the 3 documents"),
])
def test_the_collator_refuses_what_the_model_cannot_use(collator_setup, feature, message):
    """Each used to collate (an empty example to [[1, 1]], -1 to the last document) or crash with an IndexError."""
    from cm3leon_hf.data_collator import Cm3LeonDataCollator

    config, documents = collator_setup
    with pytest.raises(ValueError, match=message):
        Cm3LeonDataCollator(config, documents=documents, seed=0)([feature])


def test_the_collator_refuses_settings_and_batches_it_cannot_use(collator_setup):
    from cm3leon_hf.data_collator import Cm3LeonDataCollator

    config, documents = collator_setup
    with pytest.raises(ValueError, match=r"`max_length` \(5000\) is more than the model's 1024 positions"):
        Cm3LeonDataCollator(config, documents=documents, max_length=5000)
    with pytest.raises(ValueError, match=r"`pad_to_multiple_of` must be a positive integer or None, got -8"):
        Cm3LeonDataCollator(config, documents=documents, pad_to_multiple_of=-8)
    with pytest.raises(ValueError, match="The batch is empty"):
        Cm3LeonDataCollator(config, documents=documents)([])
    batch = Cm3LeonDataCollator(config, documents=documents, pad_to_multiple_of=8)([{"input_ids": [300, 301]}])
    assert batch["input_ids"].shape[1] % 8 == 0


# ------------------------------------------------------------------------------------ 6. pre-tokenization that keeps nothing


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 0}, r"max_length \(0\) leaves no room for a document"),
    ({"max_length": 10}, r"kept no example: all 12 rows were skipped .*longer than max_length=10: 12"),
    ({"text_column": "images"}, r"kept no example: all 12 rows were skipped \(no text in 'images': 12"),
])
def test_pretokenization_that_keeps_nothing_is_an_error(tmp_path, pairs, processor, kwargs, message):
    """Each used to finish with 0 examples and exit 0."""
    settings = {"text_column": "caption", "image_column": "images", "show_progress_bar": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        pretokenized.pretokenize(pairs, processor, tmp_path / "out", **settings)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------------------- issue 28 item 8: public API crashes
@pytest.fixture(scope="module")
def tiny_model():
    from cm3leon_hf import Cm3LeonForCausalLM

    return Cm3LeonForCausalLM.from_pretrained(TINY_PATH)


@pytest.mark.parametrize("text,message", [(None, ", got NoneType"), (5, ", got int"), ([], "")])
def test_processor_names_text_that_is_not_text(processor, text, message):
    with pytest.raises(ValueError, match=f"`text` must be a string or a non-empty list of strings.*{message}"):
        processor(text)


def test_image_tokenizer_refuses_a_batch_size_of_zero(processor):
    from PIL import Image

    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        processor.image_tokenizer.encode([Image.new("RGB", (64, 64))], batch_size=0)


def test_labels_outside_the_vocabulary_are_named(tiny_model):
    ids = torch.tensor([[2, 5, 7]])
    vocab = tiny_model.config.vocab_size
    for bad in (vocab, -5):
        with pytest.raises(ValueError, match=f"labels contains the id {bad}, neither -100"):
            tiny_model(input_ids=ids, labels=torch.tensor([[2, bad, 7]]))
    loss = tiny_model(input_ids=ids, labels=torch.tensor([[-100, 5, 7]])).loss  # -100 is ignored, as in transformers
    assert torch.isfinite(loss)


def test_inputs_embeds_of_another_width_are_named(tiny_model):
    width = tiny_model.config.hidden_size
    with pytest.raises(ValueError, match=rf"hidden_size={width}\), got \(1, 3, 7\)"):
        tiny_model(inputs_embeds=torch.randn(1, 3, 7))
    ids = torch.tensor([[2, 5, 7]])
    by_ids = tiny_model(input_ids=ids).logits
    by_embeds = tiny_model(inputs_embeds=tiny_model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(by_embeds, by_ids)  # the right width is the same forward as the ids


def test_a_float_offset_is_named_not_the_vocab_size_it_makes():
    from cm3leon_hf import Cm3LeonConfig

    with pytest.raises(ValueError, match="`image_token_offset` must be an integer, got 256.0"):
        Cm3LeonConfig(image_token_offset=256.0)


@pytest.fixture(scope="module")
def edit_pipe():
    from transformers import pipeline

    import cm3leon_hf.pipelines  # noqa: F401

    return pipeline("image-text-to-image", model=str(TINY_PATH))


@pytest.mark.parametrize("template,message", [
    ("{foo} {prompt} <image>", r"only the `\{prompt\}` field, got \['foo'\]"),
    ("{prompt} <image> {", "is not a format string"),
    ("{prompt} <image> {0}", r"got \['0'\]"),
])
def test_an_edit_template_with_other_fields_is_refused_before_generating(edit_pipe, template, message):
    from PIL import Image

    with pytest.raises(ValueError, match=message):
        edit_pipe(Image.new("RGB", (64, 64)), prompt="make the star red", template=template, progress_bar=False)


def test_a_reranker_that_cannot_encode_is_refused_before_generating():
    from transformers import pipeline

    import cm3leon_hf.pipelines  # noqa: F401

    pipe = pipeline("text-to-image", model=str(TINY_PATH))
    with pytest.raises(ValueError, match="`reranker` must be a sentence-transformers CLIP model .* got object"):
        pipe("a red star", reranker=object(), num_candidates=2, progress_bar=False)


def test_retriever_sizes_are_checked_by_name():
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.retriever import Cm3LeonRetriever

    bank, encoder = Cm3LeonMemoryBank.load(TINY_PATH / "memory_bank"), SentenceTransformer(str(CLIP_PATH))
    for name in ("k", "overfetch", "batch_size"):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive integer, got 0"):
            Cm3LeonRetriever(bank, encoder, **{name: 0})
    retriever = Cm3LeonRetriever(bank, encoder)
    with pytest.raises(ValueError, match="`k` must be a positive integer, got 2.5"):
        retriever.retrieve(["a red star"], k=2.5)
    assert [len(docs) for docs in retriever.retrieve(["a red star"], k=3)] == [3]


# ------------------------------------------------- issue 28 item 9: generate(inputs_embeds=...) against the ids
@pytest.fixture(scope="module")
def image_prompt(processor):
    return processor("a red star at the top left on a white background <break>", return_tensors="pt")["input_ids"]


def _sample(model, **kwargs):
    return model.generate(max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0), **kwargs)


def test_guided_decoding_refuses_embeddings_it_would_ignore(tiny_model, image_prompt):
    """It stacked its streams from the ids and dropped the embeddings: zeros gave the ids' image."""
    embeds = tiny_model.get_input_embeddings()(image_prompt)
    for guidance in ({}, {"guidance_scale": 3.0}, {"contrastive_k": 5}):  # {}: the saved guidance (1.25) for images
        with pytest.raises(ValueError, match="cannot use `inputs_embeds`.*guidance_scale=1.0"):
            _sample(tiny_model, input_ids=image_prompt, inputs_embeds=embeds, **guidance)


def test_ids_steer_and_embeddings_feed_the_model(tiny_model, image_prompt):
    embeds = tiny_model.get_input_embeddings()(image_prompt).detach()
    by_ids = _sample(tiny_model, input_ids=image_prompt, guidance_scale=1.0)[0, -8:]
    both = _sample(tiny_model, input_ids=image_prompt, inputs_embeds=embeds, guidance_scale=1.0)[0, -8:]
    assert torch.equal(both, by_ids)  # the ids' own embeddings: the ids' tokens, constraint included
    zeros = _sample(tiny_model, input_ids=image_prompt, inputs_embeds=embeds * 0, guidance_scale=1.0)[0, -8:]
    assert not torch.equal(zeros, by_ids)  # the embeddings are what the model reads
    offset = tiny_model.config.image_token_offset
    assert bool((zeros >= offset).all())  # and the ids' layout still constrains: the continuation is an image


def test_embeddings_alone_decode_as_a_plain_causal_lm(tiny_model, image_prompt):
    embeds = tiny_model.get_input_embeddings()(image_prompt).detach()
    with pytest.warns(UserWarning, match="decodes as a plain causal LM"):
        alone = _sample(tiny_model, inputs_embeds=embeds)[0, -8:]
    plain = _sample(tiny_model, input_ids=image_prompt, guidance_scale=1.0, image_token_constraint=False)[0, -8:]
    assert torch.equal(alone, plain)
