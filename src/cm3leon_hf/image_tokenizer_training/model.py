"""The `VQModel` of the training options, and starting it from a trained VQ (`--init-from`): the same architecture, or
a narrower one widened by a whole factor without changing what it computes."""

import math
from pathlib import Path

from diffusers import VQModel


def build_vq_model(args) -> VQModel:
    n = len(args.block_out_channels)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        vq_embed_dim=args.vq_embed_dim,
        num_vq_embeddings=args.num_codes,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
        mid_block_add_attention=args.mid_block_attention,
        norm_type=args.norm_type,
        lookup_from_codebook=True,
    )


def architecture_differences(vq_config, args) -> list[str]:
    """What the options of `args` would build that a checkpoint's VQ (its `config`) is not: `--resume` continues the
    checkpoint's model, so an option changed since would be silently ignored (or, for `--num_codes`, break the code
    usage counts). `["--num_codes 32 (the checkpoint: 16)", ...]`, empty when they agree."""
    wanted = {
        "num_vq_embeddings": ("--num_codes", args.num_codes),
        "block_out_channels": ("--block_out_channels", list(args.block_out_channels)),
        "layers_per_block": ("--layers_per_block", args.layers_per_block),
        "latent_channels": ("--latent_channels", args.latent_channels),
        "vq_embed_dim": ("--vq_embed_dim", args.vq_embed_dim),
        "norm_num_groups": ("--norm_num_groups", args.norm_num_groups),
        "sample_size": ("--resolution", args.resolution),
        "mid_block_add_attention": ("--mid_block_attention", args.mid_block_attention),
        "norm_type": ("--norm_type", args.norm_type),
    }
    differences = []
    for key, (flag, value) in wanted.items():
        saved = vq_config.get(key) if isinstance(vq_config, dict) else getattr(vq_config, key, None)
        saved = list(saved) if isinstance(saved, (list, tuple)) else saved
        if saved != value:
            differences.append(f"{flag} {value} (the checkpoint: {saved})")
    return differences


def init_from_pretrained(vq: VQModel, source_dir: Path) -> bool:
    """Copy a trained VQ's weights into `vq` (`--init-from`). Every tensor but the codebook must match in shape, or
    `vq` must be the source widened by a whole factor (`widen_state_dict`); a `ValueError` lists the tensors that do
    not fit. The codebook is copied only if it has the same size. Returns whether it was."""
    source_model = VQModel.from_pretrained(source_dir)
    source = source_model.state_dict()
    own = vq.state_dict()
    codebook = "quantize.embedding.weight"
    mismatched = sorted(
        k for k in set(own) | set(source) if k != codebook and (k not in source or k not in own or source[k].shape != own[k].shape)
    )
    if mismatched:
        factor = widening_factor(source_model.config, vq.config)
        if factor is None:
            raise ValueError(f"--init-from {source_dir}: its VQ does not have this architecture ({len(mismatched)} tensors "
                             f"differ, e.g. {mismatched[:3]}); pass the same --block-out-channels, --layers-per-block, ... "
                             f"or, to widen it, all of its --block-out-channels and --norm-num-groups times one factor")
        source = widen_state_dict(source, own, factor)
    keep_codebook = source[codebook].shape == own[codebook].shape
    if not keep_codebook:
        source.pop(codebook)
    vq.load_state_dict(source, strict=keep_codebook)
    return keep_codebook


def widening_factor(narrow, wide) -> int | None:
    """The whole factor k by which config `wide` widens config `narrow` (every block width and the number of norm
    groups times k, everything else equal, group norm), or None if it does not."""
    if len(narrow.block_out_channels) != len(wide.block_out_channels) or wide.block_out_channels[0] % narrow.block_out_channels[0]:
        return None
    k = wide.block_out_channels[0] // narrow.block_out_channels[0]
    same = ("layers_per_block", "latent_channels", "vq_embed_dim", "norm_type", "mid_block_add_attention", "in_channels", "out_channels")
    if (k < 2 or any(w != k * n for n, w in zip(narrow.block_out_channels, wide.block_out_channels))
            or wide.norm_num_groups != k * narrow.norm_num_groups or narrow.norm_type != "group"
            or any(getattr(narrow, key) != getattr(wide, key) for key in same)):
        return None
    return k


def widen_state_dict(narrow: dict, wide: dict, factor: int) -> dict:
    """Weights for the `factor`-times wider VQ `wide` (its freshly initialised state dict) that compute exactly what
    `narrow` computes: a function-preserving widening in the spirit of Net2WiderNet (Chen et al., 2016).

    Along every widened axis the trained channels come first and keep their weights; new channels get `wide`'s fresh
    initialisation on their way in and zeros on their way out into trained channels, so at the start they change
    nothing, yet they carry activations and receive gradients. Group norm keeps its statistics because the number of
    groups grows with the width (trained channels fill exactly the first groups). The single-head mid-block attention
    scales scores by 1/sqrt(width): its trained query rows are multiplied by sqrt(factor) and its new query rows are
    zero, so the scores are unchanged too. Axes of the same size (latents, RGB) are copied as they are, and so is the
    codebook (whatever its size).
    Fine-tuning the result gives a trained VQ more capacity without starting over (`--init-from`)."""
    out = {}
    for name, target in wide.items():
        source = narrow[name]
        if name == "quantize.embedding.weight":  # never widened; `init_from_pretrained` decides whether it is kept
            out[name] = source
            continue
        if source.dim() != target.dim() or any(t not in (s, factor * s) for s, t in zip(source.shape, target.shape)):
            raise ValueError(f"cannot widen {name}: {tuple(source.shape)} -> {tuple(target.shape)} is not x1 or x{factor}")
        tensor = target.clone()
        old = tuple(slice(0, s) for s in source.shape)
        tensor[old] = source
        if target.dim() >= 2 and target.shape[1] != source.shape[1]:  # new inputs must not reach trained outputs
            tensor[: source.shape[0], source.shape[1] :] = 0
        if name.endswith(("attentions.0.to_q.weight", "attentions.0.to_q.bias")) and target.shape[0] != source.shape[0]:
            tensor[: source.shape[0]] *= math.sqrt(factor)
            tensor[source.shape[0] :] = 0
        out[name] = tensor
    return out
