"""The registered pipelines on a tiny random model with a real processor: outputs, equivalence with `generate` on the
same streams, batching, seeds, re-ranking, retrieval in the prompt, errors, and loading a saved pipeline in a fresh
process that never imports `cm3leon_hf`."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from packaging.version import Version
import torch
from diffusers import VQModel
from PIL import Image
from sentence_transformers import SentenceTransformer
from transformers import pipeline
from transformers.generation.streamers import BaseStreamer

from cm3leon_hf import Cm3LeonConfig, Cm3LeonProcessor
from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from cm3leon_hf.pipelines import TokenProgressBar
from cm3leon_hf.pretrained import CLIP_PATH
from cm3leon_hf.synthetic import build_task
from cm3leon_hf.tokenization_cm3leon import train_text_tokenizer
from conftest import HUB_CONFIGS, random_model, transformers_environments


@pytest.fixture(scope="module")
def world():
    return build_task("text_to_image", num_train=300, num_validation=0, num_test=20, num_heldout=0, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world):
    """The tiny config with random weights and a processor of its vocabulary (BPE on the world's captions, a random
    64x64 -> 8x8 VQ with the config's 2,048 codes), saved together as a Hub repository would be."""
    config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                 latent_channels=4, sample_size=64, num_vq_embeddings=config.image_vocab_size, norm_num_groups=4,
                 vq_embed_dim=4, lookup_from_codebook=True)
    tokenizer = train_text_tokenizer(world["train"]["caption"], config)
    processor = Cm3LeonProcessor(tokenizer, Cm3LeonImageTokenizer(vq), text_vocab_size=config.text_vocab_size)
    path = tmp_path_factory.mktemp("pipelines") / "cm3leon-tiny-random"
    random_model(config, std=0.05).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_to_image(model_dir):
    return pipeline("text-to-image", model=str(model_dir))


def image_ids_of(pipe, prompt, **kwargs):
    return pipe(prompt, output_type="ids", progress_bar=False, **kwargs)


def test_text_to_image_returns_images_and_matches_generate(text_to_image):
    pipe = text_to_image
    out = pipe("a red star at the top left", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
               progress_bar=False)
    assert len(out) == 2 and all(isinstance(o["image"], Image.Image) and o["image"].size == (64, 64) for o in out)
    assert all(o["score"] is None for o in out)
    # The same streams through generate directly: <eos> prompt <break> and <eos> <mask:0> <break>.
    processor, model = pipe.processor, pipe.model
    cond = processor("a red star at the top left <break>", return_tensors="pt")
    uncond = torch.tensor([[processor.eos_token_id, processor.mask_token_id, processor.break_token_id]])
    ids = model.generate(**cond, uncond_input_ids=uncond, guidance_scale=3.0, generate_image=True, do_sample=False)
    via_pipe = image_ids_of(pipe, "a red star at the top left", do_sample=False)[0]["image"]
    assert via_pipe.tolist() == ids[0, -model.config.image_seq_length :].tolist()
    assert ((via_pipe >= model.config.image_token_offset) & (via_pipe < model.config.vocab_size)).all()
    arrays = pipe("a blue circle", output_type="np", generator=torch.Generator().manual_seed(0), progress_bar=False)
    assert arrays[0]["image"].shape == (64, 64, 3) and arrays[0]["image"].dtype == np.uint8


def test_text_to_image_seeds_and_batches(text_to_image):
    pipe = text_to_image

    def sample(seed):
        return image_ids_of(pipe, "a green cross", generator=torch.Generator().manual_seed(seed))[0]["image"]

    assert torch.equal(sample(3), sample(3)) and not torch.equal(sample(3), sample(4))
    prompts = ["a red star", "two shapes on a black background: a small cyan circle and a large green square", "a cross"]
    batched = pipe(prompts, batch_size=3, output_type="ids", do_sample=False, progress_bar=False)
    for prompt, result in zip(prompts, batched):
        assert torch.equal(result[0]["image"], image_ids_of(pipe, prompt, do_sample=False)[0]["image"])


