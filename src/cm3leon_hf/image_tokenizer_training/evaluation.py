"""The VQ's eval figures on held-out images: PSNR of encode → decode, and the fraction of the codebook used."""

import torch

from ..image_tokenizer import Cm3LeonImageTokenizer


@torch.no_grad()
def evaluate(image_tokenizer: Cm3LeonImageTokenizer, images: list, batch_size: int = 100) -> dict:
    """PSNR (dB, on uint8 pixels, mean over images) of encode → decode, and the fraction of the codebook used."""
    was_training = image_tokenizer.vq_model.training
    image_tokenizer.vq_model.eval()
    psnrs, used = [], torch.zeros(image_tokenizer.codebook_size, dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        pixels = image_tokenizer.preprocess(images[start : start + batch_size])
        codes = image_tokenizer.encode_pixels(pixels)
        used[codes.flatten().cpu()] = True
        decoded = image_tokenizer.decode_to_pixels(codes).clamp(-1, 1)
        target = ((pixels + 1) * 127.5).round()
        output = ((decoded + 1) * 127.5).round()
        mse = ((output - target) ** 2).float().mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(255.0**2 / mse).cpu())
    image_tokenizer.vq_model.train(was_training)
    return {"psnr": torch.cat(psnrs).mean().item(), "codebook_usage": used.float().mean().item()}
