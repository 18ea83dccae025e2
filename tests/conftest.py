"""Test settings: offline, one torch thread (tiny models run slower with two on this 2-core machine), determinism."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parent.parent
HUB_CONFIGS = REPO / "hub_configs"


@pytest.fixture
def tiny_config():
    from cm3leon_hf import Cm3LeonConfig

    return Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")
