"""Test settings (offline, one torch thread: tiny models run slower with two on this 2-core machine, determinism) and
the helpers several test files share (`random_model`, `left_padded`)."""

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


def random_model(config, seed: int = 0, std: float = 0.05):
    """A `Cm3LeonForCausalLM` with every weight drawn from N(0, std). The paper's init zeroes the residual projections,
    which would make attention and feed-forward invisible in the logits and the tests blind to them."""
    from cm3leon_hf import Cm3LeonForCausalLM

    torch.manual_seed(seed)
    model = Cm3LeonForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch: `(input_ids, attention_mask)`."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def transformers_environments() -> list[tuple[str, dict]]:
    """`(version, environment variables)` to run a fresh Python with each end of the supported transformers range:
    the installed one (`make test` installs the newest) and, when it differs, the lowest of setup.cfg's range, which
    `make test` installs without dependencies into `.compat/transformers-<lowest>` and which goes first on
    PYTHONPATH."""
    import re

    import transformers
    from packaging.version import Version

    lowest = re.search(r"transformers>=([0-9.]+)", (REPO / "setup.cfg").read_text()).group(1)
    environments = [(transformers.__version__, {})]
    if Version(transformers.__version__) != Version(lowest):
        target = REPO / ".compat" / f"transformers-{lowest}"
        if not (target / "transformers").is_dir():
            pytest.fail(f"transformers {lowest} (the lowest supported) is not in {target}; `make test` installs it, or: "
                        f"pip install --no-deps --target {target} transformers=={lowest}")
        environments.append((lowest, {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}))
    return environments
