"""`Cm3LeonDiffusionPipeline`: diffusers' habits (`pipe(prompt).images[0]`, output types, generators, callbacks,
progress bars, save → `DiffusionPipeline.from_pretrained`) on the bundled tiny model, drawing the same bytes as the
transformers `"text-to-image"` pipeline with the same settings, and diffusers arguments that do not apply refused by
name."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import pipeline

from cm3leon_hf.pipeline_cm3leon_diffusers import Cm3LeonDiffusionPipeline
from cm3leon_hf.pretrained import TINY_PATH

PROMPT = "a large red circle at the top left on a white background"


def seed(value: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(value)


@pytest.fixture(scope="module")
def pipe():
    pipe = Cm3LeonDiffusionPipeline.from_transformers(TINY_PATH)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_images_are_the_transformers_pipelines_bytes(pipe):
    images = pipe(PROMPT, num_images_per_prompt=2, generator=seed()).images
    assert [type(i) for i in images] == [Image.Image] * 2 and images[0].size == (64, 64)
    text_to_image = pipeline("text-to-image", model=pipe.model, processor=pipe.processor)
    expected = text_to_image(PROMPT, num_images_per_prompt=2, generator=seed(), progress_bar=False)
    assert [i.tobytes() for i in images] == [r["image"].tobytes() for r in expected]
    assert images[0].tobytes() != images[1].tobytes()
    # guidance, negative prompt and CM3Leon's own decoding go the same way
    kwargs = dict(guidance_scale=2.0, negative_prompt="a black background", decoding="cd-k")
    image = pipe(PROMPT, generator=seed(), **kwargs).images[0]
    assert image.tobytes() == text_to_image(PROMPT, generator=seed(), progress_bar=False, **kwargs)[0]["image"].tobytes()
    assert image.tobytes() != images[0].tobytes()


def test_output_types_and_return_dict(pipe):
    pil = pipe(PROMPT, num_images_per_prompt=2, generator=seed()).images
    as_np = pipe(PROMPT, num_images_per_prompt=2, generator=seed(), output_type="np").images
    as_pt = pipe(PROMPT, num_images_per_prompt=2, generator=seed(), output_type="pt").images
    ids = pipe(PROMPT, num_images_per_prompt=2, generator=seed(), output_type="latent").images
    assert as_np.shape == (2, 64, 64, 3) and as_np.dtype == np.float32 and 0 <= as_np.min() <= as_np.max() <= 1
    assert np.array_equal((as_np * 255).round().astype(np.uint8), np.stack([np.asarray(i) for i in pil]))
    assert as_pt.shape == (2, 3, 64, 64) and torch.equal(as_pt.permute(0, 2, 3, 1), torch.from_numpy(as_np))
    assert ids.shape == (2, 64) and ids.dtype == torch.long
    assert [i.tobytes() for i in pipe.processor.decode_image_tokens(ids)] == [i.tobytes() for i in pil]
    (images,) = pipe(PROMPT, num_images_per_prompt=2, generator=seed(), return_dict=False)
    assert images[0].tobytes() == pil[0].tobytes()


def test_prompt_lists_and_one_generator_per_image(pipe):
    images = pipe([PROMPT, "a small blue star at the bottom right on a black background"], num_images_per_prompt=2,
                  generator=[seed(i) for i in range(4)]).images
    assert len(images) == 4
    alone = pipe("a small blue star at the bottom right on a black background", generator=seed(3)).images[0]
    assert images[3].tobytes() == alone.tobytes()  # image i depends on generator i alone (diffusers' convention)
    with pytest.raises(ValueError, match="3 generators for 2 prompts"):
        pipe([PROMPT, PROMPT], generator=[seed(), seed(), seed()])


def test_callback_on_step_end_sees_every_image_token(pipe):
    calls = []

    def callback(p, step, timestep, callback_kwargs):
        assert p is pipe and step == timestep
        calls.append(callback_kwargs["image_ids"].clone())
        return {}

    ids = pipe(PROMPT, generator=seed(), output_type="latent", callback_on_step_end=callback).images
    assert len(calls) == 64 and [c.shape[-1] for c in calls] == list(range(1, 65))
    assert torch.equal(calls[-1][0], ids[0])  # image ids of the joint vocabulary


def test_progress_bar_counts_image_tokens_and_can_be_configured(capsys):
    pipe = Cm3LeonDiffusionPipeline.from_transformers(TINY_PATH)
    pipe(PROMPT, generator=seed())
    assert "64/64" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, generator=seed())
    assert "64/64" not in capsys.readouterr().err


def test_save_then_diffusion_pipeline_from_pretrained(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "processor" / "image_tokenizer").is_dir()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)  # diffusers' rule for a pipeline class outside diffusers
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "Cm3LeonDiffusionPipeline"
    loaded.set_progress_bar_config(disable=True)
    assert loaded(PROMPT, generator=seed()).images[0].tobytes() == pipe(PROMPT, generator=seed()).images[0].tobytes()
    direct = Cm3LeonDiffusionPipeline.from_pretrained(tmp_path)
    assert direct.to("cpu") is direct and direct.device == torch.device("cpu")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"num_inference_steps": 50}, ValueError, "`num_inference_steps`: an image is always `image_seq_length` tokens"),
    ({"height": 512, "width": 512}, ValueError, "`height`: the image tokenizer draws 64x64 images only"),
    ({"latents": torch.zeros(1)}, ValueError, "`latents`"),
    ({"prompt_embeds": torch.zeros(1)}, ValueError, "`prompt_embeds`"),
    ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
    ({"output_type": "jpeg"}, ValueError, "`output_type` must be one of"),
    ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt` must be a positive integer"),
    ({"callback_on_step_end_tensor_inputs": ["latents"]}, ValueError, "can hold \\['image_ids'\\]"),
    ({"cfg": 3.0}, TypeError, "unexpected arguments \\['cfg'\\]"),
])
def test_arguments_that_do_not_apply_are_named(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(PROMPT, **kwargs)


def test_the_resolution_itself_is_accepted(pipe):
    image = pipe(PROMPT, height=64, width=64, generator=seed()).images[0]
    assert image.tobytes() == pipe(PROMPT, generator=seed()).images[0].tobytes()
