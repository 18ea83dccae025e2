"""Cm3LeonImageTokenizer over a small random diffusers VQModel: shapes, deterministic decoding, image modes,
resize/crop, diffusers-format save/load, and errors naming the problem."""

import io
import json

import numpy as np
import pytest
import torch
from diffusers import VQModel
from PIL import Image

from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer


def random_vq(sample_size: int = 16, num_codes: int = 32) -> VQModel:
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=8,
        vq_embed_dim=4,
        num_vq_embeddings=num_codes,
        norm_num_groups=4,
        sample_size=sample_size,
        lookup_from_codebook=True,
    ).eval()


@pytest.fixture(scope="module")
def image_tokenizer():
    return Cm3LeonImageTokenizer(random_vq())


def noise_image(seed: int, size=(16, 16), mode="RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8), mode)


def test_grid_follows_the_vq_config(image_tokenizer):
    assert image_tokenizer.resolution == 16
    assert image_tokenizer.grid_size == 8  # two blocks: stride 2
    assert image_tokenizer.image_seq_length == 64
    assert image_tokenizer.codebook_size == 32


def test_encode_shapes_range_and_batching(image_tokenizer):
    images = [noise_image(i) for i in range(5)]
    codes = image_tokenizer.encode(images)
    assert codes.shape == (5, 64) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 32
    assert torch.equal(image_tokenizer.encode(images, batch_size=2), codes)
    assert torch.equal(image_tokenizer.encode(images[0]), codes[:1])
    assert image_tokenizer.encode([]).shape == (0, 64)


def test_codes_are_in_raster_order(image_tokenizer):
    pixels = image_tokenizer.preprocess([noise_image(0)])
    latents = image_tokenizer.vq_model.encode(pixels).latents[0]  # (D, 8, 8)
    codebook = image_tokenizer.vq_model.quantize.embedding.weight  # (32, D)
    nearest = torch.cdist(latents.permute(1, 2, 0).reshape(64, -1), codebook).argmin(-1)  # row by row
    assert torch.equal(image_tokenizer.encode_pixels(pixels)[0], nearest)


def test_decoding_is_deterministic(image_tokenizer):
    codes = image_tokenizer.encode([noise_image(1), noise_image(2)])
    first, second = image_tokenizer.decode(codes), image_tokenizer.decode(codes.clone())
    assert [im.size for im in first] == [(16, 16)] * 2 and {im.mode for im in first} == {"RGB"}
    assert [im.tobytes() for im in first] == [im.tobytes() for im in second]
    assert image_tokenizer.decode(codes[0])[0].tobytes() == first[0].tobytes()  # one image's (image_seq_length,)


def test_image_modes_are_converted(image_tokenizer):
    rgb = noise_image(3)
    grey = Image.fromarray(np.full((16, 16), 200, np.uint8), "L")
    load = image_tokenizer.load_image
    assert load(rgb.convert("P")).tobytes() == rgb.convert("P").convert("RGB").tobytes()
    assert load(grey).tobytes() == grey.convert("RGB").tobytes()
    sixteen = Image.fromarray(np.full((16, 16), 200 * 257, np.uint16))
    assert sixteen.mode == "I;16"
    assert load(sixteen).tobytes() == grey.convert("RGB").tobytes()  # scaled, not clipped to 255
    transparent = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert np.array_equal(np.asarray(load(transparent)), np.full((16, 16, 3), 255, np.uint8))  # white background
    half = Image.new("LA", (16, 16), (100, 128))
    assert np.asarray(load(half))[0, 0].tolist() == [177, 177, 177]  # 100 * 128/255 + 255 * 127/255
    black_background = Cm3LeonImageTokenizer(image_tokenizer.vq_model, background_color=(0, 0, 0))
    assert np.asarray(black_background.load_image(transparent)).max() == 0
    with_transparency = Image.new("P", (16, 16), 0)
    with_transparency.putpalette([10, 20, 30] * 256)
    with_transparency.info["transparency"] = 0
    assert np.asarray(load(with_transparency))[0, 0].tolist() == [255, 255, 255]
    array = np.asarray(rgb)
    assert load(array).tobytes() == rgb.tobytes()
    assert load({"bytes": _png(rgb), "path": None}).tobytes() == rgb.tobytes()
    assert torch.equal(image_tokenizer.encode([_png(rgb)]), image_tokenizer.encode([rgb]))


def test_resize_shorter_side_then_centre_crop(image_tokenizer):
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = (255, 0, 0)  # the left and right quarters are cropped away
    wide[:, 48:] = (0, 0, 255)
    wide[:, 16:48] = (0, 255, 0)
    pixels = image_tokenizer.preprocess([Image.fromarray(wide)])
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.equal(pixels[0, :, 2:-2, 2:-2], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 12, 12))
    tiny = image_tokenizer.preprocess([Image.new("RGB", (1, 3), (0, 0, 255))])  # upscaled
    assert tiny.shape == (1, 3, 16, 16) and torch.equal(tiny[0, 2], torch.ones(16, 16))


def reference_preprocess(image: Image.Image, size: int, resample) -> torch.Tensor:
    """What the tokenizer computed before it used diffusers' VaeImageProcessor, written out: the shorter side resized
    to `size` (the longer rounded), the centre square cropped, `x / 127.5 - 1`."""
    if image.size != (size, size):
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), resample)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


