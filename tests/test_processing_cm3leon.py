"""Cm3LeonProcessor with the shipped tiny tokenizers: the document layout, padding, decoding into text and images,
the unconditional prompt, save → AutoProcessor round trips, Hub upload, model-config checks and bad input."""

import json

import huggingface_hub
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.processing_cm3leon import Cm3LeonProcessor
from cm3leon_hf.synthetic import make_row
from conftest import HUB_CONFIGS

L = 64  # image_seq_length of cm3leon-tiny


@pytest.fixture(scope="module")
def processor():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH)


@pytest.fixture(scope="module")
def rows():
    return [make_row("text_to_image", "test", i) for i in range(3)]


def text_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_shipped_processor_matches_the_tiny_config(processor, tiny_config):
    processor.validate_model_config(tiny_config)
    assert processor.image_seq_length == tiny_config.image_seq_length == L
    assert processor.image_token_ids == tiny_config.image_token_ids
    assert processor.sentinel_token_ids == tiny_config.sentinel_token_ids
    processor_files = [TINY_PATH / "tokenizer.json", TINY_PATH / "tokenizer_config.json",
                       TINY_PATH / "processor_config.json", *(TINY_PATH / "image_tokenizer").iterdir()]
    # Small enough to ship inside the package: the widened VQ is 11.5 MB of it (fp32), a wheel file may be 100 MB;
    # with the bundled model (16.8 MB) and its memory bank, the whole directory stays under 40 MB.
    assert sum(p.stat().st_size for p in processor_files) < 16_000_000
    assert sum(p.stat().st_size for p in TINY_PATH.rglob("*") if p.is_file()) < 40_000_000
    assert not [p for p in TINY_PATH.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # no pickle


def test_caption_image_pair_layout(processor, rows):
    row = rows[0]
    ids = processor(row["text"], images=row["images"])["input_ids"][0]
    caption = row["text"].removesuffix(" <break> <image>")
    codes = processor.image_tokenizer.encode(row["images"])[0] + processor.image_token_offset
    assert ids == [processor.eos_token_id, *text_ids(processor, caption), processor.break_token_id, *codes.tolist()]
    image_part = [i for i in ids if i in processor.image_token_ids]
    assert image_part == ids[-L:] and len(image_part) == L  # the codes, and only there
    assert all(i < processor.text_vocab_size for i in ids[:-L])
    assert processor(row["text"], images=row["images"], prepend_eos=False)["input_ids"][0] == ids[1:]


def test_whitespace_around_markers_does_not_matter(processor, rows):
    image = rows[0]["images"][0]
    variants = ["a red star<break><image>", "a red star <break> <image>", "  a red star\n<break>\t<image>  "]
    encoded = [processor(v, images=[image])["input_ids"][0] for v in variants]
    assert encoded[0] == encoded[1] == encoded[2]
    assert processor("a<mask:3>b<eoss>")["input_ids"][0] == [1, *text_ids(processor, "a"), 7,
                                                            *text_ids(processor, "b"), 3]  # fmt: skip


def test_batch_padding_and_masks(processor, rows):
    texts = ["a red star <break> <image>", "a blue circle", "<break> <image> <break> two shapes"]
    images = [rows[0]["images"], [], rows[1]["images"]]
    single = processor(texts, images=images, padding=False)["input_ids"]
    longest = max(map(len, single))
    right = processor(texts, images=images)
    left = processor(texts, images=images, padding_side="left", return_tensors="pt")
    for ids, row, mask, left_row, left_mask in zip(
        single, right["input_ids"], right["attention_mask"], left["input_ids"].tolist(), left["attention_mask"].tolist()
    ):
        pad = longest - len(ids)
        assert row == ids + [0] * pad and mask == [1] * len(ids) + [0] * pad
        assert left_row == [0] * pad + ids and left_mask == [0] * pad + [1] * len(ids)
    assert left["input_ids"].shape == (3, longest) and left["input_ids"].dtype == torch.long
    flat = processor(texts, images=[rows[0]["images"][0], rows[1]["images"][0]])  # images in order over the batch
    assert flat["input_ids"] == right["input_ids"]
    # One document alone: the same text ids and image run. Its codes may differ in a rare near-tie: the VQ's
    # convolutions round differently with the batch size (the CPU kernels depend on the shape), which can flip a code
    # that is almost equidistant from two codebook entries (3 of 2,560 codes on 40 test images, shipped VQ).
    alone = processor(texts[0], images=[images[0]])["input_ids"][0]
    assert len(alone) == len(single[0])
    assert sum(a != b for a, b in zip(alone, single[0])) <= 2
    assert [t for t in alone if not processor._is_image_id(t)] == [t for t in single[0] if not processor._is_image_id(t)]
    fixed = processor(texts, images=images, padding="max_length", max_length=80)
    assert {len(r) for r in fixed["input_ids"]} == {80}
    with pytest.raises(ValueError, match=f"Document 0 has {len(single[0])} ids, more than `max_length` \\(60\\)"):
        processor(texts, images=images, max_length=60)
    with pytest.raises(ValueError, match="different lengths"):
        processor(texts, images=images, padding=False, return_tensors="pt")


def test_truncation_never_cuts_through_an_image(processor, rows):
    """`truncation=True` as transformers' tokenizers take it, on the tokenizer's `truncation_side`; a cut that would
    split an image's codes drops the whole image instead."""
    text = "two shapes <break> <image> <break> a red star"
    full = processor(text, images=rows[0]["images"])["input_ids"][0]
    n = processor.image_seq_length
    image_start = full.index(processor.break_token_id) + 1
    assert all(processor._is_image_id(t) for t in full[image_start:image_start + n])
    # A cut after the image keeps it; a cut inside it drops it whole (shorter than max_length).
    after = processor(text, images=rows[0]["images"], truncation=True, max_length=image_start + n + 1)["input_ids"][0]
    assert after == full[: image_start + n + 1]
    inside = processor(text, images=rows[0]["images"], truncation=True, max_length=image_start + 10)["input_ids"][0]
    assert inside == full[:image_start]
    # Left truncation (generation prompts keep their end): a cut inside the image drops what is left of it.
    processor.tokenizer.truncation_side = "left"
    try:
        left = processor(text, images=rows[0]["images"], truncation=True, max_length=len(full) - image_start - 5)
    finally:
        processor.tokenizer.truncation_side = "right"
    assert left["input_ids"][0] == full[image_start + n:]
    # Short documents are untouched; padding still applies after truncation.
    batch = processor([text, "a blue circle"], images=[rows[0]["images"], []], truncation=True, max_length=image_start,
                      padding="max_length", return_tensors="pt")
    assert batch["input_ids"].shape == (2, image_start)
    assert batch["input_ids"][0].tolist() == full[:image_start]
    with pytest.raises(ValueError, match="`truncation` needs `max_length`"):
        processor(text, images=rows[0]["images"], truncation=True)
    with pytest.raises(ValueError, match="`truncation` must be"):
        processor(text, images=rows[0]["images"], truncation="sideways", max_length=8)


def test_decode_returns_ordered_text_and_images(processor, rows):
    row = rows[1]
    ids = processor("Describe it. <break> <image> <break> a caption <mask:0>", images=row["images"])["input_ids"][0]
    segments = processor.decode(ids)
    assert segments[0] == "<eos> Describe it. <break>"
    assert isinstance(segments[1], Image.Image) and segments[1].size == (64, 64)
    assert segments[2] == "<break> a caption <mask:0>"
    expected = processor.image_tokenizer.decode(processor.image_tokenizer.encode(row["images"]))[0]
    assert segments[1].tobytes() == expected.tobytes()
    assert processor.decode(torch.tensor(ids), skip_special_tokens=True)[::2] == ["Describe it.", "a caption"]


def test_text_encode_decode_encode_is_the_identity(processor):
    canonical = "<eos> Question: what colour is the star? <break> The answer is red. <eoss>"
    ids = processor(canonical, prepend_eos=False)["input_ids"][0]
    assert processor.decode(ids) == [canonical]
    assert processor("héllo wörld 😀 (12, 255)")["input_ids"][0][1:] == text_ids(processor, "héllo wörld 😀 (12, 255)")
    assert processor.decode(processor("héllo wörld 😀 (12, 255)")["input_ids"][0], skip_special_tokens=True) == [
        "héllo wörld 😀 (12, 255)"
    ]


def test_batch_decode_drops_padding_when_skipping_specials(processor, rows):
    batch = processor(["a red star <break> <image>", "a blue circle"], images=[rows[0]["images"], []],
                      padding_side="left", return_tensors="pt")  # fmt: skip
    decoded = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded[0][0] == "a red star" and isinstance(decoded[0][1], Image.Image)
    assert decoded[1] == ["a blue circle"]
    assert processor.batch_decode(batch["input_ids"])[1][0].startswith("<pad> <pad>")


def test_incomplete_image_runs(processor, rows):
    full = processor("x <break> <image>", images=rows[0]["images"])["input_ids"][0]
    cut = full[:-5]
    with pytest.raises(ValueError, match=f"run of {L - 5} image ids .* the last image has {L - 5} ids"):
        processor.decode(cut)
    segments = processor.decode(cut, incomplete_images="codes")
    assert segments[0] == "<eos> x <break>"
    assert torch.equal(segments[1], torch.tensor(full[-L:-5]) - processor.image_token_offset)
    two = processor.decode(full + full[-L:] + full[-3:], incomplete_images="codes")  # 2 images and 3 codes, no break
    assert [type(s).__name__ for s in two] == ["str", "Image", "Image", "Tensor"] and two[3].shape == (3,)
    with pytest.raises(ValueError, match="incomplete_images"):
        processor.decode(full, incomplete_images="drop")


def test_image_token_helpers(processor, rows):
    images = [rows[0]["images"][0], rows[1]["images"][0]]
    ids = processor.get_image_tokens(images)
    assert ids.shape == (2, L) and ids.min() >= 1024 and ids.max() < 1024 + 2048
    assert torch.equal(ids, processor.image_tokenizer.encode(images) + 1024)
    decoded = processor.decode_image_tokens(ids)
    assert [d.tobytes() for d in decoded] == [d.tobytes() for d in processor.image_tokenizer.decode(ids - 1024)]
    with pytest.raises(ValueError, match=r"Id 5 is not an image id \[1024, 3072\)"):
        processor.decode_image_tokens(torch.full((L,), 5))
    with pytest.raises(ValueError, match=r"Id 3072 is not an image id"):
        processor.decode_image_tokens([3072] * L)
    with pytest.raises(ValueError, match=r"Id 3100 is neither a text id \[0, 1024\) nor an image id"):
        processor.decode([1, 2, 3100])
    with pytest.raises(ValueError, match=r"one sequence of integer ids, got shape \(1, 3\)"):
        processor.decode(torch.tensor([[1, 2, 3]]))


def test_encode_prompt_returns_every_stream(processor, rows):
    """diffusers' `encode_prompt` habit: one call gives the conditional and the unconditional stream (and the
    image-only stream of an editing prompt), with masks, in the layout's form."""
    text = processor.tokenizer("a red star", add_special_tokens=False)["input_ids"]
    streams = processor.encode_prompt("a red star")
    assert streams["input_ids"].tolist() == [[1, *text, 2]]  # <eos> a red star <break>
    assert streams["uncond_input_ids"].tolist() == [[1, 4, 2]]  # <eos> <mask:0> <break>
    assert streams["attention_mask"].tolist() == [[1] * (len(text) + 2)] and "image_cond_input_ids" not in streams
    codes = processor.get_image_tokens(rows[0]["images"])[0].tolist()
    edit = processor.encode_prompt("a red star", image=rows[0]["images"][0], template="{prompt} <break> <image> <break>")
    assert edit["input_ids"].tolist() == [[1, *text, 2, *codes, 2]]
    assert edit["image_cond_input_ids"].tolist() == [[1, 4, 2, *codes, 2]]
    assert edit["uncond_input_ids"].tolist() == [[1, 4, 2]]


def test_save_then_auto_processor_gives_identical_ids(processor, rows, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "image_tokenizer" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "processor_config.json").read_text()) == {
        "auto_map": {"AutoProcessor": "processing_cm3leon.Cm3LeonProcessor"},  # with its code, for the Hub
        "image_token_offset": 1024, "prepend_eos": True, "processor_class": "Cm3LeonProcessor", "text_vocab_size": 1024,
    }  # fmt: skip
    assert (tmp_path / "processing_cm3leon.py").is_file()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Cm3LeonProcessor
    texts = [r["text"] for r in rows] + ["Question: what is it? <break> <image>"]
    images = [r["images"] for r in rows] + [rows[0]["images"]]
    assert loaded(texts, images=images)["input_ids"] == processor(texts, images=images)["input_ids"]
    expected = [*text_ids(processor, "a"), 2, *text_ids(processor, "b")]
    assert AutoTokenizer.from_pretrained(tmp_path)("a<break>b")["input_ids"] == expected


