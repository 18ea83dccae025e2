"""training/train_image_tokenizer.py on a tiny image dataset: checkpoints written atomically, eval metrics, the saved
image tokenizer, an interrupted run resumed to exactly the weights of an uninterrupted one, and --init-from (same
shape, more codes, or widened)."""

import json
import re
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cm3leon_hf.image_tokenizer import Cm3LeonImageTokenizer
from conftest import REPO

sys.path.insert(0, str(REPO / "training"))
import train_image_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    rng = np.random.default_rng(0)

    def split(n):  # rows with a list of 1–2 images, like the synthetic world's `images` column
        images = [[Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)) for _ in range(1 + i % 2)] for i in range(n)]
        features = datasets.Features({"images": datasets.Sequence(datasets.Image())})
        return datasets.Dataset.from_dict({"images": images}, features=features)

    path = tmp_path_factory.mktemp("data") / "images"
    datasets.DatasetDict({"train": split(10), "validation": split(3)}).save_to_disk(str(path))
    return path


def arguments(dataset_dir, output_dir, max_steps, *extra):
    return [
        "--dataset", str(dataset_dir), "--output-dir", str(output_dir), "--max-steps", str(max_steps),
        "--resolution", "16", "--block-out-channels", "8", "8", "--norm-num-groups", "4", "--latent-channels", "8",
        "--vq-embed-dim", "4", "--num-codes", "16", "--batch-size", "4", "--restart-every", "2",
        "--warmup-steps", "1", "--learning-rate", "1e-3", "--min-learning-rate", "1e-3",
        "--checkpoint-every", "2", "--keep-checkpoints", "2", "--eval-every", "3", "--eval-images", "4", "--log-every", "1",
        *extra,
    ]  # fmt: skip


def test_training_writes_checkpoints_eval_and_the_image_tokenizer(dataset_dir, tmp_path):
    final = train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 5, "--disc-weight", "0.1", "--disc-start", "3"))
    assert final["step"] == 5 and final["stop"] == "max_steps"
    assert 0 < final["eval"]["psnr"] < 60 and 0 < final["eval"]["codebook_usage"] <= 1
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]  # 2 kept
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary directory left behind
    checkpoint = tmp_path / "checkpoint-5"
    assert {p.name for p in checkpoint.iterdir()} == {
        "vq", "discriminator.safetensors", "optimizer_vq.safetensors", "optimizer_discriminator.safetensors",
        "trainer_state.json",
    }  # fmt: skip
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["position"]["epoch_rows"] == 10
    assert state["position"]["rows"] * 1.5 <= 20 + 2  # 5 batches of 4 images from rows of 1–2 images
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [3, 5]
    assert any("discriminator" in r for r in log) and any("restarted_codes" in r for r in log)
    image_tokenizer = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "image_tokenizer")
    assert image_tokenizer.image_seq_length == 64 and image_tokenizer.codebook_size == 16


def test_resume_continues_exactly(dataset_dir, tmp_path):
    straight = train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "straight", 6, "--normalize-codes"))
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "resumed", 4, "--normalize-codes"))
    resumed = train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "resumed", 6, "--normalize-codes", "--resume"))
    assert resumed["step"] == straight["step"] == 6
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "vq" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-6" / "vq" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    codebook = a["quantize.embedding.weight"]
    assert torch.allclose(codebook.norm(dim=-1), torch.ones(16), atol=1e-5)  # --normalize-codes keeps unit norms


def test_missing_image_column_is_named(dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="no column 'image'"):
        train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 1, "--image-column", "image"))


