"""The text BPE: special tokens at the config's ids, exact round trips, the whitespace rule around markers, the
paper-size code path, save/load through `AutoTokenizer`, and errors."""

import pytest
from transformers import AutoTokenizer

from cm3leon_hf import Cm3LeonConfig
from cm3leon_hf.tokenization_cm3leon import special_tokens_by_id, train_text_tokenizer

CORPUS = [
    "a red star at the top left on a white background",
    "two shapes: a small blue circle above a large green square",
    "Question: what colour is the cross? The answer is pink.",
    'Generate high quality image of "a room" with bed at location (0, 169) -> (67, 255)',
    "Describe the given picture in very detail.",
] * 20


def small_config(**kwargs) -> Cm3LeonConfig:
    defaults = dict(text_vocab_size=512, image_vocab_size=16, image_seq_length=4, max_position_embeddings=64)
    return Cm3LeonConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(CORPUS, small_config())


def test_special_tokens_sit_at_the_config_ids(tokenizer):
    config = small_config()
    assert tokenizer.pad_token_id == config.pad_token_id == 0
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == config.eos_token_id == 1
    assert tokenizer.convert_tokens_to_ids("<break>") == config.break_token_id == 2
    assert tokenizer.convert_tokens_to_ids("<eoss>") == config.eoss_token_id == 3
    masks = [f"<mask:{i}>" for i in range(config.num_sentinel_tokens)]
    assert tokenizer.convert_tokens_to_ids(masks) == config.sentinel_token_ids == list(range(4, 20))
    assert len(tokenizer) <= config.text_vocab_size
    # every learned token comes after the specials
    assert min(i for t, i in tokenizer.get_vocab().items() if not t.startswith("<")) == 20


def test_any_valid_layout_is_followed():
    config = small_config(pad_token_id=7, eos_token_id=0, bos_token_id=1, break_token_id=9, eoss_token_id=8,
                          sentinel_token_start_id=2, num_sentinel_tokens=4)
    assert special_tokens_by_id(config) == {
        0: "<eos>", 1: "<bos>", 2: "<mask:0>", 3: "<mask:1>", 4: "<mask:2>", 5: "<mask:3>",
        6: "<unused:6>", 7: "<pad>", 8: "<eoss>", 9: "<break>",
    }  # fmt: skip
    tokenizer = train_text_tokenizer(CORPUS, config)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (7, 0, 1)
    assert tokenizer.convert_tokens_to_ids(["<break>", "<eoss>", "<mask:0>", "<mask:3>"]) == [9, 8, 2, 5]


def test_paper_size_vocabulary_comes_from_the_same_code_path():
    config = Cm3LeonConfig()  # the paper's layout: 56,320 text ids
    tokenizer = train_text_tokenizer(CORPUS, config)
    assert config.text_vocab_size == 56320
    assert 276 < len(tokenizer) <= 56320  # a small corpus stops the BPE early; ids stay in the text range
    assert max(tokenizer.get_vocab().values()) < config.text_vocab_size
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<break>", "<eoss>", "<mask:0>"]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "text",
    [
        "a red star at the top left",
        "Question: (12, 255) -> (0, 7)?\nAnswer:\tnothing.",
        "héllo wörld — naïve café 😀 日本語",
        "unseen words: zyzzyva quokka",
        "multiple   spaces and trailing punctuation!!!",
    ],
)
def test_text_round_trip_is_exact(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < 512 for i in ids)


def test_whitespace_next_to_markers_is_not_encoded(tokenizer):
    tight = tokenizer("a red star<break>blue<mask:3>")["input_ids"]
    spaced = tokenizer("a red star <break>  blue <mask:3>")["input_ids"]
    assert tight == spaced
    assert tight[3] == 2 and tight[-1] == 7


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("(169, 255) 1")["input_ids"])
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "6", "9", "Ġ2", "5", "5", "Ġ1"]


def test_save_and_auto_load_give_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:5] + ["a<break>b <mask:15> <eoss> c"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.convert_tokens_to_ids("<mask:15>") == 19


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="text_vocab_size"):
        train_text_tokenizer(CORPUS, small_config(text_vocab_size=200))
    with pytest.raises(ValueError, match="must yield strings"):
        train_text_tokenizer(["ok", 3], small_config())