def test_negative_prompt_replaces_the_mask_stream(text_to_image):
    pipe = text_to_image
    processor, model = pipe.processor, pipe.model
    cond = processor("a red star <break>", return_tensors="pt")
    negative = processor("a blue circle <break>", return_tensors="pt")
    ids = model.generate(**cond, uncond_input_ids=negative["input_ids"], guidance_scale=3.0, generate_image=True,
                         do_sample=False)
    via_pipe = image_ids_of(pipe, "a red star", negative_prompt="a blue circle", do_sample=False)[0]["image"]
    assert via_pipe.tolist() == ids[0, -model.config.image_seq_length :].tolist()
    plain = image_ids_of(pipe, "a red star", do_sample=False)[0]["image"]
    assert not torch.equal(plain, via_pipe)


def test_clip_reranking_keeps_the_best_candidates(text_to_image):
    pipe = text_to_image
    clip = SentenceTransformer(str(CLIP_PATH))
    prompt = "a small red star at the top left on a white background"
    out = pipe(prompt, num_candidates=6, num_images_per_prompt=2, reranker=clip,
               generator=torch.Generator().manual_seed(0), progress_bar=False)
    candidates = pipe(prompt, num_candidates=6, num_images_per_prompt=6, reranker=clip,
                      generator=torch.Generator().manual_seed(0), progress_bar=False)
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    assert [o["score"] for o in out] == pytest.approx(scores[:2])
    image = np.asarray(out[0]["image"].convert("RGB"))
    expected = clip.encode([out[0]["image"]], normalize_embeddings=True) @ clip.encode([prompt], normalize_embeddings=True).T
    assert out[0]["score"] == pytest.approx(float(expected[0, 0]), abs=1e-5) and image.shape == (64, 64, 3)


def test_pooled_strategy_splits_candidates_between_top_p_and_cd_k(text_to_image):
    runs = text_to_image._sampling_runs("pooled", 5, top_p=0.7, temperature=1.0, contrastive={"contrastive_k": 4})
    assert [n for n, _ in runs] == [3, 2]
    assert runs[0][1]["top_p"] == 0.7 and "contrastive_k" not in runs[0][1]
    assert runs[1][1]["contrastive_k"] == 4 and runs[1][1]["top_p"] == 1.0
    # What the call leaves out is the model's saved decoding, else generate's defaults (k 5, alpha 0.5, amateur 0.5).
    (_, top_p_run), (_, cd_run) = text_to_image._sampling_runs("pooled", 2, None, 1.0, {})
    assert top_p_run["top_p"] == text_to_image.model.generation_config.top_p == 0.8
    assert (cd_run["contrastive_k"], cd_run["contrastive_alpha"], cd_run["amateur_temperature"]) == (5, 0.5, 0.5)
    assert [n for n, _ in text_to_image._sampling_runs("pooled", 1, 0.8, 1.0, {})] == [1]
    clip = SentenceTransformer(str(CLIP_PATH))
    out = text_to_image("a star", decoding="pooled", num_candidates=4, reranker=clip,
                        generator=torch.Generator().manual_seed(0), progress_bar=False)
    assert len(out) == 1 and isinstance(out[0]["image"], Image.Image)
    cd_only = image_ids_of(text_to_image, "a star", decoding="cd-k", generator=torch.Generator().manual_seed(0))
    assert cd_only[0]["image"].shape == (64,)


@pytest.fixture(scope="module")
def retriever(world, tmp_path_factory):
    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.retriever import Cm3LeonRetriever

    encoder = SentenceTransformer(str(CLIP_PATH))
    bank = Cm3LeonMemoryBank.build(world["train"], encoder, tmp_path_factory.mktemp("pipelines-bank") / "bank",
                                   text_column="caption", image_column="images", show_progress_bar=False)
    return Cm3LeonRetriever(bank, encoder)


def test_retrieved_documents_go_in_front_of_both_streams(text_to_image, world, retriever):
    from cm3leon_hf.retriever import build_retrieval_prompt

    pipe = text_to_image
    prompt = world["test"][0]["caption"]
    docs = retriever.retrieve(texts=[prompt], k=2)[0]
    text, images = build_retrieval_prompt(docs, prompt)
    uncond_text, uncond_images = build_retrieval_prompt(docs, unconditional=True)
    processor, model = pipe.processor, pipe.model
    cond = processor(text, images=images, return_tensors="pt")
    uncond = processor(uncond_text, images=uncond_images, return_tensors="pt")
    assert uncond["input_ids"][0, -2:].tolist() == [processor.mask_token_id, processor.break_token_id]
    ids = model.generate(**cond, uncond_input_ids=uncond["input_ids"], guidance_scale=3.0, generate_image=True,
                         do_sample=False)
    via_pipe = image_ids_of(pipe, prompt, retriever=retriever, num_retrieved_docs=2, do_sample=False)[0]["image"]
    assert via_pipe.tolist() == ids[0, -model.config.image_seq_length :].tolist()
    with pytest.raises(ValueError, match="needs a `retriever`"):
        pipe(prompt, num_retrieved_docs=1)