def test_init_from_starts_from_the_trained_weights(dataset_dir, tmp_path):
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "base", 3))
    base = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "base" / "image_tokenizer").vq_model.state_dict()
    # Zero steps: the weights are exactly the source's, codebook included (same size).
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "same", 0, "--init-from", str(tmp_path / "base" / "image_tokenizer")))
    same = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "same" / "image_tokenizer").vq_model.state_dict()
    assert all(torch.equal(base[k], same[k]) for k in base)
    # More codes: everything but the codebook is copied; the codebook is re-initialised from the data.
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "wider", 0, "--init-from", str(tmp_path / "base" / "image_tokenizer"), "--num-codes", "32"))
    wider = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "wider" / "image_tokenizer").vq_model.state_dict()
    assert wider["quantize.embedding.weight"].shape == (32, 4)
    assert all(torch.equal(base[k], wider[k]) for k in base if k != "quantize.embedding.weight")
    # Another architecture is refused with the reason.
    with pytest.raises(ValueError, match="does not have this architecture"):
        train_image_tokenizer.main(
            arguments(dataset_dir, tmp_path / "other", 1, "--init-from", str(tmp_path / "base" / "image_tokenizer"), "--latent-channels", "4")
        )


def test_init_from_a_narrower_vq_widens_it_without_changing_what_it_computes(dataset_dir, tmp_path):
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "base", 3))
    source = str(tmp_path / "base" / "image_tokenizer")
    wide_args = ("--init-from", source, "--block-out-channels", "16", "16", "--norm-num-groups", "8")
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "wide", 0, *wide_args))
    narrow = Cm3LeonImageTokenizer.from_pretrained(source)
    wide = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "wide" / "image_tokenizer")
    assert wide.vq_model.config.block_out_channels == [16, 16]
    assert sum(p.numel() for p in wide.vq_model.parameters()) > 3 * sum(p.numel() for p in narrow.vq_model.parameters())
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = narrow.vq_model.encode(pixels).latents
        assert torch.allclose(wide.vq_model.encode(pixels).latents, latents, atol=1e-5)  # encoder, attention included
        assert torch.allclose(wide.vq_model.decode(latents).sample, narrow.vq_model.decode(latents).sample, atol=1e-5)
    codes = narrow.encode_pixels(pixels)
    assert torch.equal(wide.encode_pixels(pixels), codes)
    # The new channels are live: the zero weights from them into trained channels get gradients, so they can learn.
    wide.vq_model.train()
    wide.vq_model.decode(latents).sample.square().mean().backward()
    into_trained = wide.vq_model.decoder.conv_out.weight.grad[:, 8:]
    assert torch.equal(wide.vq_model.decoder.conv_out.weight[:, 8:], torch.zeros_like(into_trained))
    assert into_trained.abs().sum() > 0
    # Widening and a new codebook size together: the codebook is re-initialised from the data, as without widening.
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "wide_more_codes", 0, *wide_args, "--num-codes", "24"))
    more = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "wide_more_codes" / "image_tokenizer").vq_model.state_dict()
    assert more["quantize.embedding.weight"].shape == (24, 4)
    assert torch.equal(more["decoder.conv_out.weight"], wide.vq_model.state_dict()["decoder.conv_out.weight"])
    # Widths and norm groups must grow by one whole factor (else group norm statistics would change).
    with pytest.raises(ValueError, match="times one factor"):
        train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "bad", 0, "--init-from", source, "--block-out-channels", "16", "16"))


def test_discriminator_learning_rate_is_its_own(dataset_dir, tmp_path):
    def discriminator_after(steps, *extra):
        out = tmp_path / f"{steps}{'-'.join(extra)}"
        gan = ("--disc-weight", "0.1", "--disc-start", "0", "--checkpoint-every", "1", *extra)
        train_image_tokenizer.main(arguments(dataset_dir, out, steps, *gan))
        return load_file(out / f"checkpoint-{steps}" / "discriminator.safetensors")

    frozen = discriminator_after(1, "--disc-learning-rate", "0"), discriminator_after(2, "--disc-learning-rate", "0")
    assert all(torch.equal(frozen[0][k], frozen[1][k]) for k in frozen[0])  # lr 0: the discriminator never moves
    trained = discriminator_after(1), discriminator_after(2)  # default: the VQ's learning rate
    assert not all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_edge_map_marks_both_sides_of_an_edge_and_nothing_flat():
    pixels = torch.full((1, 3, 8, 8), -1.0)
    pixels[..., 4:] = 1.0  # a vertical step between columns 3 and 4
    edges = train_image_tokenizer.edge_map(pixels)
    assert edges.shape == (1, 1, 8, 8)
    assert torch.equal(edges[0, 0, :, 2:5], torch.ones(8, 3))  # both pixels across the step, and the one before
    assert edges[0, 0, :, :2].abs().sum() == 0 and edges[0, 0, :, 5:].abs().sum() == 0
    assert train_image_tokenizer.edge_map(torch.zeros(2, 3, 8, 8)).abs().sum() == 0
    faint = pixels * 0.05  # a step of 0.1 (a twentieth of the range) is a fifth of an edge
    assert torch.allclose(train_image_tokenizer.edge_map(faint).amax(), torch.tensor(0.2))


