"""Issue 26: the processor with a public image tokenizer (Janus, Emu3, Chameleon VQ-VAEs, random weights at tiny size).

- `training/convert_image_tokenizer.py` on a whole Janus model and on VQ-VAEs alone writes a processor whose codes are
  exactly the wrapped model's own, and a `Cm3LeonConfig` with the tokenizer's vocabulary and tokens per image; the
  paper's shape (Chameleon's 8,192 codes, 1,024 tokens) on the 350M config.
- The processor saves and loads the wrapped tokenizer as what it is; a model config that does not match is named.
- The text side and the model are unchanged: documents round-trip, `generate` writes exactly the tokenizer's tokens
  per image with every decoding (CFG, CD-K), retrieved documents go in front, and the pipeline draws at the tokenizer's
  resolution.
"""

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import REPO, random_model
from PIL import Image
from transformers import (
    AutoTokenizer,
    ChameleonImageProcessorPil,
    ChameleonVQVAE,
    ChameleonVQVAEConfig,
    Emu3ImageProcessor,
    Emu3VQVAE,
    Emu3VQVAEConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusVQVAEConfig,
)

from cm3leon_hf import (
    HUB_CONFIGS,
    Cm3LeonConfig,
    Cm3LeonProcessor,
    TransformersVQImageTokenizer,
)
from cm3leon_hf.convert_image_tokenizer import (
    config_for_processor,
    load_transformers_image_tokenizer,
)
from cm3leon_hf.image_tokenizer import load_image_tokenizer
from cm3leon_hf.pretrained import TINY_PATH

RES = 16  # 16×16 pixels, stride 2 → 8×8 = 64 tokens per image, 64 codes


def whole_janus(path):
    """A tiny random `JanusForConditionalGeneration` saved with its image processor, as a Hub checkpoint is."""
    torch.manual_seed(0)
    vq = JanusVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
                          num_res_blocks=1, num_patches=RES // 2, projection_dim=16, image_token_embed_dim=16)
    config = JanusConfig(
        text_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 100},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 4 * RES // 2, "patch_size": 4, "projection_dim": 16},
        vq_config=vq,
    )
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers' init (std 0.02) maps every picture to one code: spread them out
        for parameter in model.model.vqmodel.parameters():
            if parameter.dim() == 4:
                torch.nn.init.kaiming_normal_(parameter)
        model.model.vqmodel.quantize.embedding.weight.normal_()
    model.save_pretrained(path)
    JanusImageProcessorPil(size={"height": RES, "width": RES}).save_pretrained(path)
    return model


def emu3_vq(path):
    torch.manual_seed(1)
    Emu3VQVAE(Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                              num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=4,
                              hidden_size=64)).save_pretrained(path)
    Emu3ImageProcessor(min_pixels=RES * RES, max_pixels=RES * RES, spatial_factor=2).save_pretrained(path)


