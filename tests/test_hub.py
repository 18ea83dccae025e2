"""Hub conventions: Auto classes, safetensors round trips, remote code in a fresh process, Hub-cache resolution,
model card, and the paper's sizes."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from packaging.version import Version
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from cm3leon_hf import HUB_CONFIGS as HUB_CONFIGS_INSTALLED, Cm3LeonConfig, Cm3LeonForCausalLM, Cm3LeonModel
from conftest import HUB_CONFIGS, REPO, transformers_environments


@pytest.fixture
def saved(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = Cm3LeonForCausalLM(tiny_config).eval()
    with torch.no_grad():  # non-trivial weights (the paper's init zeroes the residual projections)
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "cm3leon-tiny"
    model.save_pretrained(path)
    return model, path


def test_save_and_auto_load_round_trip(saved):
    model, path = saved
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickle
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "cm3leon"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cm3leon.Cm3LeonConfig",
        "AutoModel": "modeling_cm3leon.Cm3LeonModel",
        "AutoModelForCausalLM": "modeling_cm3leon.Cm3LeonForCausalLM",
        "AutoModelForImageTextToText": "modeling_cm3leon.Cm3LeonForCausalLM",
    }
    assert {"configuration_cm3leon.py", "modeling_cm3leon.py"} <= {p.name for p in path.iterdir()}

    assert type(AutoConfig.from_pretrained(path)) is Cm3LeonConfig
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is Cm3LeonForCausalLM
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    base = AutoModel.from_pretrained(path)
    assert type(base) is Cm3LeonModel
    assert torch.equal(base.layers[1].fc2.weight, model.model.layers[1].fc2.weight)


def test_fresh_process_loads_saved_directory_with_remote_code_only(saved, tmp_path):
    """With the newest and the lowest supported transformers (`transformers_environments`)."""
    model, path = saved
    ids = torch.tensor([[1, 300, 301, 302, 2, 1100, 1200]])
    with torch.no_grad():
        expected = model(ids).logits
    save_file({"ids": ids, "logits": expected}, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        import transformers
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)  # as in this process: the same kernels, bit-identical logits
        ref = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        assert "cm3leon_hf" not in sys.modules, "the package was imported"
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        print(transformers.__version__, type(model).__name__, (logits - ref["logits"]).abs().max().item())
        """
    )
    for version, variables in transformers_environments():
        env = {**os.environ, **variables, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / f"modules-{version}")}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, f"transformers {version}: {result.stderr[-3000:]}"
        loaded_version, name, diff = result.stdout.split()[-3:]
        assert Version(loaded_version) == Version(version) and name == "Cm3LeonForCausalLM"
        assert float(diff) == 0.0


def test_from_pretrained_resolves_hub_cache_snapshot_offline(saved, tmp_path):
    model, path = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--cm3leon-tiny"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = AutoModelForCausalLM.from_pretrained("some-org/cm3leon-tiny", cache_dir=tmp_path / "hub")
    assert type(loaded) is Cm3LeonForCausalLM
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained("some-org/not-there", cache_dir=tmp_path / "hub")


def test_saved_directory_carries_rendered_model_card(saved):
    model, path = saved
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "any-to-any"
    assert card.data.license == "apache-2.0"
    assert {"cm3leon", "text-to-image", "image-to-text"} <= set(card.data.tags)
    assert "{{" not in card.text and "}}" not in card.text  # every template variable was filled
    assert f"| parameters | {model.num_parameters():,} " in card.text
    assert "| layers × width | 4 × 256 |" in card.text
    assert "`<mask:0..15>` 4–19" in card.text