def test_encode_prompt_gives_the_layouts_streams(text_to_image, model_dir, world, retriever):
    """`Cm3LeonProcessor.encode_prompt`, which both pipelines call, gives `Cm3LeonLayout`'s prompts: `<eos> [docs] text
    <break>` and `<eos> [docs] <mask:0> <break>`, and the editing streams; `generate`'s default unconditional stream is
    `<eos> <mask:0> <break>` too."""
    pipe = text_to_image
    processor, model = pipe.processor, pipe.model
    layout = processor.layout
    EOS, BREAK, MASK = 1, 2, 4  # the tiny vocabulary's

    def words(text):  # the processor's text encoding: the BPE after case folding (this BPE never saw "Edit")
        return processor.tokenizer(processor.fold_case(text), add_special_tokens=False)["input_ids"]

    def codes(image):
        return processor.get_image_tokens([image])[0].tolist()

    def ids(encoded, name="input_ids"):  # one prompt's ids without padding
        return encoded[name][0][encoded[name.replace("input_ids", "attention_mask")][0].bool()].tolist()

    prompt = world["test"][0]["caption"]
    plain = pipe.preprocess(prompt)
    assert ids(plain) == [EOS, *words(prompt), BREAK]
    assert ids(plain, "uncond_input_ids") == [EOS, MASK, BREAK]
    negative = processor.encode_prompt(prompt, negative_prompt="a blue circle")
    assert ids(negative, "uncond_input_ids") == [EOS, *words("a blue circle"), BREAK]
    docs = retriever.retrieve(texts=[prompt], k=2)[0]
    documents = [[*words(d.text), BREAK, *codes(d.image), BREAK] for d in docs]
    with_docs = pipe.preprocess(prompt, retriever=retriever, num_retrieved_docs=2)
    assert ids(with_docs) == [EOS, *documents[0], *documents[1], *words(prompt), BREAK]
    assert ids(with_docs, "uncond_input_ids") == [EOS, *documents[0], *documents[1], MASK, BREAK]
    # generate's own unconditional stream, when none is given, is <eos> <mask:0> <break>.
    cond = processor(f"{prompt} <break>", return_tensors="pt")["input_ids"]
    given = torch.tensor([[EOS, MASK, BREAK]])
    assert torch.equal(model.generate(cond, guidance_scale=3.0, do_sample=False),
                       model.generate(cond, uncond_input_ids=given, guidance_scale=3.0, do_sample=False))
    # The image-text-to-image pipeline: the source image is a document in front of the instruction (or <mask:0>).
    edit = pipeline("image-text-to-image", model=str(model_dir))
    image = world["test"][1]["images"][0]
    streams = edit.preprocess({"image": image, "prompt": "make the star blue"})
    source = [*words("Edit the image following the text instruction"), BREAK, *codes(image), BREAK]
    assert ids(streams) == [EOS, *source, *words("make the star blue"), BREAK]
    assert ids(streams, "image_cond_input_ids") == [EOS, *source, MASK, BREAK]
    assert ids(streams, "uncond_input_ids") == [EOS, MASK, BREAK]
    assert layout.unconditional_prompt() == [EOS, MASK, BREAK]
    with pytest.raises(ValueError, match="non-empty string"):
        processor.encode_prompt("  ")
    with pytest.raises(ValueError, match="exactly one `<image>`"):
        processor.encode_prompt("make it blue", image=image, template="{prompt} <break>")


def test_progress_bar_counts_generated_tokens(text_to_image):
    model, processor = text_to_image.model, text_to_image.processor
    bar = TokenProgressBar(model.config.image_seq_length, "test", disable=True)
    model.generate(**processor("a star <break>", return_tensors="pt"), guidance_scale=3.0, generate_image=True,
                   streamer=bar, do_sample=False)
    assert bar.steps == model.config.image_seq_length


