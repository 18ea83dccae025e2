"""The CM3Leon document layout, written once: what a training sample, a generation prompt, CFG's unconditional
stream and a CM3 infill look like, as ids and as the processor's marker text.

The processor, the data collator, the pipelines, the retriever and `generate` all build their sequences here.

```
document (a caption-image pair)   text <break> image                         CL Fig. 8
retrieved document                text <break> image <break>                 metaseq's CM3Leon prompt builder
training sample                   <eos> doc1 … docN query <eos>              CL Fig. 9: retrieved documents in front
text-to-image prompt              <eos> doc1 … docN text <break>             CL §2.2: "continuation from <eos> text <break>"
unconditional (CFG) prompt        <eos> doc1 … docN <mask:0> <break>         CL §3.1: the text replaced by <mask>
CM3 infill                        … <mask:0> … <mask:1> … <mask:0> span0 <eoss> <mask:1> span1 <eoss> [<eos>]
```

Choices the paper leaves open, made here:

- **The unconditional stream keeps the retrieved documents** and replaces only the query text by `<mask:0>`, ending
  with `<break>` like the conditional prompt, so that both streams continue with image codes (the CM3Leon demo drops
  the `<mask:0> <break>` tail when it retrieves; with it, the stream with documents is the no-retrieval stream
  `<eos> <mask:0> <break>` with the documents in front).
- **Where the infill targets go** (CM3 §2: "masked spans moved to the end"): after the masked sample and *before* its
  closing `<eos>`, so that a masked sample still ends with `<eos>` and the targets directly follow the document, as at
  inference, where the prompt `… <mask:0>` (the processor's chat template) is continued by `span <eoss>`.
- **Segments.** The structural tokens `<eos>`, `<break>`, `<pad>`, `<eoss>` and the sentinels cut a sequence into
  segments; a segment holds one modality (text, or the codes of one image). CM3 spans are drawn inside one segment
  (CL §2.2: no masking across `<break>`), never over a structural token.

Example (the tiny configuration's ids: `<eos>` = 1, `<break>` = 2, `<eoss>` = 3, `<mask:i>` = 4 + i, image codes from
1024):

```python
>>> layout = Cm3LeonLayout(eos_token_id=1, break_token_id=2, eoss_token_id=3, pad_token_id=0,
...                        sentinel_token_ids=(4, 5), image_token_offset=1024, image_vocab_size=2048,
...                        image_seq_length=2)
>>> doc = layout.document([300, 301], [1030, 1031])        # "a star" <break> image
>>> doc
[300, 301, 2, 1030, 1031]
>>> layout.sequence(doc, retrieved=[[310, 2, 1040, 1041]])  # <eos> retrieved <break> query <eos>
[1, 310, 2, 1040, 1041, 2, 300, 301, 2, 1030, 1031, 1]
>>> layout.prompt([300, 301]), layout.unconditional_prompt()
([1, 300, 301, 2], [1, 4, 2])
>>> sample = layout.sequence(doc)
>>> layout.segments(sample)                                  # (start, end, is_image)
[(1, 3, False), (4, 6, True)]
>>> masked = layout.infill(sample, [(2, 3), (4, 5)])
>>> masked
[1, 300, 4, 2, 5, 1031, 4, 301, 3, 5, 1030, 3, 1]
>>> layout.undo_infill(masked) == sample
True
>>> prompt_text("a red star"), prompt_text("a red star", retrieved=["a blue star"])
('a red star <break>', 'a blue star <break> <image> <break> a red star <break>')
>>> prompt_text(None, retrieved=["a blue star"], unconditional=True)
'a blue star <break> <image> <break> <mask:0> <break>'

```
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .tokenization_cm3leon import BREAK_TOKEN, EOS_TOKEN, EOSS_TOKEN, IMAGE_TOKEN, sentinel_token

MASK_TOKEN = sentinel_token(0)
"""`<mask:0>`: the paper's `<mask>` (CFG's unconditional stream) and the first CM3 sentinel."""


INFILL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] -%}"
    "{%- set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set images = content | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set reply = messages[loop.index0 + 1] if loop.index0 + 1 < messages | length else none -%}"
    "{%- set reply_images = 0 if reply is none or reply['content'] is string "
    "else reply['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- if images == 0 or reply_images > 0 -%}"
    "{%- for part in content -%}"
    f"{{{{ ' ' if not loop.first }}}}{{{{ part['text'] if part['type'] == 'text' else '{IMAGE_TOKEN}' }}}} {BREAK_TOKEN}"
    "{%- endfor -%}"
    "{%- else -%}"
    f"{{{{ text }}}} {MASK_TOKEN} {BREAK_TOKEN}{{% for _ in range(images) %}} {IMAGE_TOKEN}{{% endfor %}} {MASK_TOKEN}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    f"{{%- if images > 0 -%}}{{% for _ in range(images) %}} {IMAGE_TOKEN}{{% endfor %}} {EOS_TOKEN}"
    f"{{%- else -%}}{{{{ ' ' ~ text }}}} {EOSS_TOKEN} {EOS_TOKEN}{{%- endif -%}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""The processor's default chat template: the paper's documents as conversations, in the forms multi-task SFT trains
on (`cm3leon_hf.sft_data`), so that TRL's vision-language recipe (`messages` + `images`, `SFTTrainer` with this
processor) trains what `training/sft.py` trains, and transformers' pipelines prompt what was trained:

- a user turn with images whose answer is text (or that awaits one): the CM3 infill form, `"{text} <mask:0> <break>
  <image>… <mask:0>"`, which asks for the masked span (CL §2.2: "Image of <mask>: [image] <infill>"); the assistant
  turn is the span, `"{text} <eoss> <eos>"`: captioning and VQA (transformers' `image-text-to-text` pipeline; the
  paper leaves the inference format of these tasks open);
- a user turn of text only, or one whose answer is an image: its parts in order, each followed by `<break>`
  (`"a red star <break>"`; `"Edit the image following the text instruction <break> <image> <break> make it blue
  <break>"`), and the assistant turn is the image, `"<image> <eos>"`: text-to-image, editing, structure-guided
  generation, infilling."""


