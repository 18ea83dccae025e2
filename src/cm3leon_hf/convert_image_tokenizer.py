"""A CM3Leon processor and config around a public image tokenizer: Janus, Emu3 or Chameleon's VQ-VAE (issue 26).

`convert_image_tokenizer` writes a directory that `training/pretokenize.py --processor` and `training/pretrain.py
--model_config ... --processor ...` take as it is: our text BPE with the chosen VQ-VAE (`Cm3LeonProcessor` with a
`TransformersVQImageTokenizer`, saved with its code), a `Cm3LeonConfig` whose image vocabulary is the tokenizer's
codebook and whose `image_seq_length` is its tokens per image (the rest of the architecture from a base config), and a
model card. It converts nothing by hand: the VQ-VAE comes from

- a directory or Hub repository of the **whole model** (`JanusForConditionalGeneration`, `Emu3ForConditionalGeneration`,
  `ChameleonForConditionalGeneration`, e.g. `deepseek-community/Janus-Pro-1B`): only the VQ-VAE's tensors are read
  from its safetensors files (`vq_config` from its `config.json`), never the language model's;
- a directory or repository of the **VQ-VAE alone** (`config.json` of model type `janus_vqgan`, `emu3_vqgan` or
  `chameleon_vqgan`) with the model's `preprocessor_config.json` beside it;
- a saved `TransformersVQImageTokenizer`.

The image processor is the model's own (`AutoImageProcessor` on the same directory). Nothing is downloaded unless the
argument is a Hub id and the machine is online.

A paper-shaped configuration: Chameleon's VQ-VAE is the paper's shape (8,192 codes, 512² → 32×32 = 1,024 tokens per
image; the paper's Make-A-Scene VQ gives 1,024 tokens at 256²), so converting it onto `hub_configs/cm3leon-350m` gives
the 350M model of CL Table 3 with its image vocabulary and sequence layout.

Example:

```python
>>> import tempfile
>>> import torch
>>> from transformers import JanusImageProcessorPil, JanusVQVAE, JanusVQVAEConfig
>>> from cm3leon_hf import Cm3LeonProcessor
>>> from cm3leon_hf.convert_image_tokenizer import convert_image_tokenizer
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> folder = tempfile.mkdtemp()
>>> JanusVQVAE(JanusVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
...                             channel_multiplier=[1, 1], num_res_blocks=1, num_patches=16)).save_pretrained(folder)
>>> _ = JanusImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
>>> config = convert_image_tokenizer(folder, folder + "/cm3leon-janus")
>>> config.image_vocab_size, config.image_seq_length
(64, 256)
>>> processor = Cm3LeonProcessor.from_pretrained(folder + "/cm3leon-janus", model_config=config)
>>> type(processor.image_tokenizer).__name__
'TransformersVQImageTokenizer'

```
"""

import json
import os
import re
from pathlib import Path

import torch

from .file_checks import check_pretrained_folder, looks_local

# model_type of a whole model -> (its VQ-VAE's class, that VQ's model_type)
WHOLE_MODELS = {"janus": "JanusVQVAE", "emu3": "Emu3VQVAE", "chameleon": "ChameleonVQVAE"}
VQ_MODEL_TYPES = {"janus_vqgan": "JanusVQVAE", "emu3_vqgan": "Emu3VQVAE", "chameleon_vqgan": "ChameleonVQVAE"}
_VQ_PREFIX = re.compile(r"^(?:.*\.)?vqmodel\.")  # model.vqmodel.encoder... (transformers' layout of all three)
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")


