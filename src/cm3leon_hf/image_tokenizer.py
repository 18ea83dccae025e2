"""CM3Leon's image tokenizer: PIL images ↔ VQ codes over a diffusers `VQModel`.

CL §2.1 uses the VQ tokenizer of Make-A-Scene: a 256×256 image becomes 1024 codes (a 32×32 grid, stride 8) from a
codebook of 8192. The weights are not public, so we train our own with `training/train_image_tokenizer.py`; any
diffusers `VQModel` with `lookup_from_codebook=True` works here. The grid follows from the VQ's config:
`resolution = sample_size`, stride `f = 2 ** (len(block_out_channels) - 1)`, `image_seq_length = (resolution / f) ** 2`.

Choices (the paper is silent):

- **Order.** Codes are in raster order of the grid (row by row, left to right), as the quantizer flattens them.
- **Preprocessing.** An image is converted to RGB, its shorter side resized to `resolution` (`resample`, bicubic by
  default; nothing happens when the size already matches), and the centre square cropped. Transparency (RGBA, LA, PA
  and palette images with a transparent colour) is composited onto `background_color`, white by default, like a
  browser page. 16-bit grey images (`I;16*` and `I`) are scaled to 8 bits (value / 257), not clipped as PIL's
  `convert("L")` would; `F` images are clipped to 0–255 as PIL does; other modes go through `convert("RGB")`.
- **Pixels.** Images go in as `2 * x / 255 - 1` in [-1, 1]; decoded pixels are clamped to [-1, 1] and rounded to
  uint8, so decoding the same codes twice gives identical images. Resizing, cropping, normalising and the way back
  are diffusers' `VaeImageProcessor` (`image_processor`, with `resize_mode="crop"`); loading and colour modes are
  ours, since it converts modes without the choices above.
- **Inputs** may be PIL images, numpy uint8 arrays `(H, W)`, `(H, W, 3)` or `(H, W, 4)`, encoded bytes, file paths, or
  `datasets` image dicts (`{"bytes": …, "path": …}`). Corrupt bytes, zero-size images and other types raise a
  `ValueError` that names the image's position.

Example:

```python
>>> from diffusers import VQModel
>>> from PIL import Image
>>> vq = VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
...              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, num_vq_embeddings=64, norm_num_groups=8,
...              sample_size=32, lookup_from_codebook=True)
>>> image_tokenizer = Cm3LeonImageTokenizer(vq)
>>> image_tokenizer.resolution, image_tokenizer.image_seq_length, image_tokenizer.codebook_size
(32, 256, 64)
>>> codes = image_tokenizer.encode([Image.new("RGB", (48, 32), "red"), Image.new("L", (32, 32), 128)])
>>> codes.shape, codes.dtype
(torch.Size([2, 256]), torch.int64)
>>> images = image_tokenizer.decode(codes)
>>> images[0].size, images[0].mode
((32, 32), 'RGB')

```
"""

import io
import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import VQModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.pil_utils import PIL_INTERPOLATION
from huggingface_hub import hf_hub_download
from PIL import Image, UnidentifiedImageError

from .atomic import atomic_write_json
from .file_checks import check_pretrained_folder, looks_local

IMAGE_TOKENIZER_CONFIG_NAME = "image_tokenizer_config.json"
RESAMPLE_FILTERS = tuple(PIL_INTERPOLATION)  # what diffusers' VaeImageProcessor resizes with
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _load_vq_model(pretrained_model_name_or_path, **kwargs) -> VQModel:
    """`VQModel.from_pretrained`, with diffusers' low-memory loading only where `accelerate` is installed: diffusers
    asks for it by default and, without `accelerate`, warns at every load that it falls back (the package's base
    install, e.g. `make demo`, has no `accelerate`; the result is the same model)."""
    from diffusers.utils import is_accelerate_available

    kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
    return VQModel.from_pretrained(pretrained_model_name_or_path, **kwargs)


