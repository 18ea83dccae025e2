"""Keeping the VQ's codebook in use: it starts as encoder outputs of the first batch, and every `--restart-every`
steps the codes no image used since the last restart move onto encoder outputs of the current batch, drawn in
proportion to their squared quantization error (as k-means++ seeds clusters); moved codes start with fresh Adam
moments. With `--normalize-codes` the codes are kept unit-norm."""

import torch
import torch.nn.functional as F
from diffusers import VQModel


def normalize_codebook(vq: VQModel) -> None:
    """Scale every code of `vq` to unit norm (`--normalize-codes`), in place."""
    with torch.no_grad():
        weight = vq.quantize.embedding.weight
        weight.copy_(F.normalize(weight, dim=-1))


def pick_latents(latents: torch.Tensor, errors: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` latents of the batch drawn with probability proportional to their squared quantization error (as
    k-means++ seeds clusters): codes go where the codebook serves the data worst — in images that are mostly flat
    background, the rare object patches — instead of where most latents are."""
    weights = errors.clamp_min(1e-12).cpu().double()
    picks = torch.multinomial(weights, count, replacement=count > len(weights), generator=generator)
    return latents[picks.to(latents.device)]


def dead_codes(usage: torch.Tensor) -> torch.Tensor:
    """The indices of the codes with zero `usage` (counts since the last restart, summed over processes)."""
    return (usage == 0).nonzero().flatten()


def reset_moments(optimizer: torch.optim.Optimizer, weight: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero Adam's moments of `rows` of `weight` (codes just moved by a restart start afresh)."""
    for moment in optimizer.state.get(weight, {}).values():
        if moment.dim() == 2:
            moment[rows] = 0