def test_text_to_image_bad_input_is_named_before_any_work(text_to_image, model_dir, monkeypatch):
    """Every argument is checked before the prompt is encoded or a token generated (diffusers' `check_inputs`)."""
    edit = pipeline("image-text-to-image", model=str(model_dir))
    for pipe in (text_to_image, edit):
        monkeypatch.setattr(pipe.model, "generate", lambda *a, **k: pytest.fail("generated before checking"))
        monkeypatch.setattr(pipe.processor, "encode_prompt", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(ValueError, match="non-empty string"):
        text_to_image.preprocess("   ")
    cases = [
        (dict(num_candidates=4), "needs a `reranker`"),
        (dict(decoding="beam"), "`decoding` must be one of"),
        (dict(output_type="latent"), "`output_type` must be one of"),
        (dict(guidance_scale=-2.0), "`guidance_scale` must be a finite number >= 0"),
        (dict(guidance_scale=float("inf")), "`guidance_scale` must be a finite number >= 0"),
        (dict(num_retrieved_docs=1), "needs a `retriever`"),
        (dict(generator=[torch.Generator()] * 3, num_images_per_prompt=2), "a list of 2"),
        (dict(max_new_tokens=5), "exactly 64 tokens"),
        (dict(num_images_per_prompt=0), "positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            text_to_image("a star", **kwargs)
    image = Image.new("RGB", (64, 64))
    for kwargs, message in [(dict(output_type="latent"), "`output_type`"), (dict(image_guidance_scale=-1.0), "`image_guidance_scale`"),
                            (dict(template="{prompt}"), "exactly one `<image>`")]:
        with pytest.raises(ValueError, match=message):
            edit(image, prompt="make it blue", **kwargs)


def test_captioning_runs_in_transformers_image_text_to_text(model_dir, world):
    """transformers' own pipeline, our model and chat template: the CM3 infill prompt, text only, ends at <eoss>."""
    pipe = pipeline("image-text-to-text", model=str(model_dir))
    image = world["test"][0]["images"][0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Question: what colour is the star? Answer:"}]}]
    out = pipe(text=messages, max_new_tokens=12, generate_kwargs={"do_sample": False}, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
    processor, model = pipe.processor, pipe.model
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == "Question: what colour is the star? Answer: <mask:0> <break> <image> <mask:0>"
    inputs = processor(rendered, images=[image], return_tensors="pt")
    ids = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    new = ids[0, inputs["input_ids"].shape[1] :]
    assert not (new >= model.config.image_token_offset).any()  # after <mask:0> the layout says text
    expected = " ".join(s for s in processor.decode(new, skip_special_tokens=True) if isinstance(s, str))
    assert out[0]["generated_text"].strip() == expected
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "red."}]}]
    assert processor.apply_chat_template(messages + answer, tokenize=False).endswith("<mask:0> red. <eoss> <eos>")


def test_image_to_image_editing_streams(model_dir, world):
    pipe = pipeline("image-text-to-image", model=str(model_dir))
    image = world["test"][1]["images"][0]
    out = pipe(image, prompt="make the star blue", generator=torch.Generator().manual_seed(0), progress_bar=False)
    assert isinstance(out[0]["image"], Image.Image)
    processor, model = pipe.processor, pipe.model
    template = "Edit the image following the text instruction <break> <image> <break> {} <break>"
    full = processor(template.format("make the star blue"), images=[image], return_tensors="pt")
    image_only = processor(template.format("<mask:0>"), images=[image], return_tensors="pt")
    ids = model.generate(**full, image_cond_input_ids=image_only["input_ids"], guidance_scale=7.5, image_guidance_scale=1.5,
                         generate_image=True, do_sample=False)
    via_pipe = pipe(image, prompt="make the star blue", do_sample=False, output_type="ids", progress_bar=False)
    assert via_pipe[0]["image"].tolist() == ids[0, -model.config.image_seq_length :].tolist()
    plain = pipe(image, prompt="make the star blue", image_guidance_scale=None, guidance_scale=3.0, do_sample=False,
                 output_type="ids", progress_bar=False)
    assert not torch.equal(plain[0]["image"], via_pipe[0]["image"])
    with pytest.raises(ValueError, match="needs the source image"):
        pipe(None, prompt="make the star blue")
    with pytest.raises(ValueError, match="needs an instruction"):
        pipe(image)


@pytest.mark.filterwarnings("ignore::cm3leon_hf.processing_cm3leon.UnknownWordsWarning")  # a BPE of captions only
def test_image_task_presets_are_the_instruction_tuning_prompts(model_dir, world):
    """`task="edge" | "segmentation" | "infill" | "edit"`: the prompt `sft_data.format_example` trains on (its first
    template form) and the paper's guidance (CFG 3 for structure; instruct-CFG 7.5 / 1.5 for edits)."""
    from cm3leon_hf.layout import EDIT_TEMPLATE
    from cm3leon_hf.pipelines import IMAGE_TASKS
    from cm3leon_hf.sft_data import format_example
    from cm3leon_hf.synthetic import make_row
    from cm3leon_hf.synthetic.tasks import box_text

    assert IMAGE_TASKS["edit"]["template"] == EDIT_TEMPLATE
    pipe = pipeline("image-text-to-image", model=str(model_dir))
    processor = pipe.processor
    checked = set()
    for index in range(12):  # rows whose drawn template is the first form, for each condition and for infill
        for task in ("structure", "infill"):
            row = make_row(task, "test", index)
            prompt, _, images = format_example(task, row, index=index)
            preset = row["condition"] if task == "structure" else "infill"
            text = row["caption"] if task == "structure" else box_text(row["region"])
            ours = processor.encode_prompt(text, image=images[0], template=IMAGE_TASKS[preset]["template"])
            if ours["input_ids"][0].tolist() == processor(prompt, images=images[:1])["input_ids"][0]:
                checked.add(preset)
    assert checked == {"edge", "segmentation", "infill"}
    image = world["test"][1]["images"][0]
    by_task = pipe(image, prompt="a red star", task="edge", do_sample=False, output_type="ids", progress_bar=False)
    by_hand = pipe(image, prompt="a red star", template=IMAGE_TASKS["edge"]["template"], guidance_scale=3.0,
                   image_guidance_scale=None, do_sample=False, output_type="ids", progress_bar=False)
    assert torch.equal(by_task[0]["image"], by_hand[0]["image"])
    louder = pipe(image, prompt="a red star", task="edge", guidance_scale=6.0, do_sample=False, output_type="ids",
                  progress_bar=False)  # a scale given with the task wins
    assert not torch.equal(louder[0]["image"], by_task[0]["image"])
    with pytest.raises(ValueError, match=r"`task` must be one of \['edge', 'edit', 'infill', 'segmentation'\]"):
        pipe(image, prompt="a red star", task="depth")
    # A model's own scales for a task (its generation config) replace the paper's; other tasks keep the paper's.
    pipe.model.generation_config.task_guidance_scales = {"edge": {"guidance_scale": 1.25},
                                                         "edit": {"guidance_scale": 1.5, "image_guidance_scale": 1.25}}
    try:
        saved = pipe(image, prompt="a red star", task="edge", do_sample=False, output_type="ids", progress_bar=False)
        at_125 = pipe(image, prompt="a red star", template=IMAGE_TASKS["edge"]["template"], guidance_scale=1.25,
                      image_guidance_scale=None, do_sample=False, output_type="ids", progress_bar=False)
        assert torch.equal(saved[0]["image"], at_125[0]["image"]) and not torch.equal(saved[0]["image"], by_task[0]["image"])
        edit = pipe(image, prompt="make the star blue", task="edit", do_sample=False, output_type="ids", progress_bar=False)
        by_hand = pipe(image, prompt="make the star blue", guidance_scale=1.5, image_guidance_scale=1.25, do_sample=False,
                       output_type="ids", progress_bar=False)
        assert torch.equal(edit[0]["image"], by_hand[0]["image"])
        segmentation = pipe(image, prompt="a red star", task="segmentation", do_sample=False, output_type="ids",
                            progress_bar=False)
        paper = pipe(image, prompt="a red star", template=IMAGE_TASKS["segmentation"]["template"], guidance_scale=3.0,
                     image_guidance_scale=None, do_sample=False, output_type="ids", progress_bar=False)
        assert torch.equal(segmentation[0]["image"], paper[0]["image"])
    finally:
        del pipe.model.generation_config.task_guidance_scales


def test_processor_for_another_model_is_refused(model_dir):
    config = Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-350m")
    from cm3leon_hf import Cm3LeonForCausalLM

    other = Cm3LeonForCausalLM(Cm3LeonConfig(**{**config.to_dict(), "num_hidden_layers": 1, "hidden_size": 64,
                                                 "num_attention_heads": 2, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="text_vocab_size"):
        pipeline("text-to-image", model=other, processor=Cm3LeonProcessor.from_pretrained(model_dir))


def test_saved_pipeline_loads_in_a_fresh_process_without_the_package(text_to_image, tmp_path):
    """With the newest and the lowest supported transformers (`transformers_environments`): the processor, the model
    and the pipeline all load from the saved code, and give the ids this process gives."""
    saved = tmp_path / "saved-pipeline"
    text_to_image.save_pretrained(saved)
    expected = image_ids_of(text_to_image, "a red star", generator=torch.Generator().manual_seed(5))[0]["image"]
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        import transformers
        from transformers import AutoProcessor, pipeline

        torch.set_num_threads(1)
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "Cm3LeonProcessor" and processor.image_seq_length == 64
        pipe = pipeline("text-to-image", model={str(saved)!r}, trust_remote_code=True)
        out = pipe("a red star", output_type="ids", progress_bar=False, generator=torch.Generator().manual_seed(5))
        assert "cm3leon_hf" not in sys.modules, "the package was imported"
        print(transformers.__version__, type(pipe).__name__, " ".join(map(str, out[0]["image"].tolist())))
        """
    )
    for version, variables in transformers_environments():
        env = {**os.environ, **variables, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / f"modules-{version}")}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, f"transformers {version}: {result.stderr[-3000:]}"
        assert "Do you wish to run the custom code" not in result.stdout  # trust_remote_code reached every loader
        loaded_version, name, *ids = result.stdout.strip().splitlines()[-1].split()
        assert Version(loaded_version) == Version(version) and name == "Cm3LeonTextToImagePipeline"
        assert [int(i) for i in ids] == expected.tolist()

def test_prompt_keyword_and_generator_lists_follow_diffusers(text_to_image):
    seeded = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    positional = image_ids_of(text_to_image, "a red star", generator=seeded(3))
    keyword = text_to_image(prompt="a red star", output_type="ids", progress_bar=False, generator=seeded(3))
    assert keyword[0]["image"].tolist() == positional[0]["image"].tolist()
    # One generator per image: image i is what generator i alone gives.
    pair = image_ids_of(text_to_image, "a red star", num_images_per_prompt=2, generator=[seeded(7), seeded(8)])
    alone = [image_ids_of(text_to_image, "a red star", generator=seeded(s))[0]["image"] for s in (7, 8)]
    assert [p["image"].tolist() for p in pair] == [a.tolist() for a in alone]
    with pytest.raises(ValueError, match="list of 2"):
        image_ids_of(text_to_image, "a red star", num_images_per_prompt=2, generator=[seeded(7)])
    with pytest.raises(ValueError, match="Give a prompt"):
        text_to_image(progress_bar=False)


def test_callers_streamer_and_image_length_are_honoured(text_to_image):
    length = text_to_image.model.config.image_seq_length

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = 0, False

        def put(self, value):
            self.puts += 1

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = image_ids_of(text_to_image, "a red star", streamer=recorder, max_new_tokens=length,
                       generator=torch.Generator().manual_seed(0))
    assert out[0]["image"].shape == (length,)
    assert recorder.puts == 1 + length and recorder.ended  # the prompt, then every image token
    with pytest.raises(ValueError, match=f"exactly {length} tokens"):
        image_ids_of(text_to_image, "a red star", max_new_tokens=length - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_moves_the_vq_with_the_model(model_dir, world):
    """`pipeline(..., device="cuda")` moves the model; the VQ that decodes its images (and encodes the images edited)
    must follow, or decoding fails on mixed devices."""
    pipe = pipeline("text-to-image", model=str(model_dir), device="cuda")
    assert pipe.model.device.type == "cuda" and pipe.processor.image_tokenizer.device.type == "cuda"
    image = pipe("a red star", progress_bar=False)[0]["image"]
    assert image.size == (64, 64)
    edit = pipeline("image-text-to-image", model=str(model_dir), device="cuda")
    assert edit(world["train"][0]["images"][0], prompt="make it blue", progress_bar=False)[0]["image"].size == (64, 64)