def test_push_to_hub_uploads_everything_in_one_commit(processor, monkeypatch):
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        uploaded["repo"], uploaded["message"] = repo_id, commit_message
        uploaded["files"] = sorted(op.path_in_repo for op in operations)
        return "commit-url"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    assert processor.push_to_hub("me/cm3leon-tiny") == "commit-url"
    assert uploaded["repo"] == "me/cm3leon-tiny" and uploaded["message"] == "Upload processor"
    assert {
        "processor_config.json", "tokenizer.json", "tokenizer_config.json", "image_tokenizer/config.json",
        "image_tokenizer/diffusion_pytorch_model.safetensors", "image_tokenizer/image_tokenizer_config.json",
    } <= set(uploaded["files"])  # fmt: skip


def test_mismatched_model_config_is_rejected(processor, tiny_config):
    fields = {
        "text_vocab_size": 2048, "image_vocab_size": 1024, "image_token_offset": 1100, "image_seq_length": 256,
        "eos_token_id": 3, "eoss_token_id": 1, "sentinel_token_start_id": 20, "num_sentinel_tokens": 8,
    }  # fmt: skip
    for field, value in fields.items():
        config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny", **{field: value})
        with pytest.raises(ValueError, match=f"`{field}`"):
            processor.validate_model_config(config)
    with pytest.raises(ValueError, match="`text_vocab_size` \\(56320\\) does not match the processor's \\(1024\\)"):
        Cm3LeonProcessor.from_pretrained(TINY_PATH, model_config=Cm3LeonConfig())
    assert Cm3LeonProcessor.from_pretrained(TINY_PATH, model_config=tiny_config).image_seq_length == L


