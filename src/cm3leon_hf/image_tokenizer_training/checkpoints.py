"""The VQ training's checkpoints, `checkpoint-<step>/`: the VQ (diffusers format), the discriminator and the
optimizer moments (safetensors) and `trainer_state.json`. Written as a whole (`atomic.atomic_directory`), so a crash
never leaves half a checkpoint; the last `keep` are kept (transformers' `rotate_checkpoints`). Not pickles: loading
one runs no code."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.trainer_utils import rotate_checkpoints

from ..atomic import atomic_directory


def save_checkpoint(directory: Path, step: int, vq, discriminator, optimizers: dict, state: dict, keep: int) -> Path:
    """Write `checkpoint-<step>` as a whole (`atomic_directory`: a kill leaves the earlier copy, or none) and prune old
    checkpoints."""
    final = directory / f"checkpoint-{step}"
    with atomic_directory(final, keep_existing=False) as tmp:
        vq.save_pretrained(tmp / "vq", safe_serialization=True)
        if discriminator is not None:
            save_file(discriminator.state_dict(), tmp / "discriminator.safetensors")
        for name, optimizer in optimizers.items():
            save_file(optimizer_tensors(optimizer), tmp / f"optimizer_{name}.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    rotate_checkpoints(str(directory), save_total_limit=keep)
    return final


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat tensors (`"<param index>.<key>"`), for safetensors."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{index}.{key}"] = torch.as_tensor(value).contiguous()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