def test_edge_weight_moves_the_loss_onto_edges():
    vq = train_image_tokenizer.build_vq_model(train_image_tokenizer.parse_args(arguments("unused", "unused", 1)))
    pixels = torch.full((1, 3, 16, 16), -1.0)
    pixels[..., 4:8, 4:8] = 1.0  # a small square on a flat background
    plain = train_image_tokenizer.parse_args(arguments("unused", "unused", 1))
    weighted = train_image_tokenizer.parse_args(arguments("unused", "unused", 1, "--edge-weight", "10"))
    reconstruction, losses, *_ = train_image_tokenizer.vq_forward(vq, pixels, plain)
    _, weighted_losses, *_ = train_image_tokenizer.vq_forward(vq, pixels, weighted)
    difference = (reconstruction - pixels).abs()
    edges = train_image_tokenizer.edge_map(pixels)
    weights = (1 + 10 * edges) / (1 + 10 * edges).mean()
    assert torch.allclose(losses["l1"], difference.mean())
    assert torch.allclose(weighted_losses["l1"], (weights * difference).mean())
    assert not torch.allclose(weighted_losses["l1"], losses["l1"])


def test_freeform_fraction_puts_the_same_drawings_first_in_every_run(dataset_dir, tmp_path):
    args = train_image_tokenizer.parse_args(arguments(dataset_dir, tmp_path, 1, "--freeform-fraction", "0.5"))
    world = [Image.new("RGB", (16, 16), "white")] * 4
    first, again = train_image_tokenizer.with_freeform(world, 7, args), train_image_tokenizer.with_freeform(world, 7, args)
    assert [np.asarray(a).tobytes() for a in first] == [np.asarray(a).tobytes() for a in again]  # resumable
    assert first[2:] == world[2:] and all(a.size == (16, 16) for a in first[:2])
    assert np.asarray(first[0]).tobytes() != np.asarray(train_image_tokenizer.with_freeform(world, 8, args)[0]).tobytes()
    final = train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 3, "--freeform-fraction", "0.5"))
    assert 0 < final["eval"]["freeform_psnr"] < 60
    with pytest.raises(SystemExit):
        train_image_tokenizer.parse_args(arguments(dataset_dir, tmp_path, 1, "--freeform-fraction", "1.5"))


def test_freeze_encoder_keeps_every_code_and_trains_the_decoder(dataset_dir, tmp_path):
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "base", 3))
    source = tmp_path / "base" / "image_tokenizer"
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path / "frozen", 4, "--init-from", str(source), "--freeze-encoder",
                                         "--freeform-fraction", "0.5"))
    base = Cm3LeonImageTokenizer.from_pretrained(source)
    tuned = Cm3LeonImageTokenizer.from_pretrained(tmp_path / "frozen" / "image_tokenizer")
    a, b = base.vq_model.state_dict(), tuned.vq_model.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)  # codebook too: no dead-code restarts
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)) for i in range(3)]
    assert torch.equal(base.encode(images), tuned.encode(images))
    with pytest.raises(SystemExit):  # nothing to keep without a trained VQ
        train_image_tokenizer.parse_args(arguments(dataset_dir, tmp_path / "x", 1, "--freeze-encoder"))