@pytest.mark.parametrize("shape", [(16, 16), (10, 37), (41, 13), (3, 3), (100, 99)])
def test_preprocessing_through_vae_image_processor_equals_the_written_out_reference(image_tokenizer, shape):
    """The same pixels, bit for bit, as the hand-written resize/crop/normalise it replaced (so the codes of every
    pre-tokenized dataset stay valid), on square, wide, tall, tiny and odd-sized random images; and back."""
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    expected = reference_preprocess(image, image_tokenizer.resolution, Image.Resampling.BICUBIC)
    assert torch.equal(image_tokenizer.preprocess([image])[0], expected)
    back = image_tokenizer.postprocess(expected[None])[0]
    assert np.array_equal(np.asarray(back), ((expected.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())


def test_save_and_load_in_diffusers_format(image_tokenizer, tmp_path):
    tokenizer = Cm3LeonImageTokenizer(image_tokenizer.vq_model, background_color=(0, 0, 0), resample="lanczos")
    tokenizer.save_pretrained(tmp_path / "image_tokenizer")
    files = sorted(p.name for p in (tmp_path / "image_tokenizer").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "image_tokenizer_config.json"]
    plain = VQModel.from_pretrained(tmp_path, subfolder="image_tokenizer")  # readable by diffusers alone
    assert plain.config.lookup_from_codebook and plain.config.num_vq_embeddings == 32
    loaded = Cm3LeonImageTokenizer.from_pretrained(tmp_path, subfolder="image_tokenizer")
    assert (loaded.background_color, loaded.resample) == ((0, 0, 0), "lanczos")
    images = [noise_image(4), noise_image(5, size=(20, 16))]
    assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    codes = tokenizer.encode(images)
    assert [im.tobytes() for im in loaded.decode(codes)] == [im.tobytes() for im in tokenizer.decode(codes)]
    # Saved again after loading from a path: that path (diffusers' `_name_or_path`) stays out of the saved config.
    assert str(loaded.vq_model.config._name_or_path) == str(tmp_path)
    loaded.save_pretrained(tmp_path / "again")
    assert "_name_or_path" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert json.loads((tmp_path / "again" / "image_tokenizer_config.json").read_text()) == {
        "background_color": [0, 0, 0], "resample": "lanczos"}


def test_device_and_dtype_follow_the_model(image_tokenizer):
    assert image_tokenizer.to("cpu") is image_tokenizer
    assert image_tokenizer.device == torch.device("cpu") and image_tokenizer.dtype == torch.float32
    assert image_tokenizer.preprocess([noise_image(0)]).dtype == torch.float32


def test_bad_inputs_raise_errors_naming_the_problem(image_tokenizer, tmp_path):
    good = noise_image(0)
    with pytest.raises(ValueError, match="Image 1: cannot decode the image bytes"):
        image_tokenizer.encode([good, b"\x89PNG\r\n\x1a\nnot really a png"])
    with pytest.raises(ValueError, match="Image 0: cannot decode the image bytes"):
        image_tokenizer.encode([_png(good)[:40]])  # truncated
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot decode the image file .*broken.png"):
        image_tokenizer.encode([str(tmp_path / "broken.png")])
    with pytest.raises(ValueError, match=r"Image 2 has zero size \(0×5\)"):
        image_tokenizer.encode([good, good, Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match="zero size"):
        image_tokenizer.encode([np.zeros((0, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="must be uint8"):
        image_tokenizer.encode([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match=r"shape \(H, W\), \(H, W, 3\) or \(H, W, 4\)"):
        image_tokenizer.encode([np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ValueError, match="expected a PIL image.*got int"):
        image_tokenizer.encode([3])
    with pytest.raises(ValueError, match=r"Image code 32 is outside the codebook \[0, 32\)"):
        image_tokenizer.decode(torch.full((1, 64), 32))
    with pytest.raises(ValueError, match=r"Image code -1 is outside the codebook"):
        image_tokenizer.decode(torch.full((64,), -1))
    with pytest.raises(ValueError, match=r"shape \(batch_size, 64\)"):
        image_tokenizer.decode(torch.zeros(2, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="must be integers"):
        image_tokenizer.decode(torch.zeros(1, 64))


def test_invalid_construction_raises():
    vq = random_vq()
    with pytest.raises(ValueError, match="lookup_from_codebook=True"):
        Cm3LeonImageTokenizer(VQModel(**{**vq.config, "lookup_from_codebook": False}))
    with pytest.raises(ValueError, match="background_color"):
        Cm3LeonImageTokenizer(vq, background_color=(0, 0, 256))
    with pytest.raises(ValueError, match="resample"):
        Cm3LeonImageTokenizer(vq, resample="fancy")
    with pytest.raises(ValueError, match="resample"):  # PIL has it; diffusers' VaeImageProcessor does not
        Cm3LeonImageTokenizer(vq, resample="box")
    with pytest.raises(ValueError, match="diffusers `VQModel`"):
        Cm3LeonImageTokenizer(torch.nn.Linear(2, 2))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_loading_without_accelerate_says_nothing_about_it(monkeypatch):
    """diffusers asks for low-memory loading by default and, where `accelerate` is missing (the package's base install,
    `make demo`), warned at every load of the VQ that it fell back. The tokenizer asks for it only where it can work:
    no warning, the same model."""
    import logging

    import diffusers.models.modeling_utils as modeling_utils
    import diffusers.utils

    from cm3leon_hf import load_image_tokenizer
    from cm3leon_hf.pretrained import TINY_PATH

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    path = TINY_PATH / "image_tokenizer"
    with_accelerate = load_image_tokenizer(path)
    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: False)
    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    records = Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        without = load_image_tokenizer(path)
        VQModel.from_pretrained(path)  # diffusers' own default warns: the handler does see the warning
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert sum("low cpu memory" in m for m in records.messages) == 1, records.messages  # diffusers' call only
    assert all(torch.equal(a, b) for a, b in zip(with_accelerate.vq_model.state_dict().values(),
                                                 without.vq_model.state_dict().values()))
