"""Processor class for CM3Leon: text and PIL images in, one sequence of ids of the joint vocabulary out — and back.

The processor bundles the text BPE tokenizer (`tokenization_cm3leon.py`) with the VQ image tokenizer
(`image_tokenizer.py`), as in CM3Leon's design card and in metaseq, where images are tokenized before the model.

**Document format.** A document is text with literal markers: `<image>` where an image goes (its codes replace the
marker) and the special tokens `<break>`, `<mask:i>`, `<eos>`, `<eoss>`, `<pad>`. The synthetic world's rows
(`text` + `images`) use this format, e.g. `"a red star at the top left <break> <image>"` (CL Fig. 8: `text <break> image`).

- Whitespace next to a marker is not encoded, nor at either end of a document: `"a<break><image>"` and
  `" a <break> <image> "` give the same ids. The text between two markers is encoded on its own.
- `<eos>` is prepended to every document by default (CM3Leon starts each document with `<eos>`, CL Fig. 9);
  `prepend_eos=False` turns it off. No other token is ever inserted: the modality switch `<break>` is written in the
  document (the paper's templates contain it), never added implicitly.
- An image becomes `image_seq_length` ids `image_token_offset + code` (raster order).

**Case.** The world writes lower case except its task prompts and sentence starts (`"Edit the image following…"`,
`"Describe the given picture."`, `"The image shows…"`), and the BPE is case-sensitive: `"A LARGE RED TRIANGLE"` falls
apart into letters. So each text piece (the text between two markers) is kept as written when the tokenizer knows
every capitalised word of it, as written, as one learned token (`"Edit"`, `" The"`; a lone capital letter is a byte
token of every BPE, not a learned one) and is lower-cased otherwise. Upper-case and title-case prompts thus give the
ids of the lower-case prompt, and the world's own cased text gives the ids it was trained on. A blanket `Lowercase`
normalizer in the tokenizer would not: it turns `"Edit"` (one id) into `"ed" "it"`, a prompt the model never saw.

**Unknown words.** A word is *known* when the BPE holds it, after case folding, as one learned token (with or
without the space in front of it): a word seen often enough in training to be merged. Any other word (`"cat"` →
`"c" "at"`, `"bleu"`) encodes, the BPE being byte-level, but as pieces the model never learned as a word:
`processor(...)` then warns with an `UnknownWordsWarning` naming them, and `unknown_words(text)` lists them. Every word
of the synthetic world's text is known to the bundled tokenizer (tests/test_processing_cm3leon.py checks 420 rows of
every task), so the world's prompts never warn.

**Decoding** gives an ordered list of segments, `str` and `PIL.Image.Image`:

- A run of image ids is cut into images of `image_seq_length` codes. A run whose length is not a multiple of it ends
  in an incomplete image: by default a `ValueError` (a sampling bug, or generation cut short by `max_new_tokens`);
  with `incomplete_images="codes"` it is returned as a 1-D `torch.LongTensor` of its VQ codes (offset removed).
- With `skip_special_tokens=False` (default) the text between two images is one segment in the canonical form:
  pieces and markers joined by one space (`"<eos> a red star <break>"`), so encode → decode → encode is the identity.
  With `skip_special_tokens=True` special tokens are dropped and split the text: the segments are the stripped,
  non-empty texts between specials and images (`["a red star", <image>]`), and padding disappears.

Example:

```python
>>> from cm3leon_hf.pretrained import TINY_PATH
>>> from PIL import Image
>>> processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
>>> batch = processor(["a red star <break> <image>", "a blue circle"], images=[[Image.new("RGB", (64, 64))], []],
...                   padding_side="left", return_tensors="pt")
>>> batch["input_ids"].shape  # (batch_size, sequence_length): <eos> + caption + <break> + 64 image ids
torch.Size([2, 69])
>>> segments = processor.decode(batch["input_ids"][0])
>>> segments[0], type(segments[1]).__name__
('<eos> a red star <break>', 'Image')
>>> processor.decode(batch["input_ids"][1], skip_special_tokens=True)
['a blue circle']

```
"""

import inspect
import os
import posixpath
import re
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils.hub import hf_api

from .atomic import atomic_directory
from .file_checks import check_pretrained_folder
from .image_tokenizer import Cm3LeonImageTokenizer, load_image_tokenizer
from .layout import EDIT_TEMPLATE, INFILL_CHAT_TEMPLATE, MASK_TOKEN, Cm3LeonLayout, build_retrieval_prompt, prompt_text
from .tokenization_cm3leon import (
    BREAK_TOKEN,
    EOSS_TOKEN,
    IMAGE_TOKEN,
    join_pieces,
    marker_pattern,
    sentinel_token,
    split_markers,
)