class VQImageTokenizerBase:
    """What every image tokenizer shares, over its `vq_model`: `device`, `dtype`, `to`, batched `encode` / `decode`
    and `check_codes`. A subclass sets `image_seq_length` and `codebook_size` and defines `preprocess`,
    `encode_pixels`, `postprocess` and `_decode_checked` (valid codes → pixels); `_check_decoder` may refuse decoding."""

    @property
    def device(self) -> torch.device:
        return next(self.vq_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vq_model.parameters()).dtype

    def to(self, *args, **kwargs):
        """Move the VQ model (`torch.nn.Module.to` arguments); returns `self`."""
        self.vq_model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def encode(self, images, batch_size: int = 64) -> torch.LongTensor:
        """Images → codes of shape `(batch_size, image_seq_length)`, `torch.long`, raster order, on the CPU.

        Args:
            images: one image or a list of images (any accepted input; see the module docstring).
            batch_size: images per forward pass of the encoder (bounds memory; does not change the codes).
        """
        _check_batch_size(batch_size)
        images = _as_list(images)
        if not images:
            return torch.empty(0, self.image_seq_length, dtype=torch.long)
        codes = []
        for start in range(0, len(images), batch_size):
            codes.append(self.encode_pixels(self.preprocess(images[start : start + batch_size])).cpu())
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes, batch_size: int = 64) -> list[Image.Image]:
        """Codes `(batch_size, image_seq_length)` (or one image's `(image_seq_length,)`) → list of RGB PIL images.

        Raises a `ValueError` for a tokenizer without a decoder, a wrong shape, a non-integer dtype, or a code outside
        `[0, codebook_size)`.
        """
        self._check_decoder()
        _check_batch_size(batch_size)
        codes = self.check_codes(codes)
        images = []
        for start in range(0, codes.shape[0], batch_size):
            images.extend(self.postprocess(self._decode_checked(codes[start : start + batch_size])))
        return images

    def _check_decoder(self) -> None:
        """Raise a `ValueError` when this tokenizer cannot decode (every decoding path calls it first)."""

    def check_codes(self, codes) -> torch.LongTensor:
        """Validate codes and return them as a `(batch_size, image_seq_length)` long tensor."""
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"Image codes must be integers, got dtype {codes.dtype}.")
        if codes.dim() == 1:
            codes = codes[None]
        if codes.dim() != 2 or codes.shape[1] != self.image_seq_length:
            raise ValueError(
                f"Image codes must have shape (batch_size, {self.image_seq_length}) (image_seq_length), "
                f"got {tuple(codes.shape)}."
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            bad = codes[(codes < 0) | (codes >= self.codebook_size)][0].item()
            raise ValueError(f"Image code {bad} is outside the codebook [0, {self.codebook_size}) "
                             f"(codebook_size {self.codebook_size}).")
        return codes.long()


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def open_image(image, index: int = 0) -> Image.Image:
    """Any accepted input (a PIL image, a uint8 numpy array, encoded bytes, a path, a `datasets` image dict) → a PIL
    image in its own mode and size, or a `ValueError` naming image `index` and the problem."""
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a `datasets.Image` cell
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
        what = "image bytes" if isinstance(source, io.BytesIO) else f"image file {os.fspath(image)!r}"
        try:
            image = Image.open(source)
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"Image {index}: cannot decode the {what} ({error}).") from error
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, index)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"Image {index}: expected a PIL image, a uint8 numpy array, bytes, a path or a `datasets` image dict, "
            f"got {type(image).__name__}."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image {index} has zero size ({image.width}×{image.height}).")
    return image


