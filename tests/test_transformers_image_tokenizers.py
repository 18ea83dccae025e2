"""`TransformersVQImageTokenizer` over tiny random Janus, Emu3 and Chameleon VQ-VAEs: its codes, pixels and
preprocessing are exactly the wrapped model's and image processor's own, save/load round-trips, and the errors name
what is wrong (Chameleon has no decoder; codes outside the codebook)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    ChameleonImageProcessorPil,
    ChameleonVQVAE,
    ChameleonVQVAEConfig,
    Emu3ImageProcessor,
    Emu3VQVAE,
    Emu3VQVAEConfig,
    JanusImageProcessorPil,
    JanusVQVAE,
    JanusVQVAEConfig,
)

from cm3leon_hf.transformers_image_tokenizers import TransformersVQImageTokenizer

RES = 32
KINDS = ("janus", "emu3", "chameleon")


def build(kind: str):
    """(vq_model, image_processor) of `kind`: 32×32 images, stride 2 → a 16×16 grid, 64 codes, random weights."""
    torch.manual_seed(0)
    if kind == "janus":
        vq = JanusVQVAE(JanusVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
                                         channel_multiplier=[1, 1], num_res_blocks=1, num_patches=RES // 2))
        processor = JanusImageProcessorPil(size={"height": RES, "width": RES}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    elif kind == "emu3":
        vq = Emu3VQVAE(Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                       temporal_downsample_factor=4, hidden_size=64))
        processor = Emu3ImageProcessor(min_pixels=RES * RES, max_pixels=RES * RES, spatial_factor=2)
    else:
        vq = ChameleonVQVAE(ChameleonVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, resolution=RES,
                                                 base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                                 attn_resolutions=[]))
        processor = ChameleonImageProcessorPil(size={"shortest_edge": RES}, crop_size={"height": RES, "width": RES})
    return vq.eval(), processor


def images(size=(RES, RES), count=3, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def own_codes(kind, vq, pixels):
    """The wrapped model's own encode, as its model classes call it."""
    with torch.no_grad():
        if kind == "emu3":
            sizes = torch.tensor([[RES, RES]] * pixels.shape[0])
            return torch.stack(vq.encode(pixels, image_sizes=sizes).image_tokens).reshape(pixels.shape[0], -1)
        return vq.encode(pixels).image_tokens.reshape(pixels.shape[0], -1)


