"""The document layout (`cm3leon_hf.layout`) on the tiny configuration's vocabulary: the documented forms of documents,
training samples and prompts (ids and marker text), segments, and CM3 infill (inverse, refusals)."""

import numpy as np
import pytest
from PIL import Image

from cm3leon_hf import Cm3LeonConfig, Cm3LeonProcessor
from cm3leon_hf.layout import MASK_TOKEN, Cm3LeonLayout, document_text, prompt_text
from cm3leon_hf.pretrained import TINY_PATH
from conftest import HUB_CONFIGS

# The tiny configuration: <pad> 0, <eos> 1, <break> 2, <eoss> 3, <mask:0..15> 4..19, text ids < 1024, image ids
# [1024, 3072), 64 per image.
PAD, EOS, BREAK, EOSS, MASK = 0, 1, 2, 3, 4
TEXT_IDS = (20, 1024)


@pytest.fixture(scope="module")
def layout():
    return Cm3LeonLayout.of(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny"))


@pytest.fixture(scope="module")
def processor():
    return Cm3LeonProcessor.from_pretrained(TINY_PATH)  # the tiny configuration's trained BPE and VQ


def random_text(rng, low=1, high=12):
    return rng.integers(*TEXT_IDS, size=int(rng.integers(low, high))).tolist()


def random_image(rng, layout):
    codes = rng.integers(0, layout.image_vocab_size, size=layout.image_seq_length)
    return (codes + layout.image_token_offset).tolist()


def random_sample(rng, layout, max_docs=2):
    """`<eos> [doc <break>]* text <break> image <eos>` with random text and codes."""
    def document():
        return layout.document(random_text(rng), random_image(rng, layout))

    return layout.sequence(document(), [document() for _ in range(int(rng.integers(0, max_docs + 1)))])


def random_spans(rng, layout, ids, max_spans):
    """Sorted, non-overlapping, non-empty spans, each inside one segment of `ids` (a closing <eos> excluded)."""
    body = len(ids) - 1 if ids[-1] == layout.eos_token_id else len(ids)
    cuts = []
    for start, end, _ in layout.segments(ids[:body]):
        position = start
        while position < end and rng.random() < 0.6:
            span_start = int(rng.integers(position, end))
            span_end = int(rng.integers(span_start + 1, min(end, span_start + 8) + 1))
            cuts.append((span_start, span_end))
            position = span_end
    chosen = sorted(rng.permutation(len(cuts))[: int(rng.integers(0, max_spans + 1))].tolist())
    return [cuts[i] for i in chosen]


# ------------------------------------------------------------------------------------------ the layout's ids


def test_layout_of_config_and_processor_agree(layout, processor):
    for source in (layout, processor.layout):  # the tiny configuration's and its shipped processor's
        specials = (source.eos_token_id, source.break_token_id, source.eoss_token_id, source.pad_token_id)
        assert specials == (EOS, BREAK, EOSS, PAD)
        assert source.mask_token_id == MASK and source.sentinel_token_ids == tuple(range(4, 20))
        assert (source.image_token_offset, source.image_vocab_size, source.image_seq_length) == (1024, 2048, 64)
    assert layout.structural_token_ids == frozenset(range(20))
    assert layout.is_image_token(1024) and layout.is_image_token(3071)
    assert not layout.is_image_token(1023) and not layout.is_image_token(3072)


def test_documents_sequences_and_prompts_have_the_documented_forms(layout):
    text, query = [300, 301], [310, 311, 312]
    image = list(range(1024, 1024 + 64))
    doc = layout.document(text, image)
    assert doc == [*text, BREAK, *image]  # text <break> image
    assert layout.sequence(doc) == [EOS, *doc, EOS]  # <eos> query <eos>
    retrieved = [layout.document([320], image), layout.document([321, 322], image)]
    assert layout.sequence(doc, retrieved) == [EOS, *retrieved[0], BREAK, *retrieved[1], BREAK, *doc, EOS]
    assert layout.prompt(query) == [EOS, *query, BREAK]  # <eos> text <break>
    assert layout.prompt(query, retrieved) == [EOS, *retrieved[0], BREAK, *retrieved[1], BREAK, *query, BREAK]
    assert layout.unconditional_prompt() == [EOS, MASK, BREAK]  # <eos> <mask:0> <break>
    # The unconditional stream is the conditional one with the text replaced by <mask:0>; both continue with an image.
    assert layout.unconditional_prompt(retrieved) == [EOS, *retrieved[0], BREAK, *retrieved[1], BREAK, MASK, BREAK]
    # A training sample whose query is the prompt continued by its image and <eos>.
    assert layout.sequence(layout.document(query, image), retrieved) == [*layout.prompt(query, retrieved), *image, EOS]


def test_document_refuses_a_wrong_image(layout):
    image = list(range(1024, 1024 + 64))
    with pytest.raises(ValueError, match="An image is 64 image ids in \\[1024, 3072\\), got 63 ids"):
        layout.document([300], image[:-1])
    with pytest.raises(ValueError, match="got 65 ids"):
        layout.document([300], [*image, 1024])
    with pytest.raises(ValueError, match="An image is 64 image ids"):
        layout.document([300], [*image[:-1], 500])  # a text id among the codes
    with pytest.raises(ValueError, match="An image is 64 image ids"):
        layout.document([300], [*image[:-1], 3072])  # past the image vocabulary


def test_marker_text_forms():
    assert MASK_TOKEN == "<mask:0>"
    assert document_text("a red star") == "a red star <break> <image>"
    assert prompt_text("a red star") == "a red star <break>"
    assert prompt_text("a red star", retrieved=["a blue star", "a cross"]) == \
        "a blue star <break> <image> <break> a cross <break> <image> <break> a red star <break>"
    assert prompt_text(None, unconditional=True) == "<mask:0> <break>"
    assert prompt_text("ignored", retrieved=["a blue star"], unconditional=True) == \
        "a blue star <break> <image> <break> <mask:0> <break>"
    assert prompt_text("a red star", prepend_eos=True) == "<eos> a red star <break>"
    with pytest.raises(ValueError, match="needs a query text"):
        prompt_text(None)


def test_marker_text_encodes_to_the_layouts_ids(layout, processor):
    """The processor turns `prompt_text` into `Cm3LeonLayout.prompt`/`unconditional_prompt` (its `<eos>` in front)."""
    def words(text):
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    codes = processor.get_image_tokens([image])[0].tolist()
    documents = [layout.document(words("a red square"), codes)]

    def encode(text, images=None, **kwargs):
        return processor(text, images=images, padding=False, **kwargs)["input_ids"][0]

    assert encode(prompt_text("a red star")) == layout.prompt(words("a red star"))
    assert encode(prompt_text(None, unconditional=True)) == layout.unconditional_prompt() == [EOS, MASK, BREAK]
    assert encode(prompt_text("a red star", ["a red square"]), [image]) == layout.prompt(words("a red star"), documents)
    assert encode(prompt_text(None, ["a red square"], unconditional=True), [image]) == \
        layout.unconditional_prompt(documents)
    assert encode(prompt_text("a red star", prepend_eos=True), prepend_eos=False) == layout.prompt(words("a red star"))
    # A training sample without its closing <eos>: retrieved document, then the query document.
    sample = f"{document_text('a red square')} <break> {document_text('a red star')}"
    query = layout.document(words("a red star"), codes)
    assert encode(sample, [image, image]) == layout.sequence(query, documents)[:-1]


# ------------------------------------------------------------------------------------------ segments


def test_segments_mark_image_runs(layout):
    text, query = [300, 301], [310]
    image, other = list(range(1024, 1088)), list(range(2000, 2064))
    sample = layout.sequence(layout.document(query, image), [layout.document(text, other)])
    # <eos> 300 301 <break> other(64) <break> 310 <break> image(64) <eos>
    assert layout.segments(sample) == [(1, 3, False), (4, 68, True), (69, 70, False), (71, 135, True)]
    for start, end, is_image in layout.segments(sample):
        run = sample[start:end]
        assert run in (text, other, query, image)
        assert is_image == (run in (image, other)) and (not is_image or len(run) == layout.image_seq_length)
    # Runs end at every structural token, also sentinels, <eoss> and <pad>; a mixed run is not an image.
    assert layout.segments([300, 1030, 1031, MASK, 1032, EOSS, PAD, 301, 19, 1040]) == [
        (0, 3, False), (4, 5, True), (7, 8, False), (9, 10, True)
    ]
    assert layout.segments([]) == [] and layout.segments([EOS, BREAK, EOS]) == []


# ------------------------------------------------------------------------------------------ CM3 infill


def test_infill_has_the_documented_form(layout):
    sample = layout.sequence(layout.document([300, 301, 302], list(range(1024, 1088))))
    masked = layout.infill(sample, [(2, 3), (5, 9)])
    # <eos> 300 <mask:0> 302 <break> <mask:1> image[4:] <mask:0> 301 <eoss> <mask:1> image[:4] <eoss> <eos>
    assert masked == [EOS, 300, MASK, 302, BREAK, MASK + 1, *range(1028, 1088),
                      MASK, 301, EOSS, MASK + 1, *range(1024, 1028), EOSS, EOS]
    assert layout.infill(sample, []) == sample and layout.undo_infill(sample) == sample
    # Without a closing <eos>, the targets simply go last.
    assert layout.infill(sample[:-1], [(2, 3)]) == [EOS, 300, MASK, 302, BREAK, *range(1024, 1088), MASK, 301, EOSS]


@pytest.mark.parametrize("seed", range(8))
def test_infill_then_undo_is_the_identity(layout, seed):
    rng = np.random.default_rng(seed)
    spans_seen = 0
    for _ in range(25):
        sample = random_sample(rng, layout)
        if rng.random() < 0.2:
            sample = sample[:-1]  # no closing <eos>
        spans = random_spans(rng, layout, sample, max_spans=len(layout.sentinel_token_ids))
        masked = layout.infill(sample, spans)
        assert len(masked) == len(sample) + 3 * len(spans)
        assert (masked[-1] == EOS) == (sample[-1] == EOS)
        assert [t for t in masked if t in layout.sentinel_token_ids] == \
            [layout.sentinel_token_ids[i] for i in range(len(spans))] * 2
        assert layout.undo_infill(masked) == sample
        spans_seen += len(spans)
    assert spans_seen > 25  # the draws do mask something


def test_infill_refuses_bad_spans(layout):
    sample = layout.sequence(layout.document([300, 301, 302], list(range(1024, 1088))),
                             [layout.document([310, 311], list(range(2000, 2064)))])
    with pytest.raises(ValueError, match="contains a structural token"):
        layout.infill(sample, [(2, 5)])  # over the <break> after 310 311
    with pytest.raises(ValueError, match="contains a structural token"):
        layout.infill(sample, [(0, 2)])  # the leading <eos>
    with pytest.raises(ValueError, match="overlaps the previous one"):
        layout.infill(sample, [(1, 3), (2, 3)])
    with pytest.raises(ValueError, match="overlaps the previous one"):
        layout.infill(sample, [(4, 8), (1, 2)])  # not in position order
    with pytest.raises(ValueError, match="is empty"):
        layout.infill(sample, [(1, 1)])
    with pytest.raises(ValueError, match="out of range"):
        layout.infill(sample, [(len(sample) - 2, len(sample) + 1)])
    with pytest.raises(ValueError, match="17 spans but only 16 sentinel tokens"):
        layout.infill(sample, [(i, i + 1) for i in range(4, 21)])
    assert layout.undo_infill(layout.infill(sample, [(i, i + 1) for i in range(4, 20)])) == sample  # 16 is fine


def test_undo_infill_refuses_malformed_targets(layout):
    with pytest.raises(ValueError, match="has no <eoss>"):
        layout.undo_infill([EOS, 300, MASK, MASK, 301, EOS])
    with pytest.raises(ValueError, match="Expected a sentinel"):
        layout.undo_infill([EOS, 300, MASK, MASK, 301, EOSS, 302, EOS])
    with pytest.raises(ValueError, match="that the sequence does not contain"):
        layout.undo_infill([EOS, 300, MASK, MASK, 301, EOSS, MASK + 1, 302, EOSS, EOS])
