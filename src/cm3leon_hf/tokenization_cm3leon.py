"""The text side of CM3Leon's vocabulary: a byte-level BPE whose special tokens sit at the ids `Cm3LeonConfig` names.

CL §2.1 trains "a custom tokenizer over the Zhang et al. (2022) data with a vocabulary size of 56320" and adds
`<break>`, the CM3 sentinels and `<eoss>` to it. We train a byte-level BPE with the `tokenizers` library from any text
iterator and expose it as a `PreTrainedTokenizerFast` (it loads with `AutoTokenizer` without this package):

```
id  0 <pad>      1 <eos>      2 <break>      3 <eoss>      4 … 19 <mask:0> … <mask:15>      (defaults of the config)
then the 256 byte tokens and the learned merges, all below `config.text_vocab_size`
```

The ids come from the config: any placement of the special ids the config accepts works, gaps below the largest
special id are filled with `<unused:i>` tokens, and a `bos_token_id` different from `eos_token_id` gets a `<bos>`.

Choices (the paper is silent):

- **Markers and whitespace.** Special tokens are written literally in text (`"a red star <break> <image>"`; `<image>`
  is the processor's placeholder for an image, not a text token). Whitespace next to a marker is never encoded:
  `"a<break><image>"` and `"a <break> <image>"` give the same ids. Text between two markers is encoded on its own
  (`split_markers`), so the BPE never sees a space before or after a marker, and the decoders write markers with one
  space on each side (`"<eos> a red star <break>"`).
- **Digits** are split one by one before the BPE (as in LLaMA; a space before a digit stays with it), so that box
  coordinates such as `(50, 50) -> (100, 100)` (CL §4.1) are written with digit tokens that every number shares.
- **Bytes.** The 256 byte tokens are always in the vocabulary, so every string encodes (no unknown token) and
  `decode(encode(text)) == text` for any text without markers and without leading/trailing whitespace.

Example:

```python
>>> from cm3leon_hf import Cm3LeonConfig
>>> from cm3leon_hf.tokenization_cm3leon import train_text_tokenizer
>>> config = Cm3LeonConfig(text_vocab_size=300, image_vocab_size=16, image_seq_length=4, max_position_embeddings=64)
>>> tokenizer = train_text_tokenizer(["a red star at the top left", "a blue circle"] * 10, config)
>>> tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4, 19])
['<pad>', '<eos>', '<break>', '<eoss>', '<mask:0>', '<mask:15>']
>>> tokenizer("a red star<break>")["input_ids"] == tokenizer("a red star <break>")["input_ids"]
True
>>> tokenizer.decode(tokenizer("a red star")["input_ids"])
'a red star'

```
"""

import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .configuration_cm3leon import Cm3LeonConfig

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
BREAK_TOKEN = "<break>"
EOSS_TOKEN = "<eoss>"
IMAGE_TOKEN = "<image>"
"""The processor's placeholder for an image in a document's text (never a text token)."""


def sentinel_token(index: int) -> str:
    """The literal form of CM3 sentinel `index`: `<mask:index>`. `<mask:0>` is the paper's `<mask>` (CFG)."""
    return f"<mask:{index}>"


def special_tokens_by_id(config: Cm3LeonConfig) -> dict[int, str]:
    """Every special token of the config's layout, by id, with `<unused:i>` fillers for the gaps below the largest.

    >>> from cm3leon_hf import Cm3LeonConfig
    >>> config = Cm3LeonConfig(text_vocab_size=64, image_vocab_size=8, image_seq_length=4, num_sentinel_tokens=2,
    ...                        max_position_embeddings=32)
    >>> special_tokens_by_id(config)
    {0: '<pad>', 1: '<eos>', 2: '<break>', 3: '<eoss>', 4: '<mask:0>', 5: '<mask:1>'}
    """
    named = {
        config.pad_token_id: PAD_TOKEN,
        config.eos_token_id: EOS_TOKEN,
        config.break_token_id: BREAK_TOKEN,
        config.eoss_token_id: EOSS_TOKEN,
    }
    if config.bos_token_id != config.eos_token_id:
        named[config.bos_token_id] = BOS_TOKEN
    for i, token_id in enumerate(config.sentinel_token_ids):
        named[token_id] = sentinel_token(i)
    return {i: named.get(i, f"<unused:{i}>") for i in range(max(named) + 1)}