class Cm3LeonImageTokenizer(VQImageTokenizerBase):
    r"""
    Turns images into `image_seq_length` VQ codes and back, with a diffusers [`VQModel`].

    Args:
        vq_model (`VQModel`):
            A VQ-VAE with `lookup_from_codebook=True` (its `decode` then takes code indices), a square `sample_size`
            (the resolution images are brought to) and at least one code.
        background_color (`tuple[int, int, int]`, defaults to `(255, 255, 255)`):
            RGB colour transparent pixels are composited onto.
        resample (`str`, defaults to `"bicubic"`):
            PIL filter of the resize, as diffusers' `VaeImageProcessor` names them: `"nearest"`, `"linear"`/`"bilinear"`,
            `"bicubic"`, `"lanczos"`.

    Codes are `torch.long` tensors of shape `(batch_size, image_seq_length)` in raster order, with values in
    `[0, codebook_size)` (the processor adds `image_token_offset` to put them in the joint vocabulary).
    """

    def __init__(
        self,
        vq_model: VQModel,
        background_color: Sequence[int] = (255, 255, 255),
        resample: str = "bicubic",
    ):
        if not isinstance(vq_model, VQModel):
            raise ValueError(f"`vq_model` must be a diffusers `VQModel`, got {type(vq_model).__name__}.")
        if not vq_model.config.lookup_from_codebook:
            raise ValueError("`vq_model` must be built with `lookup_from_codebook=True` so that it decodes code indices.")
        size = vq_model.config.sample_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"`vq_model.config.sample_size` must be square, got {size}.")
            size = size[0]
        factor = 2 ** (len(vq_model.config.block_out_channels) - 1)
        if size % factor:
            raise ValueError(
                f"`vq_model.config.sample_size` ({size}) must be a multiple of the VQ's stride ({factor})."
            )
        background_color = tuple(background_color)
        if len(background_color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background_color):
            raise ValueError(f"`background_color` must be three ints in 0–255, got {background_color!r}.")
        if resample not in RESAMPLE_FILTERS:
            raise ValueError(f"`resample` must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}.")
        self.vq_model = vq_model.eval()
        self.background_color = background_color
        self.resample = resample
        self.resolution = int(size)
        self.grid_size = self.resolution // factor
        self.image_seq_length = self.grid_size**2
        self.codebook_size = int(vq_model.config.num_vq_embeddings)
        self.embed_dim = int(vq_model.quantize.vq_embed_dim)

    # ------------------------------------------------------------------------------------------------ pixels

    def load_image(self, image, index: int = 0) -> Image.Image:
        """Any accepted input → an RGB PIL image of its own size (see the module docstring). `index` names the image
        in error messages."""
        return self._to_rgb(open_image(image, index))

    def _to_rgb(self, image: Image.Image) -> Image.Image:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in _SIXTEEN_BIT_MODES:
            values = np.asarray(image, dtype=np.int64)
            image = Image.fromarray((np.clip(values, 0, 65535) // 257).astype(np.uint8), mode="L")
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (*self.background_color, 255))
            image = Image.alpha_composite(background, rgba)
        if image.mode == "F":
            image = image.convert("L")
        return image.convert("RGB")

    @property
    def image_processor(self) -> VaeImageProcessor:
        """diffusers' `VaeImageProcessor` with this tokenizer's settings: it resizes (the shorter side to `resolution`,
        `resample`), centre-crops, normalises to [-1, 1] and back. (Image loading, modes and transparency, which it
        does not handle, are `load_image`'s.)"""
        if getattr(self, "_image_processor", None) is None or self._image_processor.config.resample != self.resample:
            self._image_processor = VaeImageProcessor(do_resize=True, vae_scale_factor=self.resolution // self.grid_size,
                                                      resample=self.resample, do_normalize=True)
        return self._image_processor

    def preprocess(self, images) -> torch.Tensor:
        """Images (a list, or one image) → pixel tensor of shape `(batch_size, 3, resolution, resolution)` in [-1, 1],
        on the VQ's device and dtype."""
        images = [self.load_image(image, i) for i, image in enumerate(_as_list(images))]
        pixels = self.image_processor.preprocess(images, height=self.resolution, width=self.resolution,
                                                 resize_mode="crop")
        return pixels.to(self.device, self.dtype)

    def postprocess(self, pixels: torch.Tensor) -> list[Image.Image]:
        """Decoder output `(batch_size, 3, H, W)` in [-1, 1] → RGB PIL images (clamped, rounded to uint8)."""
        return self.image_processor.postprocess(pixels.float().cpu(), output_type="pil")

    # ------------------------------------------------------------------------------------------------ codes

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.LongTensor:
        """Pixels `(batch_size, 3, resolution, resolution)` in [-1, 1] → codes `(batch_size, image_seq_length)`."""
        latents = self.vq_model.encode(pixels).latents  # (batch, embed_dim, grid, grid)
        _, _, (_, _, indices) = self.vq_model.quantize(latents)  # (batch * grid * grid,) in raster order
        return indices.view(pixels.shape[0], self.image_seq_length)

    @torch.no_grad()
    def decode_to_pixels(self, codes: torch.LongTensor) -> torch.Tensor:
        """Valid codes `(batch_size, image_seq_length)` → decoder output `(batch_size, 3, res, res)` in about [-1, 1]."""
        shape = (codes.shape[0], self.grid_size, self.grid_size, self.embed_dim)
        flat = codes.reshape(-1).to(self.device)
        return self.vq_model.decode(flat, force_not_quantize=True, shape=shape).sample

    _decode_checked = decode_to_pixels  # decode()'s codes are checked already; this one takes them as they are

    # ------------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the VQ in diffusers format (`config.json`, `diffusion_pytorch_model.safetensors`) and the preprocessing
        settings (`image_tokenizer_config.json`) in `save_directory`. diffusers writes where the VQ was loaded from
        (`_name_or_path`, a path of the machine that saved it) into `config.json`; it is left out, as transformers
        leaves it out of a model's."""
        os.makedirs(save_directory, exist_ok=True)
        self.vq_model.save_pretrained(save_directory, safe_serialization=True)
        config_file = os.path.join(save_directory, "config.json")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if config.pop("_name_or_path", None) is not None:
            atomic_write_json(config_file, config)
        settings = {"background_color": list(self.background_color), "resample": self.resample}
        atomic_write_json(os.path.join(save_directory, IMAGE_TOKENIZER_CONFIG_NAME), settings)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> "Cm3LeonImageTokenizer":
        """Load a directory (or Hub repository) written by `save_pretrained`. `kwargs` go to
        `VQModel.from_pretrained` (`revision`, `cache_dir`, `token`, `local_files_only`, `torch_dtype`…), except
        `background_color` and `resample`, which override the saved settings."""
        overrides = {key: kwargs.pop(key) for key in ("background_color", "resample") if key in kwargs}
        check_pretrained_folder(pretrained_model_name_or_path, subfolder, what="image tokenizer")
        if looks_local(pretrained_model_name_or_path):
            folder = os.path.join(os.path.expanduser(os.fspath(pretrained_model_name_or_path)), subfolder or "")
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise FileNotFoundError(
                    f"{folder} holds no image tokenizer (no config.json of a VQ model). A processor saved with "
                    f"Cm3LeonProcessor.save_pretrained keeps its image tokenizer in image_tokenizer/: copy that folder "
                    f"too, or save the processor again."
                )
        vq_model = _load_vq_model(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            config_file = os.path.join(path, subfolder or "", IMAGE_TOKENIZER_CONFIG_NAME)
        else:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            config_file = hf_hub_download(path, IMAGE_TOKENIZER_CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        with open(config_file, encoding="utf-8") as f:
            settings = json.load(f)
        return cls(vq_model, **{**settings, **overrides})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, grid={self.grid_size}x{self.grid_size}, "
            f"image_seq_length={self.image_seq_length}, codebook_size={self.codebook_size}, "
            f"background_color={self.background_color}, resample={self.resample!r})"
        )


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _array_to_pil(array: np.ndarray, index: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"Image {index}: numpy images must be uint8, got {array.dtype}.")
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(f"Image {index}: numpy images must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")




TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME = "transformers_image_tokenizer_config.json"


def load_image_tokenizer(pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
    """Load whichever image tokenizer a directory (or Hub repository) holds, by the settings file its
    `save_pretrained` wrote: `transformers_image_tokenizer_config.json` → `TransformersVQImageTokenizer` (a Janus,
    Emu3 or Chameleon VQ-VAE), `image_tokenizer_config.json` → `Cm3LeonImageTokenizer` (a diffusers `VQModel`). A local
    folder with neither but a diffusers `VQModel`'s `config.json` (a VQ training checkpoint's `vq/`) gives a
    `Cm3LeonImageTokenizer` with the default settings. `kwargs` go to that class's `from_pretrained`.

    Example:

    ```python
    >>> from cm3leon_hf.pretrained import TINY_PATH
    >>> load_image_tokenizer(TINY_PATH, subfolder="image_tokenizer").image_seq_length
    64

    ```
    """
    from .transformers_image_tokenizers import TransformersVQImageTokenizer

    check_pretrained_folder(pretrained_model_name_or_path, subfolder, what="image tokenizer")
    if looks_local(pretrained_model_name_or_path):
        folder = os.path.join(os.path.expanduser(os.fspath(pretrained_model_name_or_path)), subfolder or "")
        if os.path.isfile(os.path.join(folder, TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME)):
            return TransformersVQImageTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
        if not os.path.isfile(os.path.join(folder, IMAGE_TOKENIZER_CONFIG_NAME)) and os.path.isfile(
            os.path.join(folder, "config.json")
        ):
            return Cm3LeonImageTokenizer(_load_vq_model(folder, **kwargs))
        return Cm3LeonImageTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
    from huggingface_hub.errors import EntryNotFoundError

    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    try:
        hf_hub_download(os.fspath(pretrained_model_name_or_path), TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME,
                        subfolder=subfolder, **hub)
    except EntryNotFoundError:
        return Cm3LeonImageTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
    return TransformersVQImageTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)


__all__ = ["Cm3LeonImageTokenizer", "load_image_tokenizer"]