# -------------------------------------------------------------------------------------------- marker text


def document_text(text: str) -> str:
    """A caption-image pair in the processor's marker text: `"{text} <break> <image>"` (CL Fig. 8)."""
    return f"{text} {BREAK_TOKEN} {IMAGE_TOKEN}"


def prompt_text(query_text: str | None, retrieved: Sequence[str] = (), *, unconditional: bool = False,
                prepend_eos: bool = False) -> str:
    """The marker text of a text-to-image prompt, for `Cm3LeonProcessor` (which adds the leading `<eos>`).

    - conditional: `"{t1} <break> <image> <break> … {query_text} <break>"`;
    - unconditional (CFG's stream, CL §3.1): the query text becomes `<mask:0>`: `"{t1} <break> <image> <break> …
      <mask:0> <break>"`; without documents `"<mask:0> <break>"`.

    Args:
        query_text: the prompt's text; ignored (may be `None`) when `unconditional`.
        retrieved: the texts of the retrieved documents, in prompt order; each is followed by its image (`<image>`).
        unconditional: build CFG's unconditional stream.
        prepend_eos: start with a literal `"<eos> "` (for a processor called with `prepend_eos=False`).
    """
    if not unconditional and query_text is None:
        raise ValueError("The conditional prompt needs a query text.")
    parts = [EOS_TOKEN] if prepend_eos else []
    for text in retrieved:
        parts += [document_text(text), BREAK_TOKEN]
    parts += [MASK_TOKEN if unconditional else query_text, BREAK_TOKEN]
    return " ".join(parts)


# The image-conditioned instruction-tuning documents of CL §4.1 / Table 5, as the synthetic world writes its SFT rows
# (`cm3leon_hf.synthetic.tasks`) and the image-text-to-image pipeline's `task=` presets prompt them: a condition or
# source `<image>`, the text, and the output `<image>` last.
EDIT_TEMPLATES = (
    "Edit the image following the text instruction <break> <image> <break> {instruction} <break> <image>",
    "Edit first image following the instruction <break> <image> <break> {instruction} <break> <image>",
)
STRUCTURE_TEMPLATES = {
    "edge": (
        "Make high quality image from canny edge features <break> <image> <break> {caption} <break> <image>",
        "Make high quality image from canny edge features and text description <break> <image> <break> {caption} <break> <image>",
    ),
    "segmentation": (
        "Make high quality image from a segmentation map <break> <image> <break> {caption} <break> <image>",
        "Make high quality image from a segmentation map and text description <break> <image> <break> {caption} <break> <image>",
    ),
}
INFILL_TEMPLATES = (
    "Fill in the missing region {region} of the image <break> <image> <break> <image>",
    "Restore the masked region {region} <break> <image> <break> <image>",
)

EDIT_TEMPLATE = f"Edit the image following the text instruction {BREAK_TOKEN} {IMAGE_TOKEN} {BREAK_TOKEN} {{prompt}} {BREAK_TOKEN}"
"""The editing prompt of CL §4.1 (Table 5's prefix): one `<image>`, the instruction in `{prompt}`; instruct-CFG's
image-conditional stream puts `<mask:0>` in the instruction's place."""


