"""The parts of `training/train_image_tokenizer.py`, the VQ image tokenizer's training, one job per module:

- `data`: the training images in a resumable order, free-form drawings mixed in, the held-out eval images.
- `losses`: the autoencoding pass with its losses (`vq_forward`), edge weighting, the PatchGAN discriminator and its
  hinge loss.
- `codebook`: keeping the codebook in use: data-dependent initialisation and dead-code restarts (k-means++ draws),
  unit-norm codes.
- `model`: the `VQModel` of the options, and starting one from a trained VQ (`--init-from`), widened if need be.
- `checkpoints`: run checkpoints written as a whole (`atomic.atomic_directory`), optimizer state as safetensors.
- `evaluation`: PSNR and codebook usage.

The script keeps the options, the training loop (accelerate, DDP) and `--chain`.
"""