IMAGE_TOKENIZER_SUBFOLDER = "image_tokenizer"
WORD_PATTERN = re.compile(r"[^\W\d_]+")
"""A word, for case folding and the unknown-word check: a run of letters (digits and punctuation are not words)."""
BYTE_LEVEL_SPACE = "\u0120"  # how a byte-level BPE writes the space in front of a word ("Ġred")


class UnknownWordsWarning(UserWarning):
    """A text holds words the text tokenizer never learned (see `Cm3LeonProcessor.unknown_words`)."""


def _check_unicode(text: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates: bytes that were not UTF-8, kept by Python's
    `surrogateescape` in argv and some file reads), which the tokenizer would reject without saying where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"`text` is not valid Unicode: {text[error.start]!r} at character {error.start} of "
                         f"{text[:40]!r}..., a byte that was not UTF-8. Decode the text as UTF-8 first (e.g. "
                         "`data.decode('utf-8', errors='replace')`).") from None


class Cm3LeonProcessor(ProcessorMixin):
    r"""
    Constructs a CM3Leon processor from a text BPE tokenizer and an image tokenizer: a [`Cm3LeonImageTokenizer`] (a
    diffusers `VQModel`, such as the VQ we train) or a [`TransformersVQImageTokenizer`] (the Janus, Emu3 or Chameleon
    VQ-VAE that transformers ships, with that model's own image processor).

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The text tokenizer, with `pad_token`, `eos_token` and the extra special tokens `<break>`, `<eoss>`,
            `<mask:0>`… (as built by `train_text_tokenizer`). Its ids must stay below `text_vocab_size`.
        image_tokenizer (`Cm3LeonImageTokenizer` or `TransformersVQImageTokenizer`):
            The VQ image tokenizer, saved by its own `save_pretrained` in the `image_tokenizer/` subfolder (and loaded
            back as the class that wrote it). Its codebook size is the image vocabulary and its `image_seq_length`
            the tokens of every image: `validate_model_config` checks both against a model's config.
        text_vocab_size (`int`, *optional*):
            Number of text ids of the layout (`Cm3LeonConfig.text_vocab_size`); defaults to `len(tokenizer)`.
        image_token_offset (`int`, *optional*):
            Id of VQ code 0 (`Cm3LeonConfig.image_token_offset`); defaults to `text_vocab_size`.
        prepend_eos (`bool`, defaults to `True`):
            Start every document with `<eos>` (CL Fig. 9). Can be overridden per call.
        chat_template (`str`, *optional*):
            Jinja template that `apply_chat_template` (and transformers' `image-text-to-text` pipeline) renders
            messages with. Defaults to `layout.INFILL_CHAT_TEMPLATE`: a user turn becomes the CM3 infill prompt
            `"{text} <mask:0> <break> <image>… <mask:0>"` (CL §2.2: "Image of <mask>: [image] <infill>") and an assistant
            turn the infilled span `"{text} <eoss>"`, our choice for the inference format that the paper leaves open.

    The processor's attributes `pad_token_id`, `eos_token_id`, `break_token_id`, `eoss_token_id`, `mask_token_id`,
    `sentinel_token_ids`, `image_seq_length`, `image_vocab_size` and `image_token_ids` describe its vocabulary;
    `validate_model_config` compares them with a `Cm3LeonConfig`.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_tokenizer,
        text_vocab_size: int | None = None,
        image_token_offset: int | None = None,
        prepend_eos: bool = True,
        chat_template: str | None = None,
    ):
        from .transformers_image_tokenizers import TransformersVQImageTokenizer

        if not isinstance(image_tokenizer, (Cm3LeonImageTokenizer, TransformersVQImageTokenizer)):
            raise ValueError(
                "`image_tokenizer` must be a `Cm3LeonImageTokenizer` (diffusers VQModel) or a "
                f"`TransformersVQImageTokenizer` (Janus, Emu3, Chameleon VQ-VAE), got {type(image_tokenizer).__name__}."
            )
        super().__init__(tokenizer, chat_template=INFILL_CHAT_TEMPLATE if chat_template is None else chat_template)
        self.image_tokenizer = image_tokenizer
        self.text_vocab_size = len(tokenizer) if text_vocab_size is None else int(text_vocab_size)
        self.image_token_offset = self.text_vocab_size if image_token_offset is None else int(image_token_offset)
        self.prepend_eos = bool(prepend_eos)
        self._read_vocabulary()

    @classmethod
    def get_attributes(cls) -> list[str]:
        # `ProcessorMixin` treats every `__init__` argument whose name contains "tokenizer" as a *text* tokenizer
        # (saved and loaded with `AutoTokenizer`). The image tokenizer is a VQ model that we save and load ourselves
        # (`save_pretrained`, `from_pretrained`), so only `tokenizer` is a sub-processor.
        return ["tokenizer"]

    def _read_vocabulary(self) -> None:
        tokenizer = self.tokenizer
        missing = [t for t in (tokenizer.pad_token, tokenizer.eos_token) if t is None]
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (BREAK_TOKEN, EOSS_TOKEN, sentinel_token(0))}
        missing += [token for token, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(
                f"The text tokenizer lacks the special tokens {missing} (pad, eos, <break>, <eoss>, <mask:0> are needed)."
            )
        if len(tokenizer) > self.text_vocab_size:
            raise ValueError(
                f"The text tokenizer has {len(tokenizer)} ids, more than `text_vocab_size` ({self.text_vocab_size})."
            )
        if self.image_token_offset < self.text_vocab_size:
            raise ValueError(
                f"`image_token_offset` ({self.image_token_offset}) overlaps the text ids [0, {self.text_vocab_size})."
            )
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.break_token_id = ids[BREAK_TOKEN]
        self.eoss_token_id = ids[EOSS_TOKEN]
        self.sentinel_token_ids = []
        while (token_id := tokenizer.convert_tokens_to_ids(sentinel_token(len(self.sentinel_token_ids)))) not in (
            None,
            tokenizer.unk_token_id,
        ):
            self.sentinel_token_ids.append(token_id)
        self.mask_token_id = self.sentinel_token_ids[0]
        self.image_seq_length = self.image_tokenizer.image_seq_length
        self.image_vocab_size = self.image_tokenizer.codebook_size
        self.image_token_ids = range(self.image_token_offset, self.image_token_offset + self.image_vocab_size)
        self._special_ids = set(tokenizer.all_special_ids)
        self._learned_tokens = {token for token in tokenizer.get_vocab() if len(token) > 1}  # not the 256 bytes
        self._marker_pattern = marker_pattern([*tokenizer.all_special_tokens, IMAGE_TOKEN])
        self._marker_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}

    # -------------------------------------------------------------------------------------------- encoding

    def __call__(
        self,
        text: str | Sequence[str],
        images=None,
        *,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        truncation: bool | str = False,
        prepend_eos: bool | None = None,
        return_tensors: str | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool | None = None,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Encode documents (text with `<image>` placeholders, see the module docstring) and their images.

        Args:
            text: one document or a list of documents.
            images: the images of the `<image>` placeholders, in order: one image, a flat list over the whole batch,
                or one list per document. Any input the image tokenizer accepts (PIL, arrays, bytes, paths).
                Given a text without placeholders (`processor(images=image, text="Describe the picture.")`), the
                images go where the chat template puts them: the document becomes the template's user turn with its
                images, the captioning/VQA prompt (the same ids as `apply_chat_template` of that message).
            padding: `True`/`"longest"` pads to the longest document, `"max_length"` to `max_length`,
                `False`/`"do_not_pad"` leaves lengths as they are.
            padding_side: `"left"` (for generation) or `"right"`; defaults to the tokenizer's `padding_side`.
            max_length: longest allowed document; the target length for `padding="max_length"`.
            truncation: `False` (default: a `ValueError` names a document longer than `max_length`) or `True`
                (also `"longest_first"`, `"only_first"`): cut it to at most `max_length` ids on the tokenizer's
                `truncation_side`, never through an image: an image the cut would split is dropped whole, so the
                document may end up shorter than `max_length`.
            prepend_eos: start each document with `<eos>`; defaults to the processor's `prepend_eos`.
            return_tensors: `"pt"`, `"np"` or `None` (lists).
            pad_to_multiple_of: pad to a multiple of this length (with `padding`).
            add_special_tokens: accepted as tokenizers and TRL pass it; it changes nothing: the only token a document
                starts with is `<eos>`, which `prepend_eos` controls (a chat template of ours never writes one, so
                `apply_chat_template` never doubles it).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask`, each `(batch_size, sequence_length)`.
        """
        if kwargs:
            raise TypeError(f"Unexpected keyword arguments {sorted(kwargs)}.")
        if videos is not None or audio is not None:  # `apply_chat_template` passes both, as None
            raise ValueError("CM3Leon reads text and images only, not videos or audio.")
        if not isinstance(text, (str, list, tuple)):
            raise ValueError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")
        documents = [text] if isinstance(text, str) else list(text)
        if not documents or not all(isinstance(d, str) for d in documents):
            raise ValueError("`text` must be a string or a non-empty list of strings.")
        for document in documents:
            _check_unicode(document)
        documents, images = self._place_images(documents, images)
        ids = self._encode_documents(documents, self._images_per_document(documents, images), prepend_eos)
        if truncation not in (True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"`truncation` must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', "
                             f"got {truncation!r}.")
        if truncation not in (False, "do_not_truncate"):
            if max_length is None:
                raise ValueError("`truncation` needs `max_length`.")
            ids = [self._truncate(row, max_length, self.tokenizer.truncation_side) for row in ids]
        return self._pad(ids, padding, padding_side, max_length, return_tensors, pad_to_multiple_of)

    def _is_image_id(self, token: int) -> bool:
        return self.image_token_offset <= token < self.image_token_offset + self.image_tokenizer.codebook_size

    def _truncate(self, row: list[int], max_length: int, side: str) -> list[int]:
        """At most `max_length` ids of `row`, cut on `side` at a boundary that splits no image's code run."""
        if len(row) <= max_length:
            return row
        if side == "left":
            start = len(row) - max_length
            while 0 < start < len(row) and self._is_image_id(row[start - 1]) and self._is_image_id(row[start]):
                start += 1  # inside an image: drop the rest of it
            return row[start:]
        end = max_length
        while 0 < end < len(row) and self._is_image_id(row[end - 1]) and self._is_image_id(row[end]):
            end -= 1  # inside an image: drop all of it
        return row[:end]

    def _place_images(self, documents: list[str], images) -> tuple[list[str], object]:
        """transformers' usual call, `processor(images=image, text="Describe the picture.")`: documents without any
        `<image>` placeholder, given images, become the chat template's user turn with those images (the captioning
        and VQA prompt `"{text} <mask:0> <break> <image> <mask:0>"` of the default template), as
        `apply_chat_template` renders a message with image entries. The images go one per document (or one list per
        document). Documents with placeholders are left as written."""
        if images is None or any(IMAGE_TOKEN in d for d in documents):
            return documents, images
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            return documents, images
        if all(isinstance(x, (list, tuple)) or x is None for x in images):
            per_document = [list(x or []) for x in images]
        elif len(documents) == 1:
            per_document = [images]
        else:
            per_document = [[x] for x in images]
        if len(per_document) != len(documents):
            raise ValueError(f"The text has no `{IMAGE_TOKEN}` placeholders and {len(images)} images for "
                             f"{len(documents)} documents: give one image (or one list of images) per document, or "
                             f"write `{IMAGE_TOKEN}` where each image goes.")
        placed = [
            self.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(doc_images)
                                       + [{"type": "text", "text": document}]}], tokenize=False)
            if doc_images else document
            for document, doc_images in zip(documents, per_document)
        ]
        return placed, per_document

    def _images_per_document(self, documents: list[str], images) -> list[list]:
        counts = [len(re.findall(re.escape(IMAGE_TOKEN), d)) for d in documents]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(x, (list, tuple)) or x is None for x in images):  # one list per document
            if len(images) != len(documents):
                raise ValueError(f"`images` has {len(images)} lists for {len(documents)} documents.")
            per_document = [list(x or []) for x in images]
            for i, (count, doc_images) in enumerate(zip(counts, per_document)):
                if count != len(doc_images):
                    raise ValueError(
                        f"Document {i} has {count} `{IMAGE_TOKEN}` placeholders but {len(doc_images)} images."
                    )
            return per_document
        if sum(counts) != len(images):
            raise ValueError(
                f"The text has {sum(counts)} `{IMAGE_TOKEN}` placeholders but {len(images)} images were given."
            )
        per_document, start = [], 0
        for count in counts:
            per_document.append(list(images[start : start + count]))
            start += count
        return per_document

    def _encode_documents(self, documents: list[str], images: list[list], prepend_eos: bool | None) -> list[list[int]]:
        prepend_eos = self.prepend_eos if prepend_eos is None else prepend_eos
        pieces = [[p if p in self._marker_ids or p == IMAGE_TOKEN else self.fold_case(p) for p in
                   split_markers(d, self._marker_pattern)] for d in documents]
        texts = [p for doc in pieces for p in doc if p not in self._marker_ids and p != IMAGE_TOKEN]
        unknown = sorted({word for text in texts for word in self._unknown_words(text)})
        if unknown:
            warnings.warn(
                f"Words the text tokenizer never learned: {unknown}. They encode as pieces the model did not see as "
                f"words, so it cannot follow them (the bundled tiny model knows the synthetic world's words).",
                UnknownWordsWarning, stacklevel=3,
            )
        text_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        flat_images = [image for doc_images in images for image in doc_images]
        image_ids = iter((self.get_image_tokens(flat_images) if flat_images else torch.empty(0)).tolist())
        out = []
        for doc in pieces:
            ids = [self.eos_token_id] if prepend_eos else []
            for piece in doc:
                if piece == IMAGE_TOKEN:
                    ids.extend(next(image_ids))
                elif piece in self._marker_ids:
                    ids.append(self._marker_ids[piece])
                else:
                    ids.extend(next(text_ids))
            out.append(ids)
        return out

    def fold_case(self, text: str) -> str:
        """`text` as written if the tokenizer knows every capitalised word of it as one learned token where it stands
        (after a space: `"Ġ" + word`), else lower-cased (see the module docstring). Markers must be cut out first.

        ```python
        >>> from cm3leon_hf.pretrained import TINY_PATH
        >>> processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
        >>> processor.fold_case("A LARGE Red Triangle"), processor.fold_case("Edit the image following")
        ('a large red triangle', 'Edit the image following')

        ```
        """
        for match in WORD_PATTERN.finditer(text):
            word = match.group()
            if word.islower():
                continue
            after_space = match.start() > 0 and text[match.start() - 1] == " "
            if (BYTE_LEVEL_SPACE + word if after_space else word) not in self._learned_tokens:
                lower = text.lower()
                # "<BREAK>" is text, not a marker: folding must not turn it into one
                return text if self._marker_pattern.search(lower) else lower
        return text

    def unknown_words(self, text: str) -> list[str]:
        """The words of a document (markers and images left out, case folded as when encoding) that the model never
        learned as words, in order of appearance and without repeats (see the module docstring).

        ```python
        >>> from cm3leon_hf.pretrained import TINY_PATH
        >>> processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
        >>> processor.unknown_words("a bleu circle on a white backgorund <break>")
        ['bleu', 'backgorund']

        ```
        """
        pieces = split_markers(text, self._marker_pattern)
        words = [w for p in pieces if p not in self._marker_ids and p != IMAGE_TOKEN for w in self._unknown_words(self.fold_case(p))]
        return list(dict.fromkeys(words))

    def _unknown_words(self, text: str) -> list[str]:
        return [word for word in WORD_PATTERN.findall(text)
                if word not in self._learned_tokens and BYTE_LEVEL_SPACE + word not in self._learned_tokens]

    def _pad(self, ids: list[list[int]], padding, padding_side, max_length, return_tensors,
             pad_to_multiple_of: int | None = None) -> BatchFeature:
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                               not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"`pad_to_multiple_of` must be a positive integer, got {pad_to_multiple_of!r}.")
        padding_side = padding_side or self.tokenizer.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"`padding` must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}.")
        if padding == "max_length" and max_length is None:
            raise ValueError("`padding='max_length'` needs `max_length`.")
        lengths = [len(x) for x in ids]
        if max_length is not None and max(lengths) > max_length:
            i = max(range(len(ids)), key=lengths.__getitem__)
            raise ValueError(f"Document {i} has {lengths[i]} ids, more than `max_length` ({max_length}); "
                             f"`truncation=True` cuts it, never through an image.")
        if padding in (False, "do_not_pad"):
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(f"Documents have different lengths {lengths}: pad them to return {return_tensors!r} "
                                 f"tensors.")
            return BatchFeature({"input_ids": ids, "attention_mask": [[1] * n for n in lengths]},
                                tensor_type=return_tensors)
        padded = self.tokenizer.pad({"input_ids": ids}, padding="max_length" if padding == "max_length" else "longest",
                                    max_length=max_length, padding_side=padding_side, return_attention_mask=True,
                                    pad_to_multiple_of=pad_to_multiple_of)
        return BatchFeature({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]},
                            tensor_type=return_tensors)

    @property
    def layout(self) -> Cm3LeonLayout:
        """The document layout of this processor's vocabulary (`layout.py`): prompts, training samples, CM3 infill."""
        return Cm3LeonLayout.of(self)

    def get_image_tokens(self, images) -> torch.LongTensor:
        """Images → ids of the joint vocabulary, `(batch_size, image_seq_length)`: `image_token_offset + code`."""
        return self.image_tokenizer.encode(images) + self.image_token_offset

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None, *, retrieved_documents: Sequence = (),
                      image=None, template: str = EDIT_TEMPLATE) -> BatchFeature:
        """Every stream of a generation prompt, as `Cm3LeonForCausalLM.generate` takes them (as diffusers'
        `encode_prompt` returns the prompt's and the negative prompt's embeddings together). The layout is
        `layout.py`'s:

        - **text-to-image**: `input_ids` = `<eos> [doc1 <break> … docN <break>] prompt <break>`; `uncond_input_ids`
          (CFG's stream, CL §3.1) = the same with `<mask:0>` in the prompt's place, or `negative_prompt` when given;
          retrieved documents stay in front of both.
        - **image-conditioned** (`image` given; editing, CL §4.1): `input_ids` = `template` (one `<image>`, the
          instruction in `{prompt}`) with `image`; `image_cond_input_ids` (instruct-CFG's image-only stream) = the same
          with `<mask:0>` in the instruction's place; `uncond_input_ids` = `<eos> <mask:0> <break>`.

        Args:
            prompt (`str`): the text (or the instruction, with `image`).
            negative_prompt (`str`, *optional*): the unconditional stream's text instead of `<mask:0>`.
            retrieved_documents (*optional*): documents put in front (`RetrievedDocument`s: `text` and `image`).
            image (*optional*): the source image of an image-conditioned prompt.
            template (`str`, defaults to `EDIT_TEMPLATE`): the image-conditioned prompt's form.

        Returns:
            `BatchFeature` of `(1, length)` tensors: `input_ids`, `attention_mask`, `uncond_input_ids`,
            `uncond_attention_mask`, and with `image` also `image_cond_input_ids`, `image_cond_attention_mask`.

        Example:

        ```python
        >>> from cm3leon_hf.pretrained import TINY_PATH
        >>> processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
        >>> streams = processor.encode_prompt("a red star")
        >>> streams["uncond_input_ids"].tolist()  # <eos> <mask:0> <break>
        [[1, 4, 2]]
        >>> processor.decode(streams["input_ids"][0])
        ['<eos> a red star <break>']

        ```
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"The prompt must be a non-empty string, got {prompt!r}.")
        if image is not None:
            if retrieved_documents:
                raise ValueError("An image-conditioned prompt takes no retrieved documents.")
            if "{prompt}" not in template or template.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"`template` needs exactly one `{IMAGE_TOKEN}` and a `{{prompt}}` field.")
            streams = {"": (template.format(prompt=prompt), [image]),
                       "image_cond_": (template.format(prompt=MASK_TOKEN), [image]),
                       "uncond_": (prompt_text(None, unconditional=True), None)}
        else:
            unconditional = negative_prompt is None  # the paper's stream: the text replaced by <mask:0>
            streams = {"": build_retrieval_prompt(retrieved_documents, prompt),
                       "uncond_": build_retrieval_prompt(retrieved_documents, negative_prompt, unconditional=unconditional)}
        encoded = {}
        for prefix, (text, images) in streams.items():
            batch = self(text, images=images or None, return_tensors="pt")
            encoded.update({f"{prefix}input_ids": batch["input_ids"], f"{prefix}attention_mask": batch["attention_mask"]})
        return BatchFeature(encoded)

    # -------------------------------------------------------------------------------------------- decoding

    def decode(self, ids, skip_special_tokens: bool = False, incomplete_images: str = "raise") -> list:
        """Ids of one sequence → ordered list of text segments (`str`) and images (`PIL.Image.Image`).

        Args:
            ids: a list or 1-D tensor of ids of the joint vocabulary.
            skip_special_tokens: drop special tokens (then they split the text into segments, see the module docstring).
            incomplete_images: `"raise"` (default) or `"codes"`: what to do with a run of image ids whose length is
                not a multiple of `image_seq_length` (`"codes"` returns its codes as a 1-D `torch.LongTensor`).
        """
        if incomplete_images not in ("raise", "codes"):
            raise ValueError(f"`incomplete_images` must be 'raise' or 'codes', got {incomplete_images!r}.")
        ids = self._as_id_list(ids)
        runs = []  # [("text" | "image", [ids])]
        for token_id in ids:
            kind = "image" if token_id in self.image_token_ids else "text"
            if kind == "text" and not 0 <= token_id < self.text_vocab_size:
                raise ValueError(
                    f"Id {token_id} is neither a text id [0, {self.text_vocab_size}) nor an image id "
                    f"[{self.image_token_ids.start}, {self.image_token_ids.stop})."
                )
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(token_id)
            else:
                runs.append((kind, [token_id]))
        image_codes = []  # complete images, decoded in one batch below
        segments = []
        for kind, run in runs:
            if kind == "text":
                segments.extend(self._decode_text(run, skip_special_tokens))
                continue
            codes = torch.tensor(run, dtype=torch.long) - self.image_token_offset
            complete = len(run) - len(run) % self.image_seq_length
            for start in range(0, complete, self.image_seq_length):
                segments.append(len(image_codes))
                image_codes.append(codes[start : start + self.image_seq_length])
            if complete < len(run):
                if incomplete_images == "raise":
                    raise ValueError(
                        f"A run of {len(run)} image ids is not a whole number of images ({self.image_seq_length} ids "
                        f"each): the last image has {len(run) - complete} ids. Pass incomplete_images='codes' to get "
                        f"them as codes."
                    )
                segments.append(codes[complete:])
        decoded = self.image_tokenizer.decode(torch.stack(image_codes)) if image_codes else []
        return [decoded[s] if isinstance(s, int) else s for s in segments]

    def batch_decode(self, sequences, skip_special_tokens: bool = False, incomplete_images: str = "raise") -> list:
        """`decode` for each row of `sequences` (`(batch_size, sequence_length)`); returns one segment list per row.
        Padding is dropped with `skip_special_tokens=True`."""
        return [self.decode(row, skip_special_tokens, incomplete_images) for row in sequences]

    def _decode_text(self, run: list[int], skip_special_tokens: bool) -> list[str]:
        pieces, text = [], []
        for token_id in [*run, None]:
            if token_id is not None and token_id not in self._special_ids:
                text.append(token_id)
                continue
            if text:
                pieces.append(self.tokenizer.decode(text, clean_up_tokenization_spaces=False).strip())
                text = []
            if token_id is not None:
                pieces.append(None if skip_special_tokens else self.tokenizer.convert_ids_to_tokens(token_id))
        if skip_special_tokens:
            return [p for p in pieces if p]
        return [join_pieces(p for p in pieces if p)] if any(pieces) else []

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """The text of each sequence of `generated_outputs` (`(batch_size, length)`), image segments left out: what
        transformers' `image-text-to-text` pipeline reads. An unfinished image run is dropped, not an error."""
        return [
            " ".join(
                segment
                for segment in self.decode(row, skip_special_tokens=skip_special_tokens, incomplete_images="codes")
                if isinstance(segment, str)
            )
            for row in generated_outputs
        ]

    def post_process_multimodal_output(self, generated_outputs, skip_special_tokens: bool = True,
                                       generation_mode: str | None = None, **kwargs) -> list:
        """What transformers' `any-to-any` pipeline reads: with `generation_mode="image"`, the image ids of each
        sequence (as `Cm3LeonForCausalLM.decode_image_tokens` cuts them, `(batch, image_seq_length)`) → PIL images;
        otherwise the text of each sequence (`post_process_image_text_to_text`)."""
        if generation_mode in (None, "text"):
            return self.post_process_image_text_to_text(generated_outputs, skip_special_tokens=skip_special_tokens)
        if generation_mode == "image":
            return self.decode_image_tokens(generated_outputs)
        raise ValueError(f"CM3Leon writes text and images, not generation_mode={generation_mode!r}.")

    def decode_image_tokens(self, ids) -> list[Image.Image]:
        """Image ids of the joint vocabulary, `(batch_size, image_seq_length)` or `(image_seq_length,)` → PIL images.
        A `ValueError` names any id outside the image range."""
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"Image ids must be integers, got dtype {ids.dtype}.")
        outside = ids[(ids < self.image_token_ids.start) | (ids >= self.image_token_ids.stop)]
        if outside.numel():
            raise ValueError(
                f"Id {outside[0].item()} is not an image id [{self.image_token_ids.start}, {self.image_token_ids.stop})."
            )
        return self.image_tokenizer.decode(ids.long() - self.image_token_offset)

    @staticmethod
    def _as_id_list(ids) -> list[int]:
        ids = torch.as_tensor(ids)
        if ids.numel() == 0:
            return []
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"`decode` takes one sequence of integer ids, got shape {tuple(ids.shape)} and dtype {ids.dtype} "
                f"(use batch_decode for several)."
            )
        return ids.tolist()

    # -------------------------------------------------------------------------------------------- model config

    def model_config_fields(self) -> dict:
        """The `Cm3LeonConfig` fields this processor's ids fix: `text_vocab_size`, `image_vocab_size`,
        `image_token_offset`, `image_seq_length`, the special ids and `num_sentinel_tokens` (what data tokenized with
        it records, and what `validate_model_config` compares)."""
        return {
            "text_vocab_size": self.text_vocab_size,
            "image_vocab_size": self.image_vocab_size,
            "image_token_offset": self.image_token_offset,
            "image_seq_length": self.image_seq_length,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "break_token_id": self.break_token_id,
            "eoss_token_id": self.eoss_token_id,
            "sentinel_token_start_id": self.mask_token_id,
            "num_sentinel_tokens": len(self.sentinel_token_ids),
        }

    def validate_model_config(self, config) -> None:
        """Raise a `ValueError` naming the field if `config` (a `Cm3LeonConfig`) does not describe this processor's
        vocabulary (`model_config_fields`)."""
        expected = self.model_config_fields()
        for field, value in expected.items():
            if getattr(config, field, None) != value:
                raise ValueError(
                    f"The model config's `{field}` ({getattr(config, field, None)!r}) does not match the processor's "
                    f"({value!r}): this processor's ids mean other things to that model."
                )
        if self.sentinel_token_ids != list(range(self.mask_token_id, self.mask_token_id + len(self.sentinel_token_ids))):
            raise ValueError(f"The processor's sentinel ids {self.sentinel_token_ids} are not consecutive.")

    # -------------------------------------------------------------------------------------------- saving

    def to_dict(self) -> dict:
        # The VQ weights live in `image_tokenizer/` (its own format); processor_config.json holds the layout only.
        output = {
            "processor_class": type(self).__name__,
            "text_vocab_size": self.text_vocab_size,
            "image_token_offset": self.image_token_offset,
            "prepend_eos": self.prepend_eos,
        }
        if "auto_map" in self.__dict__:
            output["auto_map"] = self.auto_map
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Save the text tokenizer, `processor_config.json` and the image tokenizer (in `image_tokenizer/`), as a
        whole (`atomic.atomic_directory`: a kill leaves the earlier copy; other files already there are kept).

        With `push_to_hub=True`, everything in `save_directory` is then uploaded in one commit to `repo_id` (default:
        the directory's name); `push_to_hub(repo_id)` does the same from a temporary directory."""
        with atomic_directory(save_directory) as staging:  # a kill leaves the old copy, not a mix
            files = super().save_pretrained(staging)
            self.image_tokenizer.save_pretrained(os.path.join(staging, IMAGE_TOKENIZER_SUBFOLDER))
        files = [os.path.join(save_directory, os.path.relpath(f, staging)) for f in files]
        image_directory = os.path.join(save_directory, IMAGE_TOKENIZER_SUBFOLDER)
        if push_to_hub:
            token = kwargs.get("token")
            repo_id = kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = hf_api().create_repo(repo_id, private=kwargs.get("private"), token=token, exist_ok=True).repo_id
            self._upload_modified_files(
                save_directory, repo_id, {}, commit_message=kwargs.get("commit_message"), token=token
            )
        return [*files, image_directory]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, model_config=None, **kwargs) -> "Cm3LeonProcessor":
        """Load a processor saved by `save_pretrained` (a directory or a Hub repository): the text tokenizer with
        `AutoTokenizer`, `processor_config.json` (and the chat template) with `ProcessorMixin.get_processor_dict`, and
        the image tokenizer from `image_tokenizer/` (`load_image_tokenizer`: the class that saved it). Keyword arguments named like `__init__`'s (`tokenizer=`, `image_tokenizer=`,
        `prepend_eos=`, `chat_template=`, ...) replace what is loaded; the Hub arguments (`revision=`, `token=`,
        `cache_dir=`, `subfolder=`, ...) apply to every file. With `model_config` (a `Cm3LeonConfig`), check that it
        matches the processor's vocabulary (`validate_model_config`).

        Loading is ours rather than `ProcessorMixin.from_pretrained`'s because the image tokenizer is no transformers
        sub-processor, and the private hooks that load sub-processors changed between transformers 5.24 and 5.25: a
        saved processor must load, as remote code, with every transformers version the package supports."""
        if args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes keyword arguments only, got {len(args)} positional.")
        hub = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        hub = {key: value for key, value in hub.items() if value is not None}
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        init_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        # As `ProcessorMixin.from_args_and_dict`: arguments that are not the processor's (a pipeline passes the
        # model's `dtype`, Auto classes `trust_remote_code`) are left out, and returned with `return_unused_kwargs`.
        unused = {key: value for key, value in kwargs.items() if key not in init_names}
        check_pretrained_folder(pretrained_model_name_or_path, hub.get("subfolder"), what="processor")
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **hub)
        init = {key: processor_dict[key] for key in init_names if key in processor_dict}
        init.update({key: value for key, value in kwargs.items() if key in init_names})
        if init.get("tokenizer") is None:
            # AutoTokenizer reads config.json, whose auto_map names this package's code: pass the caller's consent on
            trust = {"trust_remote_code": kwargs["trust_remote_code"]} if "trust_remote_code" in kwargs else {}
            init["tokenizer"] = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub, **trust)
        if init.get("image_tokenizer") is None:
            subfolder = posixpath.join(hub.get("subfolder") or "", IMAGE_TOKENIZER_SUBFOLDER)
            init["image_tokenizer"] = load_image_tokenizer(pretrained_model_name_or_path, **{**hub, "subfolder": subfolder})
        processor = cls(**init)
        if model_config is not None:
            processor.validate_model_config(model_config)
        return (processor, unused) if return_unused_kwargs else processor

    def __repr__(self) -> str:
        return f"{super().__repr__()}\n- image_tokenizer: {self.image_tokenizer!r}"


# Arguments of `from_pretrained` that say where files come from; passed to every file's loader.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")


__all__ = ["Cm3LeonProcessor", "UnknownWordsWarning"]