def test_grid_follows_the_config(kind):
    import cm3leon_hf

    assert cm3leon_hf.TransformersVQImageTokenizer is TransformersVQImageTokenizer
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    assert (tokenizer.resolution, tokenizer.grid_size, tokenizer.image_seq_length, tokenizer.codebook_size) == (
        RES, RES // 2, (RES // 2) ** 2, 64)


def test_preprocess_is_the_image_processors_own(kind):
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    batch = images()  # square, at the resolution: Emu3's processor keeps them as they are
    expected = processor(batch, return_tensors="pt")["pixel_values"]
    assert torch.equal(tokenizer.preprocess(batch), expected)
    if kind != "emu3":  # Janus pads, Chameleon crops non-square images: still exactly the processor's output
        odd = images(size=(45, 29))
        assert torch.equal(tokenizer.preprocess(odd), processor(odd, return_tensors="pt")["pixel_values"])
    else:  # Emu3: centre square, resized to the resolution with the processor's filter, then the processor
        odd = images(size=(45, 29), count=1)[0]
        square = odd.crop((8, 0, 37, 29)).resize((RES, RES), resample=processor.resample)
        assert torch.equal(tokenizer.preprocess([odd]), processor([square], return_tensors="pt")["pixel_values"])


def test_encode_is_the_models_own_encode(kind):
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    batch = images() + images(size=(45, 29), count=1, seed=1)
    codes = tokenizer.encode(batch, batch_size=2)
    pixels = tokenizer.preprocess(batch)
    assert codes.dtype == torch.long and codes.shape == (4, tokenizer.image_seq_length)
    assert torch.equal(codes, own_codes(kind, vq, pixels))
    assert codes.min() >= 0 and codes.max() < tokenizer.codebook_size
    assert len(set(codes.flatten().tolist())) > 1  # random weights still spread over codes: equality means something


def test_encode_takes_other_inputs(kind, tmp_path):
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    image = images(count=1)[0]
    image.save(tmp_path / "a.png")
    expected = tokenizer.encode(image)
    for other in (np.asarray(image), (tmp_path / "a.png").read_bytes(), str(tmp_path / "a.png"),
                  {"bytes": None, "path": str(tmp_path / "a.png")}):
        assert torch.equal(tokenizer.encode([other]), expected)
    assert tokenizer.encode(Image.new("L", (RES, RES), 90)).shape == (1, tokenizer.image_seq_length)
    with pytest.raises(ValueError, match="Image 1: cannot decode"):
        tokenizer.encode([image, b"not an image"])


@pytest.mark.parametrize("kind", ("janus", "emu3"))
def test_decode_is_the_models_own_decode(kind):
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    codes = torch.randint(0, 64, (3, tokenizer.image_seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vq.decode(codes.view(3, RES // 2, RES // 2) if kind == "emu3" else codes)
    pixels = tokenizer.decode_to_pixels(codes)
    assert pixels.shape == (3, 3, RES, RES)
    assert torch.equal(pixels, expected)
    decoded = tokenizer.decode(codes, batch_size=2)
    own = processor.postprocess(list(expected.float().numpy()), return_tensors="PIL.Image.Image",
                                input_data_format="channels_first")["pixel_values"]
    assert [image.mode for image in decoded] == ["RGB"] * 3
    for ours, theirs in zip(decoded, own):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert len(np.unique(np.asarray(decoded[0]))) > 1


def test_postprocess_inverts_preprocess(kind):
    """The way back undoes the processor's normalisation (to within the uint8 truncation), by the processor's own
    `postprocess` (Janus, Emu3) or by its mean, std and rescale factor (Chameleon, whose processor has none)."""
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    batch = images()
    back = tokenizer.postprocess(tokenizer.preprocess(batch))
    assert [image.size for image in back] == [(RES, RES)] * 3 and [image.mode for image in back] == ["RGB"] * 3
    for image, restored in zip(batch, back):
        difference = np.abs(np.asarray(image, dtype=np.int64) - np.asarray(restored, dtype=np.int64))
        assert difference.max() <= 1


def test_save_and_load_round_trip(kind, tmp_path):
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "vq_model" / "model.safetensors").is_file()
    assert not list((tmp_path / "tok").rglob("*.bin")) and not list((tmp_path / "tok").rglob("*.pt"))
    loaded = TransformersVQImageTokenizer.from_pretrained(tmp_path / "tok")
    assert type(loaded.vq_model) is type(vq) and type(loaded.image_processor) is type(processor)
    assert (loaded.resolution, loaded.image_seq_length, loaded.codebook_size) == (
        tokenizer.resolution, tokenizer.image_seq_length, tokenizer.codebook_size)
    batch = images() + images(size=(45, 29), count=1, seed=2)
    assert torch.equal(loaded.encode(batch), tokenizer.encode(batch))
    assert torch.equal(loaded.preprocess(batch), tokenizer.preprocess(batch))


def test_load_names_what_is_missing(tmp_path):
    import shutil

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="transformers_image_tokenizer_config.json"):
        TransformersVQImageTokenizer.from_pretrained(tmp_path / "empty")
    TransformersVQImageTokenizer(*build("janus")).save_pretrained(tmp_path / "tok")
    shutil.rmtree(tmp_path / "tok" / "vq_model")
    with pytest.raises(FileNotFoundError, match="vq_model/config.json"):
        TransformersVQImageTokenizer.from_pretrained(tmp_path / "tok")


def test_chameleon_decode_says_it_has_no_decoder():
    vq, processor = build("chameleon")
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    codes = tokenizer.encode(images(count=1))
    for call in (tokenizer.decode, tokenizer.decode_to_pixels):
        with pytest.raises(ValueError, match="Chameleon's VQ-VAE .* has no decoder"):
            call(codes)


def test_codes_outside_the_codebook_are_named(kind):
    vq, processor = build(kind)
    tokenizer = TransformersVQImageTokenizer(vq, processor)
    good = torch.zeros(1, tokenizer.image_seq_length, dtype=torch.long)
    for bad_code in (64, -1):
        bad = good.clone()
        bad[0, 5] = bad_code
        with pytest.raises(ValueError, match=rf"Image code {bad_code} is outside the codebook \[0, 64\)"):
            tokenizer.check_codes(bad)
        if kind != "chameleon":
            with pytest.raises(ValueError, match="codebook_size 64"):
                tokenizer.decode(bad)
    tokenizer.check_codes(good)
    with pytest.raises(ValueError, match=r"shape \(batch_size, 256\)"):
        tokenizer.check_codes(torch.zeros(1, 255, dtype=torch.long))


def test_configuration_errors(tmp_path):
    vq, _ = build("janus")
    with pytest.raises(ValueError, match="resolution 32×32"):
        TransformersVQImageTokenizer(vq, JanusImageProcessorPil(size={"height": 48, "width": 48}))
    vq, _ = build("emu3")
    with pytest.raises(ValueError, match="pass `resolution=`"):
        TransformersVQImageTokenizer(vq, Emu3ImageProcessor())
    emu3 = TransformersVQImageTokenizer(vq, Emu3ImageProcessor(), resolution=16)
    assert emu3.image_seq_length == 64
    emu3.save_pretrained(tmp_path / "emu3")  # the resolution is saved: the processor's min/max pixels do not give it
    assert TransformersVQImageTokenizer.from_pretrained(tmp_path / "emu3").resolution == 16
    vq, processor = build("chameleon")
    with pytest.raises(ValueError, match=r"`resolution` \(64\) differs"):
        TransformersVQImageTokenizer(vq, processor, resolution=64)
    with pytest.raises(ValueError, match="must be a transformers JanusVQVAE"):
        TransformersVQImageTokenizer(torch.nn.Linear(2, 2), processor)