def build_retrieval_prompt(documents: Sequence, query_text: str | None = None, *, unconditional: bool = False,
                           image_field: str = "image", prepend_eos: bool = False) -> tuple[str, list]:
    """The marker text and images of a retrieval-augmented prompt (`prompt_text` with the documents' texts), for
    `Cm3LeonProcessor`.

    metaseq's CM3Leon prompt is `[<eos>] + Σ(text <break> image <break>) + query_text <break>`. The `<eos>` is the
    processor's to add (it starts every document with `<eos>` by default), so the text starts with the first document:

    - conditional: `"{t1} <break> <image> <break> {t2} <break> <image> <break> {query_text} <break>"`;
    - unconditional (the CFG stream, CL §3.1: documents kept, query text dropped): the query text becomes `<mask:0>`,
      `"{t1} <break> <image> <break> … <mask:0> <break>"`; with no documents this is `"<mask:0> <break>"`, the
      no-retrieval unconditional prompt `<eos> <mask:0> <break>` once the processor adds `<eos>`.

    Args:
        documents: retrieved documents (`cm3leon_hf.retriever.RetrievedDocument`, or anything with `text` and the
            `image_field` attribute), in prompt order.
        query_text: the query's text (required for the conditional prompt, ignored by the unconditional one).
        image_field: `"image"` (PIL images, for the processor) or `"image_ids"` (VQ codes): which document attribute
            fills the `<image>` markers.
        prepend_eos: start the text with a literal `"<eos> "` (for a processor called with `prepend_eos=False`).

    Returns:
        `(text, images)`: `text` with one `<image>` marker per document, `images` the matching images in order.

    >>> from types import SimpleNamespace
    >>> doc = SimpleNamespace(row=0, text="a red circle", image=None, image_ids=[7, 8])
    >>> build_retrieval_prompt([doc], "a red square", image_field="image_ids")
    ('a red circle <break> <image> <break> a red square <break>', [[7, 8]])
    >>> build_retrieval_prompt([doc], unconditional=True, image_field="image_ids", prepend_eos=True)[0]
    '<eos> a red circle <break> <image> <break> <mask:0> <break>'
    """
    if image_field not in ("image", "image_ids"):
        raise ValueError(f"image_field must be 'image' or 'image_ids', got {image_field!r}.")
    if not unconditional and query_text is None:
        raise ValueError("The conditional prompt needs a query_text.")
    images = []
    for doc in documents:
        image = getattr(doc, image_field)
        if image is None:
            raise ValueError(f"Document at bank row {doc.row} has no {image_field!r}.")
        images.append(image)
    texts = [doc.text for doc in documents]
    return prompt_text(query_text, texts, unconditional=unconditional, prepend_eos=prepend_eos), images


# -------------------------------------------------------------------------------------------- ids