def test_freeform_frames_draw_a_shape_that_nearly_fills_the_frame():
    from cm3leon_hf.synthetic.freeform import drawing_image

    for i in range(20):
        image = np.asarray(drawing_image(i, seed=3, frame_fraction=1.0)).astype(int)
        background = image[0, 0]
        # some shape covers most of the frame's inside
        assert (np.abs(image[8:56, 8:56] - background).sum(-1) > 0).mean() > 0.4
    plain = [np.asarray(drawing_image(i, seed=3)) for i in range(5)]
    assert [np.asarray(drawing_image(i, seed=3, frame_fraction=0.0)).tobytes() for i in range(5)] == [p.tobytes() for p in plain]


def test_learning_rate_follows_transformers_schedule_and_resumes_on_it(dataset_dir, tmp_path):
    """The logged learning rates are transformers' cosine-with-min-lr schedule, also after --resume (its state is in
    the checkpoint), and a longer --max-steps on resume stretches the cosine from the step reached."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    schedule = ("--warmup-steps", "2", "--learning-rate", "1e-3", "--min-learning-rate", "1e-4")
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 4, *schedule))
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 6, *schedule, "--resume"))
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r}

    def expected(max_steps, steps):
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 2, max_steps, min_lr=1e-4)
        lrs = []
        for _ in range(steps):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()  # no gradient: only keeps the scheduler's order check quiet
            scheduler.step()
        return lrs

    assert [logged[s] for s in range(1, 5)] == expected(4, 4)  # step s logs the rate its update used
    assert logged[1] == 0.0 and logged[3] == 1e-3
    assert [logged[5], logged[6]] == pytest.approx(expected(6, 6)[4:], rel=1e-12)


def test_recipe_sets_defaults_and_options_win(dataset_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_codes: 24\nbatch_size: 3\nblock_out_channels: [8, 16]\n")
    args = train_image_tokenizer.parse_args(["--config", str(recipe), *arguments(dataset_dir, tmp_path, 1)])
    assert args.batch_size == 4 and args.num_codes == 16  # `arguments` gives both: the command line wins
    args = train_image_tokenizer.parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])
    assert (args.batch_size, args.num_codes, args.block_out_channels) == (3, 24, [8, 16])
    assert args.output_dir == tmp_path and args.init_from is None
    recipe.write_text("num_code: 24\n")
    with pytest.raises(SystemExit):
        train_image_tokenizer.parse_args(["--config", str(recipe), "--output-dir", str(tmp_path)])


@pytest.mark.parametrize("flag, value, message", [
    ("--learning-rate", "nan", "--learning-rate must be at least 0"),
    ("--block-out-channels", "0", "--block-out-channels must be at least 1"),
    ("--freeform-frames", "2", r"--freeform-frames must be in \[0, 1\]"),
    ("--num-codes", "0", "--num-codes must be at least 1"),
])
def test_bad_options_are_named(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train_image_tokenizer.parse_args(["--output-dir", "unused", flag, value])
    assert re.search(message, capsys.readouterr().err)


DDP_WRAPPER = """
import os, sys
sys.path.insert(0, {training!r})
import train_image_tokenizer
from safetensors.torch import save_file

kept = []
class Keep(train_image_tokenizer.Cm3LeonImageTokenizer):  # every process's VQ, for the test to compare
    def __init__(self, vq, *args, **kwargs):
        super().__init__(vq, *args, **kwargs)
        kept.append(vq)