def load_transformers_image_tokenizer(name_or_path: str | os.PathLike, resolution: int | None = None, **hub_kwargs):
    """The `TransformersVQImageTokenizer` of a whole Janus/Emu3/Chameleon model, of its VQ-VAE alone, or a saved one
    (see the module docstring). `resolution` is Emu3's (its VQ has no fixed one); `hub_kwargs` (`revision`,
    `cache_dir`, `token`, `local_files_only`) go to every file's download."""
    import transformers

    from .image_tokenizer import TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME
    from .transformers_image_tokenizers import TransformersVQImageTokenizer

    unknown = set(hub_kwargs) - set(HUB_KWARGS)
    if unknown:
        raise TypeError(f"Unexpected keyword arguments {sorted(unknown)}; accepted: {list(HUB_KWARGS)}.")
    check_pretrained_folder(name_or_path, what="image tokenizer")
    if looks_local(name_or_path) and os.path.isfile(os.path.join(name_or_path, TRANSFORMERS_IMAGE_TOKENIZER_CONFIG_NAME)):
        return TransformersVQImageTokenizer.from_pretrained(name_or_path, **hub_kwargs)
    config_dict = _read_json(name_or_path, "config.json", hub_kwargs)
    model_type = config_dict.get("model_type")
    if model_type in VQ_MODEL_TYPES:
        vq_model = getattr(transformers, VQ_MODEL_TYPES[model_type]).from_pretrained(name_or_path, **hub_kwargs)
    elif model_type in WHOLE_MODELS:
        vq_model = _vq_of_whole_model(name_or_path, model_type, hub_kwargs)
    else:
        raise ValueError(
            f"{name_or_path} is a {model_type!r} model: a Janus, Emu3 or Chameleon model (model_type "
            f"{sorted(WHOLE_MODELS)}), its VQ-VAE alone ({sorted(VQ_MODEL_TYPES)}) or a saved "
            "TransformersVQImageTokenizer is needed."
        )
    image_processor = transformers.AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
    return TransformersVQImageTokenizer(vq_model.eval(), image_processor, resolution=resolution)


def _read_json(name_or_path, filename: str, hub_kwargs: dict) -> dict:
    path = _file(name_or_path, filename, hub_kwargs)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _file(name_or_path, filename: str, hub_kwargs: dict) -> str:
    if looks_local(name_or_path):
        path = os.path.join(os.path.expanduser(os.fspath(name_or_path)), filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name_or_path} has no {filename}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(os.fspath(name_or_path), filename, **hub_kwargs)