@dataclass(frozen=True)
class Cm3LeonLayout:
    """The document layout over the ids of one vocabulary (build it with `Cm3LeonLayout.of(config_or_processor)`).

    Sequences are plain `list[int]`; nothing here touches a tokenizer or a tensor, so it serves the processor, the
    collator (per example, in data-loader workers) and `generate` alike.
    """

    eos_token_id: int
    break_token_id: int
    eoss_token_id: int
    pad_token_id: int
    sentinel_token_ids: tuple[int, ...]
    image_token_offset: int
    image_vocab_size: int
    image_seq_length: int

    @classmethod
    def of(cls, source) -> "Cm3LeonLayout":
        """The layout of a `Cm3LeonConfig` or a `Cm3LeonProcessor` (both name the same ids)."""
        return cls(
            eos_token_id=source.eos_token_id,
            break_token_id=source.break_token_id,
            eoss_token_id=source.eoss_token_id,
            pad_token_id=source.pad_token_id,
            sentinel_token_ids=tuple(source.sentinel_token_ids),
            image_token_offset=source.image_token_offset,
            image_vocab_size=source.image_vocab_size,
            image_seq_length=source.image_seq_length,
        )

    @property
    def mask_token_id(self) -> int:
        """`<mask:0>`."""
        return self.sentinel_token_ids[0]

    @property
    def structural_token_ids(self) -> frozenset[int]:
        """Tokens that delimit segments and are never part of a CM3 span."""
        return frozenset((self.eos_token_id, self.break_token_id, self.eoss_token_id, self.pad_token_id,
                          *self.sentinel_token_ids))

    def is_image_token(self, token_id: int) -> bool:
        return self.image_token_offset <= token_id < self.image_token_offset + self.image_vocab_size

    # ---------------------------------------------------------------- building

    def document(self, text_ids: Sequence[int], image_ids: Sequence[int]) -> list[int]:
        """A caption-image pair: `text <break> image` (no leading `<eos>`). `image_ids` are ids of the joint
        vocabulary, exactly `image_seq_length` of them."""
        if len(image_ids) != self.image_seq_length or not all(map(self.is_image_token, image_ids)):
            raise ValueError(
                f"An image is {self.image_seq_length} image ids in [{self.image_token_offset}, "
                f"{self.image_token_offset + self.image_vocab_size}), got {len(image_ids)} ids."
            )
        return [*text_ids, self.break_token_id, *image_ids]

    def _documents_in_front(self, retrieved: Iterable[Sequence[int]]) -> list[int]:
        ids = [self.eos_token_id]
        for document in retrieved:
            ids += [*document, self.break_token_id]
        return ids

    def sequence(self, query: Sequence[int], retrieved: Iterable[Sequence[int]] = ()) -> list[int]:
        """A causal training sample: `<eos> doc1 <break> … docN <break> query <eos>` (CL Fig. 9). `query` and the
        `retrieved` documents are documents without `<eos>` (e.g. from `document`)."""
        return [*self._documents_in_front(retrieved), *query, self.eos_token_id]

    def prompt(self, text_ids: Sequence[int], retrieved: Iterable[Sequence[int]] = ()) -> list[int]:
        """A text-to-image prompt: `<eos> doc1 <break> … text <break>`; it continues with an image."""
        return [*self._documents_in_front(retrieved), *text_ids, self.break_token_id]

    def unconditional_prompt(self, retrieved: Iterable[Sequence[int]] = ()) -> list[int]:
        """CFG's unconditional stream: `<eos> doc1 <break> … <mask:0> <break>` (the text replaced by `<mask:0>`)."""
        return self.prompt([self.mask_token_id], retrieved)

    # ---------------------------------------------------------------- CM3

    def segments(self, ids: Sequence[int]) -> list[tuple[int, int, bool]]:
        """The maximal runs of non-structural tokens, `(start, end, is_image)` with `ids[start:end]` the run. An image
        run is one image's codes; a run is image only if all its tokens are image codes."""
        structural = self.structural_token_ids
        out, start = [], None
        for i, token in enumerate([*ids, self.eos_token_id]):
            if token in structural:
                if start is not None:
                    out.append((start, i, all(self.is_image_token(t) for t in ids[start:i])))
                    start = None
            elif start is None:
                start = i
        return out

    def infill(self, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
        """CM3's causal masking (CM3 §2): span `i` (`ids[start:end]`, in position order) is replaced by `<mask:i>` and
        moved to the end as `<mask:i> span <eoss>`; a closing `<eos>` stays last.

        Args:
            ids: a sequence (e.g. from `sequence`).
            spans: `(start, end)` pairs, sorted, non-empty, non-overlapping, each inside one segment (see
                `segments`); at most `len(sentinel_token_ids)` of them.
        """
        if len(spans) > len(self.sentinel_token_ids):
            raise ValueError(f"{len(spans)} spans but only {len(self.sentinel_token_ids)} sentinel tokens.")
        structural = self.structural_token_ids
        body, tail = (list(ids[:-1]), [ids[-1]]) if len(ids) > 1 and ids[-1] == self.eos_token_id else (list(ids), [])
        masked, targets, previous = [], [], 0
        for i, (start, end) in enumerate(spans):
            if not previous <= start < end <= len(body):
                raise ValueError(f"Span {i} ({start}, {end}) is empty, overlaps the previous one or is out of range.")
            span = body[start:end]
            if any(t in structural for t in span):
                raise ValueError(f"Span {i} ({start}, {end}) contains a structural token; spans stay in one segment.")
            sentinel = self.sentinel_token_ids[i]
            masked += [*body[previous:start], sentinel]
            targets += [sentinel, *span, self.eoss_token_id]
            previous = end
        return [*masked, *body[previous:], *targets, *tail]

    def undo_infill(self, ids: Sequence[int]) -> list[int]:
        """The inverse of `infill`: put every `<mask:i> span <eoss>` target back in place of its sentinel."""
        ids = list(ids)
        sentinel_index = {s: i for i, s in enumerate(self.sentinel_token_ids)}
        body, tail = (ids[:-1], ids[-1:]) if len(ids) > 1 and ids[-1] == self.eos_token_id else (ids, [])
        places = [i for i, t in enumerate(body) if t == self.mask_token_id]  # targets start at the second <mask:0>
        if len(places) < 2:
            return ids
        split = places[1]
        masked, rest = body[:split], body[split:]
        spans, i = {}, 0
        while i < len(rest):
            if rest[i] not in sentinel_index:
                raise ValueError(f"Expected a sentinel at target position {i}, got id {rest[i]}.")
            end = rest.index(self.eoss_token_id, i + 1) if self.eoss_token_id in rest[i + 1:] else None
            if end is None:
                raise ValueError(f"The infill target of sentinel id {rest[i]} has no <eoss>.")
            spans[rest[i]] = rest[i + 1 : end]
            i = end + 1
        out = []
        for token in masked:
            out += spans.pop(token) if token in spans else [token]
        if spans:
            raise ValueError(f"Targets for sentinels {sorted(spans)} that the sequence does not contain.")
        return [*out, *tail]