def test_push_to_hub_uploads_our_card_in_one_commit(saved, monkeypatch):
    """The network boundary (HfApi) is replaced by a recorder; everything on our side runs for real."""
    import huggingface_hub

    model, _ = saved
    uploaded = {}

    class Repo:
        repo_id = "some-org/cm3leon-tiny"

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        uploaded["created"] = repo_id
        return Repo()

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        uploaded["files"] = {p: open(os.path.join(folder_path, p), "rb").read() for p in os.listdir(folder_path)}
        uploaded["message"] = commit_message
        return "commit-url"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert model.push_to_hub("cm3leon-tiny", tags=["synthetic-world"]) == "commit-url"
    assert uploaded["created"] == "cm3leon-tiny"
    assert {"config.json", "model.safetensors", "modeling_cm3leon.py", "README.md"} <= uploaded["files"].keys()
    card = ModelCard(uploaded["files"]["README.md"].decode())
    assert "synthetic-world" in card.data.tags and "cm3leon" in card.data.tags
    assert 'from_pretrained("some-org/cm3leon-tiny"' in card.text


# --- the paper's sizes ------------------------------------------------------------------------------------------------

PAPER_SIZES = {  # Table 3: layers, width, nominal parameters
    "cm3leon-350m": (24, 1024, 350e6),
    "cm3leon-760m": (24, 1536, 760e6),
    "cm3leon-7b": (32, 4096, 7e9),
}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_sizes_count_within_ten_percent(name):
    layers, width, nominal = PAPER_SIZES[name]
    config = AutoConfig.from_pretrained(HUB_CONFIGS / name)
    assert (config.num_hidden_layers, config.hidden_size) == (layers, width)
    assert config.max_position_embeddings == 4096
    assert (config.text_vocab_size, config.image_vocab_size, config.image_seq_length) == (56320, 8192, 1024)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - nominal) / nominal < 0.10, count
    # The model card states the exact count.
    row = re.search(rf"\| `{name}` \|.*\| ([\d,]+) \|", (REPO / "model_card.md").read_text())
    assert row and int(row.group(1).replace(",", "")) == count


def test_generation_configs_match_the_special_ids():
    for directory in HUB_CONFIGS.iterdir():
        config = Cm3LeonConfig.from_pretrained(directory)
        generation = json.loads((directory / "generation_config.json").read_text())
        assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
            config.bos_token_id,
            [config.eos_token_id, config.eoss_token_id],  # an infilled span ends at <eoss>
            config.pad_token_id,
        )
        assert (generation["do_sample"], generation["top_p"], generation["top_k"]) == (True, 0.8, 0)
        assert "auto_map" not in json.loads((directory / "config.json").read_text())  # no code ships with them


def test_safetensors_weights_hold_one_copy_of_the_tied_matrix(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors


def test_cli_info_counts_parameters(capsys):
    from cm3leon_hf.cli import main

    assert main(["info", str(HUB_CONFIGS / "cm3leon-760m")]) == 0
    out = capsys.readouterr().out
    assert "parameters        784,859,136" in out
    assert "image codes [56320, 64512)" in out


def test_cli_info_reads_a_shipped_configuration_by_name(capsys, tmp_path, monkeypatch):
    from cm3leon_hf.cli import main

    monkeypatch.chdir(tmp_path)  # no hub_configs/ here: the name resolves to the installed copy
    assert main(["info", "cm3leon-760m"]) == 0
    assert "parameters        784,859,136" in capsys.readouterr().out


def test_installed_hub_configs_load_from_any_directory(tmp_path):
    """`cm3leon_hf.HUB_CONFIGS` is the repository's `hub_configs/` as installed with the package (README example)."""
    code = (
        "from transformers import AutoConfig\n"
        "from cm3leon_hf import HUB_CONFIGS\n"
        "config = AutoConfig.from_pretrained(HUB_CONFIGS / 'cm3leon-350m')\n"
        "print(type(config).__name__, config.num_hidden_layers, config.hidden_size)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Cm3LeonConfig", "24", "1024"]
    assert sorted(p.name for p in HUB_CONFIGS_INSTALLED.iterdir()) == sorted(p.name for p in HUB_CONFIGS.iterdir())