train_image_tokenizer.Cm3LeonImageTokenizer = Keep
train_image_tokenizer.main(sys.argv[2:])
save_file({{k: v.contiguous() for k, v in kept[0].state_dict().items()}}, f"{{sys.argv[1]}}/rank{{os.environ.get('RANK', 0)}}.safetensors")
"""


@pytest.mark.slow
def test_two_processes_hold_one_vq_and_match_one_process(dataset_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): with codebook restarts and the GAN, both processes end with the same VQ;
    without restarts (they draw from the main process's half of the batch), 2 x 2 images train as 1 x 4 do."""
    import os
    import subprocess

    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(DDP_WRAPPER.format(training=str(REPO / "training")))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(wrapper)]

    def run(command, out, steps, *extra):
        out.mkdir()
        subprocess.run([*command, str(out), *arguments(dataset_dir, out / "run", steps, "--cpu", *extra)], check=True,
                       env=env, capture_output=True)
        return {path.stem: load_file(path) for path in sorted(out.glob("rank*.safetensors"))}

    gan = ("--batch-size", "2", "--disc-weight", "0.1", "--disc-start", "0", "--freeform-fraction", "0.5")
    ranks = run(torchrun, tmp_path / "gan", 5, *gan)
    assert sorted(ranks) == ["rank0", "rank1"]
    assert all(torch.equal(ranks["rank0"][k], ranks["rank1"][k]) for k in ranks["rank0"])
    log = [json.loads(line) for line in (tmp_path / "gan" / "run" / "log.jsonl").read_text().splitlines()]
    assert any("restarted_codes" in r for r in log) and any("discriminator" in r for r in log)

    source = ("--init-from", str(tmp_path / "gan" / "run" / "image_tokenizer"), "--restart-every", "0")
    one = run([sys.executable, str(wrapper)], tmp_path / "one", 4, *source, "--batch-size", "4")["rank0"]
    two = run(torchrun, tmp_path / "two", 4, *source, "--batch-size", "2")["rank0"]
    start = load_file(tmp_path / "gan" / "run" / "image_tokenizer" / "diffusion_pytorch_model.safetensors")
    assert max((one[k] - start[k]).abs().max() for k in one) > 1e-3  # the weights moved ...
    for name in one:  # ... the same way: Adam turns last-bit differences of the all-reduce into ~1e-5
        torch.testing.assert_close(one[name], two[name], rtol=1e-3, atol=1e-4)


def test_a_chain_replays_stops_resumes_and_init_from_in_one_command(dataset_dir, tmp_path):
    """A run stopped at step 3 (--stop-at-step) and resumed to 6 ends with exactly the weights of a straight 6-step
    run; the next stage starts from a kept checkpoint; running the chain again trains nothing more."""
    (tmp_path / "recipe.yaml").write_text(
        f"dataset: {dataset_dir}\nresolution: 16\nblock_out_channels: [8, 8]\nnorm_num_groups: 4\nlatent_channels: 8\n"
        "vq_embed_dim: 4\nnum_codes: 16\nbatch_size: 4\nrestart_every: 2\nwarmup_steps: 1\nlearning_rate: 1.0e-3\n"
        "min_learning_rate: 1.0e-4\ncheckpoint_every: 3\neval_every: 3\neval_images: 4\nlog_every: 1\nbf16: true\n")
    chain = tmp_path / "chain.yaml"
    chain.write_text("config: recipe.yaml\nresult: b\nstages:\n"
                     "  - {name: a, max_steps: 6, stop_at_step: 3}\n"
                     "  - {name: a, max_steps: 6}\n"
                     "  - {name: b, init_from: a/checkpoint-3/vq, max_steps: 2, restart_every: 0, bf16: false}\n")
    runs = tmp_path / "runs"
    final = train_image_tokenizer.run_chain(["--chain", str(chain), "--output-dir", str(runs)])
    assert final["step"] == 2 and final["result"] == str(runs / "b" / "image_tokenizer")
    assert '"stop": "stop_at_step"' in (runs / "a" / "log.jsonl").read_text()
    straight = arguments(dataset_dir, tmp_path / "straight", 6, "--checkpoint-every", "3", "--min-learning-rate", "1e-4",
                         "--bf16")
    train_image_tokenizer.main(straight)
    weights = "vq/diffusion_pytorch_model.safetensors"
    for step in (3, 6):
        a, b = load_file(runs / "a" / f"checkpoint-{step}" / weights), load_file(tmp_path / "straight" / f"checkpoint-{step}" / weights)
        assert all(torch.equal(a[k], b[k]) for k in a)
    trained = [line for line in (runs / "b" / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    before = load_file(runs / "b" / "checkpoint-2" / weights)
    train_image_tokenizer.run_chain(["--chain", str(chain), "--output-dir", str(runs)])  # again: nothing left to train
    after = load_file(runs / "b" / "checkpoint-2" / weights)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not train_image_tokenizer.parse_args([*train_image_tokenizer.stage_options({"bf16": False}, runs),
                                                 "--config", str(tmp_path / "recipe.yaml"), "--output-dir", "x"]).bf16
    assert [line for line in (runs / "b" / "log.jsonl").read_text().splitlines() if '"lr"' in line] == trained


def test_the_shipped_vq_chain_parses_and_each_stage_starts_from_an_earlier_one(tmp_path):
    import yaml

    path = REPO / "training" / "recipes" / "image_tokenizer_tiny_chain.yaml"
    chain = yaml.safe_load(path.read_text())
    seen = []
    for stage in chain["stages"]:
        options = {k: v for k, v in stage.items() if k != "name"}
        args = train_image_tokenizer.parse_args(["--config", str(path.parent / chain["config"]),
                                                 *train_image_tokenizer.stage_options(options, tmp_path),
                                                 "--output-dir", str(tmp_path / stage["name"])])
        if args.init_from is not None:
            assert args.init_from.relative_to(tmp_path).parts[0] in seen
        seen.append(stage["name"])
    assert chain["result"] == seen[-1] == "d2"
    assert (args.num_codes, args.block_out_channels, args.bf16, args.freeze_encoder) == (2048, [16, 32, 64, 128], True, True)


def _images_dataset(path, splits: dict):
    features = datasets.Features({"images": datasets.Sequence(datasets.Image())})
    rng = np.random.default_rng(1)
    make = lambda n, per_row: [[Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8))] * per_row for _ in range(n)]  # noqa: E731
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"images": make(*shape)}, features=features)
                          for name, shape in splits.items()}).save_to_disk(str(path))
    return path


