"""transformers' own `pipeline("any-to-any")` with the bundled tiny model: `generation_mode="image"` draws what our
`"text-to-image"` pipeline draws with the same seed, and text generation from an image takes transformers' usual
forms (`images=` without a placeholder, a chat with image entries); the processor accepts them too."""

import pytest
import torch
from PIL import Image
from transformers import pipeline

from cm3leon_hf import Cm3LeonForCausalLM, Cm3LeonProcessor
from cm3leon_hf.pretrained import TINY_PATH
from cm3leon_hf.synthetic import build_task

PROMPT = "a large red circle at the top left on a white background"


def seed(value: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(value)


@pytest.fixture(scope="module")
def any_to_any():
    return pipeline("any-to-any", model=str(TINY_PATH))


@pytest.fixture(scope="module")
def source_image():
    return build_task("caption", num_train=1, num_validation=0, num_test=0, num_heldout=0)["train"][0]["images"][0]


def test_the_model_says_it_writes_images(any_to_any):
    assert isinstance(any_to_any.model, Cm3LeonForCausalLM)
    assert any_to_any.model.output_modalities == ("text", "image")


def test_generation_mode_image_draws_the_text_to_image_pipelines_image(any_to_any):
    out = any_to_any(text=PROMPT, generation_mode="image", generate_kwargs={"generator": seed()})
    assert out[0]["input_text"] == PROMPT
    image = out[0]["generated_image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    ours = pipeline("text-to-image", model=any_to_any.model, processor=any_to_any.processor)
    assert image.tobytes() == ours(PROMPT, generator=seed(), progress_bar=False)[0]["image"].tobytes()
    upper = any_to_any(text=PROMPT.upper(), generation_mode="image", generate_kwargs={"generator": seed()})
    assert upper[0]["generated_image"].tobytes() == image.tobytes()  # the processor folds case


def test_generate_with_generation_mode_image_writes_one_image():
    model = Cm3LeonForCausalLM.from_pretrained(TINY_PATH).eval()
    processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    batch = processor([PROMPT, "a blue star"], padding_side="left", return_tensors="pt")
    out = model.generate(**batch, generation_mode="image", max_new_tokens=256, generator=seed())
    assert out.shape == (2, batch["input_ids"].shape[1] + 1 + 64)  # <break> appended, then exactly one image
    assert (out[:, batch["input_ids"].shape[1]] == model.config.break_token_id).all()
    assert [i.size for i in processor.post_process_multimodal_output(model.decode_image_tokens(out),
                                                                     generation_mode="image")] == [(64, 64)] * 2
    with pytest.raises(ValueError, match="do not end in an image"):
        model.decode_image_tokens(batch["input_ids"])
    with pytest.raises(ValueError, match="generation_mode must be 'text' or 'image', got 'audio'"):
        model.generate(**batch, generation_mode="audio")


def test_text_from_an_image_in_transformers_usual_forms(any_to_any, source_image):
    question = "Describe the given picture."
    plain = any_to_any(text=question, images=source_image, max_new_tokens=24, generate_kwargs={"generator": seed()})[0]["generated_text"]
    chat = [{"role": "user", "content": [{"type": "image", "image": source_image}, {"type": "text", "text": question}]}]
    answer = any_to_any(text=chat, max_new_tokens=24, generate_kwargs={"generator": seed()})[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert plain.startswith(question) and plain[len(question):].strip() == answer["content"].strip()
    # the two forms are one prompt: the same seed writes the same answer


def test_processor_places_images_where_the_chat_template_does(source_image):
    processor = Cm3LeonProcessor.from_pretrained(TINY_PATH)
    question = "Describe the given picture."
    ids = processor(images=source_image, text=question)["input_ids"][0]
    message = [{"role": "user", "content": [{"type": "image", "image": source_image}, {"type": "text", "text": question}]}]
    assert ids == processor.apply_chat_template(message, tokenize=True, return_dict=True)["input_ids"][0]
    assert processor.decode(ids)[0] == "<eos> Describe the given picture. <mask:0> <break>"
    # one image per document in a batch; placeholders written by hand still rule
    batch = processor(images=[source_image, source_image], text=[question, "what shape?"])["input_ids"]
    assert len(batch) == 2 and batch[0][-len(ids):] == ids
    written = processor(text=f"{question} <break> <image>", images=source_image)["input_ids"][0]
    assert processor.decode(written)[0] == "<eos> Describe the given picture. <break>"
    with pytest.raises(ValueError, match="no `<image>` placeholders and 3 images for 2 documents"):
        processor(images=[source_image] * 3, text=[question, question])