def test_bad_input_raises_errors_naming_the_problem(processor, rows):
    image = rows[0]["images"][0]
    with pytest.raises(ValueError, match=r"not valid Unicode: '\\udcff' at character 6"):
        processor(["a red star", b"a red \xff star".decode("utf-8", errors="surrogateescape")])
    with pytest.raises(ValueError, match="2 `<image>` placeholders but 1 images"):
        processor("<image> <break> <image>", images=[image])
    with pytest.raises(ValueError, match="Document 1 has 0 `<image>` placeholders but 1 images"):
        processor(["<image>", "text"], images=[[image], [image]])
    with pytest.raises(ValueError, match="`images` has 1 lists for 2 documents"):
        processor(["<image>", "text"], images=[[image]])
    with pytest.raises(ValueError, match="1 `<image>` placeholders but 0 images"):
        processor("a <break> <image>")
    with pytest.raises(ValueError, match="Image 0: cannot decode the image bytes"):
        processor("a <break> <image>", images=[b"not an image"])
    with pytest.raises(ValueError, match=r"Image 0 has zero size \(0×0\)"):
        processor("a <break> <image>", images=[Image.new("RGB", (0, 0))])
    with pytest.raises(ValueError, match="`text` must be a string"):
        processor([])
    with pytest.raises(TypeError, match="stride"):
        processor("a", stride=2)
    with pytest.raises(ValueError, match="padding_side"):
        processor(["a", "bb"], padding_side="middle")