def _vq_of_whole_model(name_or_path, model_type: str, hub_kwargs: dict):
    """The VQ-VAE of a whole model, built from its `vq_config` and loaded with only its own tensors (`strict`)."""
    import transformers
    from safetensors import safe_open

    config = transformers.AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    vq_class = getattr(transformers, WHOLE_MODELS[model_type])
    try:
        index = _read_json(name_or_path, "model.safetensors.index.json", hub_kwargs)
        files = sorted({file for key, file in index["weight_map"].items() if _VQ_PREFIX.match(key)})
    except (FileNotFoundError, OSError):  # one file, no index (the Hub client raises an OSError subclass)
        files = ["model.safetensors"]
    state = {}
    for filename in files:
        with safe_open(_file(name_or_path, filename, hub_kwargs), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                if _VQ_PREFIX.match(key):
                    state[_VQ_PREFIX.sub("", key)] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{name_or_path}: no tensor of its safetensors files is named like its VQ-VAE's "
                         "('...vqmodel.*'): it is not a transformers checkpoint of the whole model.")
    with torch.device("meta"):
        vq_model = vq_class(config.vq_config)
    missing = sorted(set(vq_model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(vq_model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{name_or_path}: the VQ-VAE's tensors do not match {vq_class.__name__}({model_type}'s "
                         f"vq_config): missing {missing[:5]}{'…' * (len(missing) > 5)}, unexpected "
                         f"{unexpected[:5]}{'…' * (len(unexpected) > 5)}.")
    vq_model.load_state_dict(state, assign=True)
    return vq_model


def config_for_processor(processor, base_config, max_position_embeddings: int | None = None):
    """`base_config` (a `Cm3LeonConfig`: the architecture) with the vocabulary layout of `processor`
    (`Cm3LeonProcessor.model_config_fields`: text and image vocabularies, tokens per image, special ids) and, when
    given, `max_position_embeddings`. `vocab_size` follows from the new layout. A context that cannot hold a prompt
    and one image raises a `ValueError` naming both numbers."""
    from .configuration_cm3leon import Cm3LeonConfig

    settings = base_config.to_dict()
    for key in ("vocab_size", "architectures", "auto_map", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    settings.update(processor.model_config_fields())
    if max_position_embeddings is not None:
        settings["max_position_embeddings"] = max_position_embeddings
    config = Cm3LeonConfig(**settings)
    processor.validate_model_config(config)
    return config


def convert_image_tokenizer(
    image_tokenizer,
    output_dir: str | os.PathLike,
    *,
    text_processor: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    max_position_embeddings: int | None = None,
    resolution: int | None = None,
    remote_code: bool = True,
    **hub_kwargs,
):
    """Write a processor (our text BPE + `image_tokenizer`), the matching `Cm3LeonConfig` and a model card into
    `output_dir`, and return the config.

    Args:
        image_tokenizer (`str`, `os.PathLike` or `TransformersVQImageTokenizer`):
            A whole Janus/Emu3/Chameleon model, its VQ-VAE alone, or a saved tokenizer (directory or Hub id; see the
            module docstring), or a tokenizer object.
        output_dir: where the directory goes (written whole: a kill leaves the earlier copy).
        text_processor: the `Cm3LeonProcessor` whose text BPE and text id range are kept (default: the bundled tiny
            model's, so that its text ids mean the same).
        base_config: a `Cm3LeonConfig` directory for the architecture (default: `hub_configs/cm3leon-tiny`).
        max_position_embeddings: the context, when the base config's is too short for this tokenizer's images.
        resolution: Emu3's image side (its VQ has no fixed one).
        remote_code: save the processor's code and `auto_map` with it (loading with `trust_remote_code=True`).
    """
    from . import HUB_CONFIGS
    from .configuration_cm3leon import Cm3LeonConfig
    from .pretrained import TINY_PATH
    from .processing_cm3leon import Cm3LeonProcessor

    if isinstance(image_tokenizer, (str, os.PathLike)):
        image_tokenizer = load_transformers_image_tokenizer(image_tokenizer, resolution=resolution, **hub_kwargs)
    base = Cm3LeonConfig.from_pretrained(base_config or HUB_CONFIGS / "cm3leon-tiny")
    text = Cm3LeonProcessor.from_pretrained(text_processor or TINY_PATH)  # its text BPE and text ids' range
    processor = Cm3LeonProcessor(text.tokenizer, image_tokenizer, text_vocab_size=text.text_vocab_size,
                                 prepend_eos=text.prepend_eos, chat_template=text.chat_template)
    config = config_for_processor(processor, base, max_position_embeddings)
    if not remote_code:
        processor._auto_class = None
    output_dir = Path(output_dir)
    processor.save_pretrained(output_dir)
    config.save_pretrained(output_dir)
    _save_card(config, image_tokenizer, output_dir)
    return config


def _save_card(config, image_tokenizer, output_dir: Path) -> None:
    from .modelcard import build_model_card, save_model_card
    from .modeling_cm3leon import Cm3LeonForCausalLM

    with torch.device("meta"):  # the parameter count, without allocating a model of the base's size
        model = Cm3LeonForCausalLM(config)
    description = (
        f"A CM3Leon processor and configuration around {type(image_tokenizer.vq_model).__name__} "
        f"({type(image_tokenizer.image_processor).__name__} preprocessing): {image_tokenizer.resolution}×"
        f"{image_tokenizer.resolution} images as {image_tokenizer.grid_size}×{image_tokenizer.grid_size} = "
        f"{image_tokenizer.image_seq_length} tokens from a codebook of {image_tokenizer.codebook_size:,}, written by "
        "cm3leon_hf's `convert_image_tokenizer`. It holds no model weights: pretrain with "
        f"`training/pretokenize.py --processor {output_dir.name}` and `training/pretrain.py --model_config "
        f"{output_dir.name} --processor {output_dir.name}`."
    )
    card = build_model_card(model, repo_id=output_dir.name, model_description=description)
    save_model_card(card, output_dir)


__all__ = ["config_for_processor", "convert_image_tokenizer", "load_transformers_image_tokenizer"]
