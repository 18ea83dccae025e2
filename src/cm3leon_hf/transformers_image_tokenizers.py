"""Image tokenizers over the public VQ-VAEs that transformers ships: Janus, Emu3 and Chameleon (issue 26).

`TransformersVQImageTokenizer` wraps one of `JanusVQVAE`, `Emu3VQVAE` or `ChameleonVQVAE` together with that model's
own transformers image processor and exposes the interface of `Cm3LeonImageTokenizer`: `resolution`, `grid_size`,
`image_seq_length`, `codebook_size`, `encode(images) -> LongTensor (batch, image_seq_length)` in raster order with
values in `[0, codebook_size)`, `decode(codes) -> list[PIL.Image]`, `encode_pixels`, `decode_to_pixels`,
`check_codes`, `preprocess`, `postprocess`, `to`, `device`, `dtype`, `save_pretrained`, `from_pretrained`. Users who
already have one of these tokenizers can use its codes without training a VQ of their own.

What each model does (all read from transformers' own code, not re-implemented):

- **Janus** (`JanusVQVAE` + `JanusImageProcessor[Pil]`): the grid is `config.num_patches` per side, the stride
  `2 ** (len(channel_multiplier) - 1)` (16 for Janus-Pro: 384² → 24×24 = 576 codes). The processor resizes the longer
  side to its `size`, pads to a square with its mean colour, rescales and normalises; its `size` must be the
  resolution. Decoding is `JanusVQVAE.decode(codes)`; pixels go back through the processor's own `postprocess`.
- **Emu3** (`Emu3VQVAE` + `Emu3ImageProcessor`): the VQ has no fixed resolution, and Emu3's processor keeps each
  image's aspect ratio and area (`smart_resize`), so its grid changes from image to image. A CM3Leon image has a fixed
  number of tokens, so the resolution is this tokenizer's (`resolution=`, or the processor's `min_pixels ==
  max_pixels` when that is a square): an image is centre-cropped to a square and resized to `resolution` with the
  processor's `resample` filter, then goes through Emu3's processor with `do_resize=False` (its RGB conversion,
  rescale and normalisation). Codes come from `Emu3VQVAE.encode(pixels, image_sizes)`; decoding is
  `Emu3VQVAE.decode(codes as (batch, grid, grid))` and the processor's `postprocess`.
- **Chameleon** (`ChameleonVQVAE` + `ChameleonImageProcessor[Pil]`): the resolution is `config.resolution`, the stride
  `2 ** (len(channel_multiplier) - 1)` (512² → 32×32 = 1,024 codes); the processor resizes the shorter side, centre
  crops to `crop_size` (which must be the resolution) and maps pixels to about [-1, 1]. transformers' Chameleon VQ-VAE
  has **no decoder**: `decode` raises a `ValueError` that says so; `encode` works.

Inputs may be PIL images, numpy uint8 arrays `(H, W)`, `(H, W, 3)` or `(H, W, 4)`, encoded bytes, file paths, or
`datasets` image dicts; they are converted to RGB with transformers' `convert_to_rgb` (transparency composited onto
white) before the processor, since not every processor converts grey images itself.

Example:

```python
>>> import torch
>>> from PIL import Image
>>> from transformers import JanusImageProcessorPil, JanusVQVAE, JanusVQVAEConfig
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> vq = JanusVQVAE(JanusVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
...                                  channel_multiplier=[1, 1], num_res_blocks=1, num_patches=16))
>>> processor = JanusImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
>>> image_tokenizer = TransformersVQImageTokenizer(vq, processor)
>>> image_tokenizer.resolution, image_tokenizer.image_seq_length, image_tokenizer.codebook_size
(32, 256, 64)
>>> codes = image_tokenizer.encode([Image.new("RGB", (48, 32), "red")])
>>> codes.shape, codes.dtype
(torch.Size([1, 256]), torch.int64)
>>> image_tokenizer.decode(codes)[0].size
(32, 32)

```
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import ChameleonVQVAE, Emu3VQVAE, JanusVQVAE
from transformers.image_transforms import convert_to_rgb

from .atomic import atomic_write_json
from .file_checks import check_pretrained_folder, looks_local
from .image_tokenizer import TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME, VQImageTokenizerBase, _as_list, open_image

VQ_SUBFOLDER = "vq_model"
# The classes `from_pretrained` may build, by the names `save_pretrained` writes (nothing else is looked up).
VQ_CLASSES = {"JanusVQVAE": "janus", "Emu3VQVAE": "emu3", "ChameleonVQVAE": "chameleon"}
IMAGE_PROCESSOR_CLASSES = (
    "JanusImageProcessorPil", "JanusImageProcessor", "Emu3ImageProcessor", "ChameleonImageProcessorPil",
    "ChameleonImageProcessor",
)


class TransformersVQImageTokenizer(VQImageTokenizerBase):
    r"""
    Turns images into `image_seq_length` VQ codes and back with a transformers VQ-VAE (Janus, Emu3, Chameleon) and
    that model's own image processor. See the module docstring for what each model does.

    Args:
        vq_model (`JanusVQVAE`, `Emu3VQVAE` or `ChameleonVQVAE`):
            The VQ-VAE (e.g. `JanusForConditionalGeneration.model.vqmodel` or one loaded on its own).
        image_processor:
            The model's transformers image processor (`JanusImageProcessorPil`, `Emu3ImageProcessor`,
            `ChameleonImageProcessorPil`), set to the VQ's resolution.
        resolution (`int`, *optional*):
            Side of the square images. Emu3 needs it (its VQ has no fixed resolution) unless the processor's
            `min_pixels == max_pixels` is a square; for Janus and Chameleon it follows from the config and, if given,
            must agree.

    Codes are `torch.long` tensors of shape `(batch_size, image_seq_length)` in raster order, with values in
    `[0, codebook_size)`.
    """

    def __init__(self, vq_model, image_processor, resolution: int | None = None):
        kind = next((k for cls, k in ((JanusVQVAE, "janus"), (Emu3VQVAE, "emu3"), (ChameleonVQVAE, "chameleon"))
                     if isinstance(vq_model, cls)), None)
        if kind is None:
            raise ValueError(f"`vq_model` must be a transformers {', '.join(VQ_CLASSES)}; got {type(vq_model).__name__}.")
        if not callable(image_processor) or not hasattr(image_processor, "save_pretrained"):
            raise ValueError(f"`image_processor` must be a transformers image processor, got {type(image_processor).__name__}.")
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}.")
        config = vq_model.config
        stride = 2 ** (len(config.channel_multiplier) - 1)
        name = type(vq_model).__name__
        if kind == "janus":
            own = int(config.num_patches) * stride
            codebook_size = int(config.num_embeddings)
            size = _size_dict(image_processor, "size")
            if (size.get("height"), size.get("width")) != (own, own):
                raise ValueError(f"The Janus image processor's size ({size}) must be the VQ's resolution {own}×{own} "
                                 f"(num_patches {config.num_patches} × stride {stride}).")
        elif kind == "chameleon":
            own = int(config.resolution)
            codebook_size = int(config.num_embeddings)
            crop = _size_dict(image_processor, "crop_size")
            if not getattr(image_processor, "do_center_crop", False) or (crop.get("height"), crop.get("width")) != (own, own):
                raise ValueError(f"The Chameleon image processor must centre-crop to the VQ's resolution {own}×{own} "
                                 f"(config.resolution); it has do_center_crop="
                                 f"{getattr(image_processor, 'do_center_crop', None)}, crop_size={crop}.")
        else:
            codebook_size = int(config.codebook_size)
            low, high = getattr(image_processor, "min_pixels", None), getattr(image_processor, "max_pixels", None)
            own = math.isqrt(low) if low is not None and low == high and math.isqrt(low) ** 2 == low else None
            if resolution is None and own is None:
                raise ValueError(
                    "Emu3's VQ-VAE has no fixed resolution and its image processor keeps each image's aspect ratio "
                    f"(min_pixels={low}, max_pixels={high}): pass `resolution=` (e.g. 720 for Emu3-Gen's 720×720)."
                )
            own = resolution if resolution is not None else own
        if resolution is not None and resolution != own:
            raise ValueError(f"`resolution` ({resolution}) differs from the {name}'s own resolution ({own}).")
        if own % stride:
            raise ValueError(f"The resolution ({own}) must be a multiple of the {name}'s stride ({stride}).")
        if codebook_size < 1:
            raise ValueError(f"The {name} has no codes (codebook size {codebook_size}).")
        self.vq_model = vq_model.eval()
        self.image_processor = image_processor
        self.kind = kind
        self.resolution = int(own)
        self.grid_size = self.resolution // stride
        self.image_seq_length = self.grid_size**2
        self.codebook_size = codebook_size

    # ------------------------------------------------------------------------------------------------ pixels

    def load_image(self, image, index: int = 0) -> Image.Image:
        """Any accepted input → an RGB PIL image of its own size. `index` names the image in error messages."""
        # transformers' conversion (transparency onto white); as an array, its non-deprecated form
        return Image.fromarray(convert_to_rgb(open_image(image, index), return_numpy=True))

    def preprocess(self, images) -> torch.Tensor:
        """Images (a list, or one image) → the image processor's `pixel_values`, `(batch_size, 3, resolution,
        resolution)`, on the VQ's device and dtype."""
        images = [self.load_image(image, i) for i, image in enumerate(_as_list(images))]
        kwargs = {}
        if self.kind == "emu3":  # a fixed square grid: crop, then resize with Emu3's filter (see the module docstring)
            images = [_centre_square(image).resize((self.resolution,) * 2, resample=self.image_processor.resample)
                      for image in images]
            kwargs["do_resize"] = False
        pixels = self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]
        if tuple(pixels.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(f"The image processor produced pixels of shape {tuple(pixels.shape)}, not (batch, 3, "
                             f"{self.resolution}, {self.resolution}): set it to the VQ's resolution.")
        return pixels.to(self.device, self.dtype)

    def postprocess(self, pixels: torch.Tensor) -> list[Image.Image]:
        """Decoder output `(batch_size, 3, H, W)` → RGB PIL images: the image processor's own `postprocess` where it
        has one (Janus, Emu3: it undoes the normalisation and rescale, clips and truncates to uint8), else the same
        inversion with the processor's `image_mean`, `image_std` and `rescale_factor`."""
        arrays = list(pixels.detach().float().cpu().numpy())
        if not arrays:
            return []
        if hasattr(self.image_processor, "unnormalize") and hasattr(self.image_processor, "postprocess"):
            out = self.image_processor.postprocess(arrays, return_tensors="PIL.Image.Image",
                                                   input_data_format="channels_first")
            return list(out["pixel_values"])
        processor = self.image_processor
        mean = np.asarray(processor.image_mean if processor.do_normalize else 0.0, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(processor.image_std if processor.do_normalize else 1.0, dtype=np.float32).reshape(-1, 1, 1)
        scale = processor.rescale_factor if processor.do_rescale else 1.0
        return [Image.fromarray(((a * std + mean) / scale).clip(0, 255).astype(np.uint8).transpose(1, 2, 0))
                for a in arrays]

    # ------------------------------------------------------------------------------------------------ codes

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.LongTensor:
        """Processor pixels `(batch_size, 3, resolution, resolution)` → codes `(batch_size, image_seq_length)`, by the
        VQ-VAE's own `encode`."""
        batch = pixels.shape[0]
        if self.kind == "emu3":
            sizes = torch.tensor([[self.resolution, self.resolution]] * batch)
            tokens = torch.stack(self.vq_model.encode(pixels, image_sizes=sizes).image_tokens)  # (batch, grid, grid)
        else:
            tokens = self.vq_model.encode(pixels).image_tokens  # (batch * grid * grid,), raster order
        return tokens.reshape(batch, self.image_seq_length).long()

    @torch.no_grad()
    def decode_to_pixels(self, codes) -> torch.Tensor:
        """Codes `(batch_size, image_seq_length)` → the VQ-VAE's own `decode` output `(batch_size, 3, res, res)`,
        in the processor's normalised space."""
        self._check_decoder()
        return self._decode_checked(self.check_codes(codes))

    def _decode_checked(self, codes: torch.LongTensor) -> torch.Tensor:
        codes = codes.to(self.device)
        if self.kind == "emu3":
            return self.vq_model.decode(codes.view(-1, self.grid_size, self.grid_size))
        return self.vq_model.decode(codes)

    def _check_decoder(self) -> None:
        if self.kind == "chameleon":
            raise ValueError("Chameleon's VQ-VAE (transformers' ChameleonVQVAE) has no decoder: it can encode images "
                             "to codes but cannot decode codes to images. Use a Janus or Emu3 VQ-VAE, or a diffusers "
                             "VQModel (Cm3LeonImageTokenizer), to generate images.")

    # ------------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the VQ-VAE with its own `save_pretrained` (safetensors) in `vq_model/`, the image processor's
        `preprocessor_config.json`, and `transformers_image_tokenizer_config.json` (the classes and resolution)."""
        os.makedirs(save_directory, exist_ok=True)
        self.vq_model.save_pretrained(os.path.join(save_directory, VQ_SUBFOLDER), safe_serialization=True)
        self.image_processor.save_pretrained(save_directory)
        settings = {
            "image_tokenizer_class": type(self).__name__,
            "vq_model_class": type(self.vq_model).__name__,
            "image_processor_class": type(self.image_processor).__name__,
            "resolution": self.resolution,
        }
        atomic_write_json(Path(save_directory) / TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME, settings)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> "TransformersVQImageTokenizer":
        """Load a directory (or Hub repository) written by `save_pretrained`. `kwargs` (`revision`, `cache_dir`,
        `token`, `local_files_only`; `torch_dtype`/`dtype` for the VQ only) go to the `from_pretrained` calls."""
        import transformers

        check_pretrained_folder(pretrained_model_name_or_path, subfolder, what="image tokenizer")
        path = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        root = os.path.join(path, subfolder) if subfolder else path
        if looks_local(pretrained_model_name_or_path):
            config_file = os.path.join(root, TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME)
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"{root} holds no transformers image tokenizer (no "
                                        f"{TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME}); save one with "
                                        f"TransformersVQImageTokenizer.save_pretrained.")
            if not os.path.isfile(os.path.join(root, VQ_SUBFOLDER, "config.json")):
                raise FileNotFoundError(f"{root} holds no {VQ_SUBFOLDER}/config.json (the VQ-VAE that save_pretrained "
                                        f"writes there): the copy is incomplete; copy or save it again.")
            check_pretrained_folder(root, VQ_SUBFOLDER, what="image tokenizer's VQ-VAE")
        else:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            config_file = hf_hub_download(path, TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME, subfolder=subfolder,
                                          **hub_kwargs)
        with open(config_file, encoding="utf-8") as f:
            settings = json.load(f)
        vq_name, processor_name = settings.get("vq_model_class"), settings.get("image_processor_class")
        if vq_name not in VQ_CLASSES:
            raise ValueError(f"{config_file}: vq_model_class {vq_name!r} is not one of {sorted(VQ_CLASSES)}.")
        if processor_name not in IMAGE_PROCESSOR_CLASSES:
            raise ValueError(f"{config_file}: image_processor_class {processor_name!r} is not one of "
                             f"{list(IMAGE_PROCESSOR_CLASSES)}.")
        common = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        vq_kwargs = {**common, **{k: kwargs[k] for k in ("torch_dtype", "dtype") if k in kwargs}}
        vq_folder = f"{subfolder}/{VQ_SUBFOLDER}" if subfolder else VQ_SUBFOLDER
        vq_model = getattr(transformers, vq_name).from_pretrained(path, subfolder=vq_folder, **vq_kwargs)
        image_processor = getattr(transformers, processor_name).from_pretrained(path, subfolder=subfolder or "",
                                                                                **common)
        return cls(vq_model, image_processor, resolution=settings.get("resolution"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.vq_model).__name__}, {type(self.image_processor).__name__}, "
            f"resolution={self.resolution}, grid={self.grid_size}x{self.grid_size}, "
            f"image_seq_length={self.image_seq_length}, codebook_size={self.codebook_size})"
        )


def _size_dict(processor, name: str) -> dict:
    size = getattr(processor, name, None)
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {key: getattr(size, key, None) for key in ("height", "width", "shortest_edge")}


def _centre_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


__all__ = ["TransformersVQImageTokenizer"]