def test_tokenizer_and_layout_are_checked_at_construction(processor):
    tokenizer, image_tokenizer = processor.tokenizer, processor.image_tokenizer
    with pytest.raises(ValueError, match="more than `text_vocab_size` \\(100\\)"):
        Cm3LeonProcessor(tokenizer, image_tokenizer, text_vocab_size=100)
    with pytest.raises(ValueError, match="`image_token_offset` \\(1000\\) overlaps the text ids"):
        Cm3LeonProcessor(tokenizer, image_tokenizer, text_vocab_size=1024, image_token_offset=1000)
    with pytest.raises(ValueError, match="must be a `Cm3LeonImageTokenizer`"):
        Cm3LeonProcessor(tokenizer, image_tokenizer.vq_model)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"lacks the special tokens \['<break>', '<eoss>', '<mask:0>'\]"):
        Cm3LeonProcessor(plain, image_tokenizer, text_vocab_size=1024)


# ------------------------------------------------------------------------------------------ case and unknown words

UPPER = "A LARGE RED TRIANGLE AT THE TOP RIGHT ON A WHITE BACKGROUND"


@pytest.mark.parametrize("prompt", [UPPER, UPPER.title(), UPPER.capitalize(), "a LARGE red Triangle at the top right on a White background"])
def test_upper_and_mixed_case_prompts_give_the_lower_case_ids(processor, prompt):
    lower = processor(UPPER.lower() + " <break>")["input_ids"][0]
    assert processor(prompt + " <break>")["input_ids"][0] == lower
    streams, expected = processor.encode_prompt(prompt), processor.encode_prompt(UPPER.lower())
    assert all(torch.equal(streams[k], expected[k]) for k in expected)
    assert processor.decode(lower)[0] == "<eos> " + UPPER.lower() + " <break>"
    # the BPE alone splits the upper-case words into letters: the reason for case folding
    assert len(text_ids(processor, UPPER)) > 2 * len(text_ids(processor, UPPER.lower()))