def marker_pattern(markers: Iterable[str]) -> re.Pattern:
    """A regex that finds the markers in text together with the whitespace around them (longest marker first)."""
    alternatives = "|".join(re.escape(m) for m in sorted(set(markers), key=len, reverse=True))
    return re.compile(rf"\s*({alternatives})\s*")


def split_markers(text: str, pattern: re.Pattern) -> list[str]:
    """Split `text` into markers and the stripped, non-empty text between them, in order.

    >>> split_markers(" a red star<break>  <image>x ", marker_pattern(["<break>", "<image>"]))
    ['a red star', '<break>', '<image>', 'x']
    """
    pieces = pattern.split(text)  # [text, marker, text, marker, ..., text]
    out = []
    for i, piece in enumerate(pieces):
        piece = piece if i % 2 else piece.strip()
        if piece:
            out.append(piece)
    return out


def join_pieces(pieces: Iterable[str]) -> str:
    """The canonical text of a document: its pieces (text and markers) joined by single spaces."""
    return " ".join(pieces)


def train_text_tokenizer(
    texts: Iterable[str],
    config: Cm3LeonConfig,
    *,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with the special tokens of `config` at their ids.

    The target vocabulary is `config.text_vocab_size` (special tokens and 256 bytes included). A small corpus may
    stop the BPE earlier (no pair left that occurs `min_frequency` times): the vocabulary is then smaller, and every id
    stays below `text_vocab_size`. Markers inside `texts` (`<break>`, `<image>`, `<mask:i>`…) are cut out before
    training, as the processor does before encoding.

    Args:
        texts: any iterable of strings (a list, a generator over a `datasets` column…); read once, streamed.
        config: the `Cm3LeonConfig` whose `text_vocab_size` and special ids the tokenizer must follow.
        min_frequency: a merge is learned only for pairs seen at least this often.
        length: number of texts, if known (for the progress bar).
        show_progress: show the `tokenizers` progress bar.

    Returns:
        A `PreTrainedTokenizerFast` with `pad_token="<pad>"`, `eos_token="<eos>"`, `bos_token` (`"<eos>"` unless the
        config gives `<bos>` its own id) and the extra special tokens `<break>`, `<eoss>`, `<mask:0..n-1>`.
    """
    specials = special_tokens_by_id(config)
    if len(specials) + 256 > config.text_vocab_size:
        raise ValueError(
            f"`text_vocab_size` ({config.text_vocab_size}) leaves no room for the {len(specials)} special ids and the "
            f"256 byte tokens of a byte-level BPE."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),  # one digit per token (its space with it)
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.text_vocab_size,
        min_frequency=min_frequency,
        special_tokens=[_added_token(specials[i]) for i in range(len(specials))],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    pattern = marker_pattern([*specials.values(), IMAGE_TOKEN])

    def text_pieces() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"`texts` must yield strings, got {type(text).__name__}.")
            yield from (piece for piece in split_markers(text, pattern) if not pattern.fullmatch(piece))

    tokenizer.train_from_iterator(text_pieces(), trainer=trainer, length=length)
    for token_id, token in specials.items():
        if tokenizer.token_to_id(token) != token_id:  # the trainer puts `special_tokens` first, in order
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, expected {token_id}.")
    sentinels = [sentinel_token(i) for i in range(config.num_sentinel_tokens)]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=_added_token(PAD_TOKEN),
        eos_token=_added_token(EOS_TOKEN),
        bos_token=_added_token(specials[config.bos_token_id]),
        extra_special_tokens=[_added_token(t) for t in (BREAK_TOKEN, EOSS_TOKEN, *sentinels)],
        clean_up_tokenization_spaces=False,
        model_max_length=config.max_position_embeddings,
    )


def _added_token(content: str) -> AddedToken:
    # lstrip/rstrip: whitespace next to a marker is not encoded (`"a <break> b"` == `"a<break>b"`)
    return AddedToken(content, special=True, lstrip=True, rstrip=True, normalized=False, single_word=False)


__all__ = [
    "BREAK_TOKEN",
    "EOSS_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "sentinel_token",
    "special_tokens_by_id",
    "train_text_tokenizer",
]
