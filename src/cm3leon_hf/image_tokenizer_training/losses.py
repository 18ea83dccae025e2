"""The VQ's training losses: L1 + L2 reconstruction (optionally weighted onto edges), VQ-VAE's codebook and commitment
losses with a straight-through estimator, and a PatchGAN discriminator with the hinge loss (pix2pix/taming)."""

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn


class PatchDiscriminator(nn.Sequential):
    """A small PatchGAN (pix2pix/taming): stride-2 convolutions to a grid of real/fake logits, `(batch, 1, h, w)`."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        layers, width = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 3, 1, 1))
        super().__init__(*layers)


def vq_forward(vq: VQModel, pixels: torch.Tensor, args) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One autoencoding pass with our losses. Returns (reconstruction, losses, latents `(N, D)`, code indices `(N,)`,
    squared quantization errors `(N,)`), with N = batch * grid * grid in raster order. With `--bf16` the encoder and
    decoder run under bfloat16 autocast; the code lookup and the losses stay in float32."""
    autocast = torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        latents = vq.encode(pixels).latents.float()  # (batch, D, g, g)
    batch, dim, grid, _ = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (batch * g * g, D), raster order
    _, _, (_, _, indices) = vq.quantize(latents)  # nearest code of each position, (batch * g * g,)
    if args.normalize_codes:  # the codebook is kept unit-norm (`normalize_codebook`): nearest = most cosine-similar
        flat = F.normalize(flat, dim=-1)
    codes = vq.quantize.embedding(indices)  # (batch * g * g, D)
    quantized = flat + (codes - flat).detach()  # straight-through estimator
    quantized = quantized.view(batch, grid, grid, dim).permute(0, 3, 1, 2)  # (batch, D, g, g)
    with autocast:
        spatial = quantized if vq.config.norm_type == "spatial" else None
        reconstruction = vq.decoder(vq.post_quant_conv(quantized), spatial).float()
    difference = reconstruction - pixels
    weights = 1.0
    if args.edge_weight > 0:
        weights = 1 + args.edge_weight * edge_map(pixels)  # (batch, 1, res, res)
        weights = weights / weights.mean()  # a weighted mean: loss scales stay those of the plain one
    losses = {
        "l1": (weights * difference.abs()).mean(),
        "l2": (weights * difference**2).mean(),
        "codebook": F.mse_loss(codes, flat.detach()),
        "commitment": F.mse_loss(flat, codes.detach()),
    }
    errors = ((flat - codes) ** 2).sum(-1).detach()  # (batch * g * g,) squared quantization errors
    return reconstruction, losses, flat.detach(), indices, errors


def edge_map(pixels: torch.Tensor) -> torch.Tensor:
    """Where `pixels` (batch, C, H, W) in [-1, 1] have edges, in [0, 1], shape (batch, 1, H, W): each pixel's largest
    absolute difference to its right or lower neighbour (over channels), saturating at 0.5 (a quarter of the range),
    then a 3×3 max-pool, so both pixels across an edge count (and the one before it: three pixels per edge)."""
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1, keepdim=True)
    edges = torch.maximum(F.pad(dx, (0, 1, 0, 0)), F.pad(dy, (0, 0, 0, 1)))
    return F.max_pool2d((edges / 0.5).clamp(max=1.0), kernel_size=3, stride=1, padding=1)


def vq_loss(losses: dict, args) -> torch.Tensor:
    """The VQ's loss without the GAN: weighted L1 and L2, the codebook loss, and beta (`--commitment-weight`) times
    the commitment loss."""
    return (
        args.l1_weight * losses["l1"]
        + args.l2_weight * losses["l2"]
        + losses["codebook"]
        + args.commitment_weight * losses["commitment"]
    )


def generator_loss(discriminator: nn.Module, reconstruction: torch.Tensor) -> torch.Tensor:
    """The VQ's adversarial loss: minus the discriminator's mean logit on its reconstructions."""
    return -discriminator(reconstruction).mean()


def discriminator_loss(discriminator: nn.Module, pixels: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss on real `pixels` and (detached) reconstructions, both in one forward: DDP
    allows one forward per backward."""
    real, fake = discriminator(torch.cat([pixels, reconstruction.detach()])).chunk(2)
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


class VQTrainingModel(nn.Module):
    """The VQ with the training losses as its `forward` (`vq_forward`): what accelerate prepares, so that under DDP
    every backward follows exactly one forward of the wrapped module."""

    def __init__(self, vq: VQModel, args):
        super().__init__()
        self.vq, self.args = vq, args

    def forward(self, pixels: torch.Tensor):
        return vq_forward(self.vq, pixels, self.args)