def test_a_dataset_without_the_eval_split_is_named(tmp_path):
    data = _images_dataset(tmp_path / "train-only", {"train": (4, 1)})
    with pytest.raises(ValueError, match=r"no split 'validation' \(its splits: \['train'\]\); pick one with --eval_split"):
        train_image_tokenizer.main(arguments(data, tmp_path / "run", 2))


def test_training_rows_without_images_are_an_error_not_an_endless_loop(tmp_path):
    data = _images_dataset(tmp_path / "no-images", {"train": (5, 0), "validation": (2, 1)})
    with pytest.raises(ValueError, match="rows hold no images in column 'images'"):
        train_image_tokenizer.main(arguments(data, tmp_path / "run", 2))


def test_resume_refuses_options_the_checkpoint_was_not_trained_with(dataset_dir, tmp_path):
    """--resume continues the checkpoint's VQ: another --num_codes crashed in the usage counts, another width was
    silently ignored, a discriminator the run never had was a FileNotFoundError."""
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 2))
    with pytest.raises(ValueError, match=r"--num_codes 32 \(the checkpoint: 16\).*--init_from"):
        train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 4, "--resume", "--num-codes", "32"))
    with pytest.raises(ValueError, match=r"--block_out_channels \[8, 16\] \(the checkpoint: \[8, 8\]\)"):
        train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 4, "--resume", "--block-out-channels", "8", "16"))
    with pytest.raises(ValueError, match="has no discriminator to resume"):
        train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 4, "--resume", "--disc-weight", "0.1"))
    assert train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 4, "--resume"))["step"] == 4  # the same options


def test_a_saved_empty_train_split_is_named(tmp_path):
    data = _images_dataset(tmp_path / "empty-train", {"train": (0, 1), "validation": (2, 1)})
    with pytest.raises(ValueError, match="a split saved with no rows"):
        train_image_tokenizer.main(arguments(data, tmp_path / "run", 2))


def test_resume_passes_over_a_damaged_checkpoint(dataset_dir, tmp_path):
    train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 4))
    weights = tmp_path / "checkpoint-4" / "vq" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after it was saved
    with pytest.warns(UserWarning, match=r"checkpoint-4 is damaged \(vq/.*resuming from the checkpoint before it"):
        final = train_image_tokenizer.main(arguments(dataset_dir, tmp_path, 6, "--resume"))
    assert final["step"] == 6
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "l1" in r or "loss" in r].count(3) == 2  # steps 3 and 4 ran again from step 2