def test_the_worlds_own_cased_text_keeps_its_ids():
    from cm3leon_hf.synthetic import build_tasks
    from cm3leon_hf.tokenization_cm3leon import split_markers

    processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    world = build_tasks(num_train=60, num_validation=0, num_test=0, num_heldout=0)["train"]
    cased = 0
    for text in world["text"]:
        for piece in split_markers(text, processor._marker_pattern):
            if piece not in processor._marker_ids and piece != "<image>":
                assert processor.fold_case(piece) == piece and processor.unknown_words(piece) == []
                cased += piece != piece.lower()
    assert cased > 100  # templates ("Edit the image…", "Question:") and long captions ("The image shows…")
    edit = "Edit the image following the text instruction"
    assert text_ids(processor, edit) == processor(edit, prepend_eos=False)["input_ids"][0]
    assert len(processor(edit, prepend_eos=False)["input_ids"][0]) < len(processor(edit.lower(), prepend_eos=False)["input_ids"][0])


def test_markers_are_not_case_folded(processor):
    ids = processor("A RED STAR <break> <mask:0> <eoss>")["input_ids"][0]
    assert ids[-3:] == [processor.break_token_id, processor.mask_token_id, processor.eoss_token_id]
    # markers are case-sensitive, and folding never makes one out of text
    shouting = processor("A RED STAR <BREAK>", prepend_eos=False)["input_ids"][0]
    assert processor.break_token_id not in shouting and shouting == text_ids(processor, "A RED STAR <BREAK>")


@pytest.mark.parametrize("prompt,unknown", [("a cat on a mat", ["cat", "mat"]),
                                            ("a bleu circle on a white backgorund", ["bleu", "backgorund"]),
                                            ("A CAT ON A MAT <break>", ["cat", "mat"])])
def test_unknown_words_are_named_in_a_warning(processor, prompt, unknown):
    from cm3leon_hf.processing_cm3leon import UnknownWordsWarning

    assert processor.unknown_words(prompt) == unknown
    with pytest.warns(UnknownWordsWarning, match=str(sorted(unknown)).replace("[", r"\[").replace("]", r"\]")):
        processor(prompt)
    with pytest.warns(UnknownWordsWarning):
        processor.encode_prompt(prompt.replace(" <break>", ""))


def test_known_words_do_not_warn(processor, recwarn):
    processor(["a large red circle at the top left on a white background", "Question: how many shapes? two <break>"])
    assert not [w for w in recwarn if "never learned" in str(w.message)]