def pictures(count=3, seed=0, size=(24, 20)):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(whole Janus model, output directory of the conversion command run as written, its printed summary)."""
    root = tmp_path_factory.mktemp("janus")
    model = whole_janus(root / "janus-whole")
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "training/convert_image_tokenizer.py", "--image_tokenizer",
                             str(root / "janus-whole"), "--output_dir", str(root / "cm3leon-janus")],
                            cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return model, root / "cm3leon-janus", json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def processor(converted):
    return Cm3LeonProcessor.from_pretrained(converted[1])


@pytest.fixture(scope="module")
def model(converted):
    return random_model(Cm3LeonConfig.from_pretrained(converted[1]))


def test_conversion_of_a_whole_model_gives_its_own_codes(converted, processor):
    janus, output, summary = converted
    config = Cm3LeonConfig.from_pretrained(output)
    assert (summary["image_vocab_size"], summary["image_seq_length"]) == (64, 64)
    assert (config.image_vocab_size, config.image_seq_length, config.image_token_offset) == (64, 64, config.text_vocab_size)
    tiny = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
    assert (config.hidden_size, config.num_hidden_layers, config.text_vocab_size) == (
        tiny.hidden_size, tiny.num_hidden_layers, tiny.text_vocab_size)
    assert isinstance(processor.image_tokenizer, TransformersVQImageTokenizer)
    images = pictures()
    pixels = JanusImageProcessorPil.from_pretrained(output / "image_tokenizer")(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        own = janus.model.vqmodel.encode(pixels).image_tokens.reshape(len(images), -1)
        own_pixels = janus.model.vqmodel.decode(own)
    assert len(set(own.flatten().tolist())) > 5  # a test that different codes could fail
    ids = processor(["a picture <break> <image>"] * 3, images=images, return_tensors="pt")["input_ids"]
    assert torch.equal(ids[:, -64:] - processor.image_token_offset, own)
    decoded = processor.decode_image_tokens(ids[:, -64:])
    assert decoded[0].size == (RES, RES)
    assert np.array_equal(np.asarray(decoded[1]), np.asarray(processor.image_tokenizer.postprocess(own_pixels)[1]))
    card = (output / "README.md").read_text()
    assert "JanusVQVAE" in card and "8×8 = 64 tokens" in card
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "processor_config.json", "tokenizer.json", "README.md", "image_tokenizer"} <= files
    assert "processing_cm3leon.py" in files  # remote code by default


def test_vq_alone_and_the_papers_shape(tmp_path):
    emu3_vq(tmp_path / "emu3")
    tokenizer = load_transformers_image_tokenizer(tmp_path / "emu3")
    assert (tokenizer.kind, tokenizer.resolution, tokenizer.image_seq_length) == ("emu3", RES, 64)
    # Chameleon's VQ-VAE is the paper's shape: 512² → 32×32 = 1,024 tokens, 8,192 codes (narrow random weights here)
    torch.manual_seed(2)
    ChameleonVQVAE(ChameleonVQVAEConfig(embed_dim=4, num_embeddings=8192, latent_channels=4, resolution=512,
                                        base_channels=32, channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1,
                                        attn_resolutions=[])).save_pretrained(tmp_path / "chameleon")
    ChameleonImageProcessorPil(size={"shortest_edge": 512},
                               crop_size={"height": 512, "width": 512}).save_pretrained(tmp_path / "chameleon")
    from cm3leon_hf.convert_image_tokenizer import convert_image_tokenizer

    config = convert_image_tokenizer(tmp_path / "chameleon", tmp_path / "cm3leon-350m-chameleon",
                                     base_config=HUB_CONFIGS / "cm3leon-350m", remote_code=False)
    paper = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-350m")
    assert (config.image_vocab_size, config.image_seq_length) == (paper.image_vocab_size, paper.image_seq_length) == (
        8192, 1024)
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (
        paper.hidden_size, paper.num_hidden_layers, paper.max_position_embeddings)
    assert not (tmp_path / "cm3leon-350m-chameleon" / "processing_cm3leon.py").exists()
    assert "1,024" in (tmp_path / "cm3leon-350m-chameleon" / "README.md").read_text().replace("1024", "1,024")


def test_conversion_errors_name_the_problem(tmp_path):
    from cm3leon_hf.convert_image_tokenizer import convert_image_tokenizer

    with pytest.raises(FileNotFoundError, match="does not exist|no such|not found"):
        load_transformers_image_tokenizer(tmp_path / "nothing-here")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="'opt' model: a Janus, Emu3 or Chameleon model"):
        load_transformers_image_tokenizer(tmp_path / "opt")
    emu3_vq(tmp_path / "emu3-any-size")
    (tmp_path / "emu3-any-size" / "preprocessor_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "emu3-any-size" / "preprocessor_config.json").read_text()), "max_pixels": 4 * RES * RES}))
    with pytest.raises(ValueError, match="pass `resolution=`"):
        load_transformers_image_tokenizer(tmp_path / "emu3-any-size")
    assert load_transformers_image_tokenizer(tmp_path / "emu3-any-size", resolution=32).image_seq_length == 256
    # 32² → 1,024 tokens does not fit the tiny config's context of 1,024 positions: both numbers are named
    with pytest.raises(ValueError, match=r"`image_seq_length` \(1024\) must be smaller than `max_position_embeddings` "
                                         r"\(1024\)"):
        convert_image_tokenizer(tmp_path / "emu3-any-size", tmp_path / "out", resolution=64)
    assert not (tmp_path / "out").exists()  # nothing half-written
    config = convert_image_tokenizer(tmp_path / "emu3-any-size", tmp_path / "out", resolution=64,
                                     max_position_embeddings=2048)
    assert (config.image_seq_length, config.max_position_embeddings) == (1024, 2048)


def test_processor_saves_and_loads_the_wrapped_tokenizer(converted, processor, tmp_path):
    processor.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "image_tokenizer" / "transformers_image_tokenizer_config.json").is_file()
    again = Cm3LeonProcessor.from_pretrained(tmp_path / "again")
    assert isinstance(again.image_tokenizer, TransformersVQImageTokenizer)
    assert isinstance(load_image_tokenizer(tmp_path / "again", subfolder="image_tokenizer"), TransformersVQImageTokenizer)
    images = pictures(seed=3)
    assert torch.equal(again.image_tokenizer.encode(images), processor.image_tokenizer.encode(images))
    assert again.model_config_fields() == processor.model_config_fields()
    # as remote code (the converted directory carries the processor's code, and the wrapper's with it)
    from transformers import AutoProcessor

    remote = AutoProcessor.from_pretrained(converted[1], trust_remote_code=True)
    assert type(remote.image_tokenizer).__name__ == "TransformersVQImageTokenizer"
    assert torch.equal(remote.image_tokenizer.encode(images), processor.image_tokenizer.encode(images))
    # the diffusers VQ of the bundled model still loads as what it is
    assert type(load_image_tokenizer(TINY_PATH, subfolder="image_tokenizer")).__name__ == "Cm3LeonImageTokenizer"


def test_a_model_config_of_another_tokenizer_is_named(processor):
    tiny = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")  # the shipped VQ's 2,048 codes
    with pytest.raises(ValueError, match=r"`image_vocab_size` \(2048\) does not match the processor's \(64\)"):
        processor.validate_model_config(tiny)
    with pytest.raises(ValueError, match=r"`image_vocab_size` \(2048\) does not match the processor's \(64\)"):
        Cm3LeonProcessor.from_pretrained(TINY_PATH, image_tokenizer=processor.image_tokenizer, model_config=tiny)
    longer = config_for_processor(processor, tiny)
    longer.image_seq_length = 100
    with pytest.raises(ValueError, match=r"`image_seq_length` \(100\) does not match the processor's \(64\)"):
        processor.validate_model_config(longer)


def test_documents_round_trip(processor):
    images = pictures(2, seed=4)
    text = "a red picture <break> <image> <break> and a blue one <break> <image>"
    ids = processor(text, images=images)["input_ids"][0]
    assert sum(i in processor.image_token_ids for i in ids) == 2 * 64
    segments = processor.decode(ids, skip_special_tokens=True)
    assert [s for s in segments if isinstance(s, str)] == ["a red picture", "and a blue one"]
    decoded = [s for s in segments if isinstance(s, Image.Image)]
    direct = processor.image_tokenizer.decode(processor.image_tokenizer.encode(images))
    assert [np.asarray(d).tolist() for d in decoded] == [np.asarray(d).tolist() for d in direct]
    assert decoded[0].size == (RES, RES)
    with_eos = processor("a picture <break> <image>", images=images[:1])["input_ids"][0]
    assert with_eos[0] == processor.eos_token_id and with_eos[-65] == processor.break_token_id


@pytest.mark.parametrize("decoding", [
    {"do_sample": False, "guidance_scale": 3.0},
    {"do_sample": True, "top_p": 0.9, "guidance_scale": 1.5},
    {"do_sample": True, "contrastive_k": 5},
])
def test_generate_writes_the_tokenizers_tokens_per_image(processor, model, decoding):
    prompt = processor.encode_prompt("a red square")
    out = model.generate(**prompt, generate_image=True, generator=torch.Generator().manual_seed(0), **decoding)
    image = out[0, prompt["input_ids"].shape[1]:]
    assert image.shape == (64,) and all(i in processor.image_token_ids for i in image.tolist())
    assert processor.decode_image_tokens(image[None])[0].size == (RES, RES)


def test_retrieved_documents_go_in_front(processor, model):
    docs = [types.SimpleNamespace(text="a blue circle", image=image) for image in pictures(2, seed=5)]
    prompt = processor.encode_prompt("a red square", retrieved_documents=docs)
    ids = prompt["input_ids"][0].tolist()
    codes = processor.image_tokenizer.encode([d.image for d in docs]) + processor.image_token_offset
    image_ids = [i for i in ids if i in processor.image_token_ids]
    assert image_ids == codes.flatten().tolist()  # both documents' images, in order, and nothing else
    assert ids[-1] == processor.break_token_id and ids.index(image_ids[0]) < ids.index(processor.break_token_id) + 2
    assert prompt["uncond_input_ids"][0].tolist().count(processor.mask_token_id) == 1
    out = model.generate(**prompt, generate_image=True, do_sample=False, guidance_scale=2.0)
    assert out.shape[1] - prompt["input_ids"].shape[1] == 64


def test_pipeline_draws_at_the_tokenizers_resolution(processor, model):
    from cm3leon_hf.pipelines import Cm3LeonTextToImagePipeline

    pipe = Cm3LeonTextToImagePipeline(model=model, processor=processor)
    result = pipe("a red square", generator=torch.Generator().manual_seed(0), progress_bar=False)
    assert result[0]["image"].size == (RES, RES)


def test_chameleon_processor_encodes_and_says_it_cannot_draw(tmp_path):
    torch.manual_seed(3)
    vq = ChameleonVQVAE(ChameleonVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, resolution=RES,
                                             base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                             attn_resolutions=[])).eval()
    image_processor = ChameleonImageProcessorPil(size={"shortest_edge": RES}, crop_size={"height": RES, "width": RES})
    processor = Cm3LeonProcessor(AutoTokenizer.from_pretrained(TINY_PATH),
                                 TransformersVQImageTokenizer(vq, image_processor))
    ids = processor("a picture <break> <image>", images=pictures(1))["input_ids"][0]
    assert sum(i in processor.image_token_ids for i in ids) == 64
    with pytest.raises(ValueError, match="no decoder"):
        processor.decode(ids)


def test_diffusers_pipeline_draws_at_the_tokenizers_resolution(processor, model, tmp_path):
    from cm3leon_hf.pipeline_cm3leon_diffusers import Cm3LeonDiffusionPipeline

    pipe = Cm3LeonDiffusionPipeline(model=model, processor=processor)
    assert pipe.resolution == RES
    images = pipe("a red square", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, RES, RES, 3)
    pipe.save_pretrained(tmp_path / "pipe")  # diffusers' layout, the wrapped tokenizer inside processor/
    again = Cm3LeonDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(again.processor.image_tokenizer, TransformersVQImageTokenizer)
    assert np.array_equal(again("a red square", generator=torch.Generator().manual_seed(0), output_type="np").images,
                          images)
