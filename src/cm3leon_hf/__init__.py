"""cm3leon-hf: CM3Leon (arXiv 2309.02591) for the Hugging Face ecosystem.

Importing the package registers the model and processor with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForImageTextToText`, `AutoProcessor`) and its pipelines (`"text-to-image"`,
`"image-text-to-image"`; captioning runs in transformers' own `"image-text-to-text"`) with `PIPELINE_REGISTRY`, and marks the classes for `register_for_auto_class`, so that a saved directory carries its
code and `auto_map` and loads elsewhere with `trust_remote_code=True`.

The retrieval classes need the `retrieval` extra (faiss, sentence-transformers) and are imported on first use, as are
the training collator (`Cm3LeonDataCollator`) and pretraining's `Cm3LeonTrainer` and `Cm3LeonPretrainingConfig`
(`cm3leon_hf.trainer`; `training/pretrain.py` is its command), and `TransformersVQImageTokenizer` (the Janus, Emu3
and Chameleon VQ-VAEs of transformers as image tokenizers).

`HUB_CONFIGS` is the installed copy of the repository's `hub_configs/`: the paper's model sizes as configurations
without weights (`cm3leon-tiny`, `-350m`, `-760m`, `-7b`), loadable from any directory:

>>> from transformers import AutoConfig
>>> from cm3leon_hf import HUB_CONFIGS
>>> AutoConfig.from_pretrained(HUB_CONFIGS / "cm3leon-350m").num_hidden_layers
24
"""

import importlib
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_cm3leon import Cm3LeonConfig
from .image_tokenizer import Cm3LeonImageTokenizer, load_image_tokenizer
from .layout import Cm3LeonLayout
from .logits_process import (
    BatchedClassifierFreeGuidanceLogitsProcessor,
    ContrastiveDecodingLogitsProcessor,
    ImageTokenConstraintLogitsProcessor,
    InstructClassifierFreeGuidanceLogitsProcessor,
)
from .modeling_cm3leon import Cm3LeonForCausalLM, Cm3LeonModel, Cm3LeonPreTrainedModel
from .pipelines import Cm3LeonImageTextToImagePipeline, Cm3LeonTextToImagePipeline
from .processing_cm3leon import Cm3LeonProcessor

__version__ = "0.1.0.dev0"

HUB_CONFIGS = Path(__file__).resolve().parent / "hub_configs"

AutoConfig.register(Cm3LeonConfig.model_type, Cm3LeonConfig, exist_ok=True)
AutoModel.register(Cm3LeonConfig, Cm3LeonModel, exist_ok=True)
AutoModelForCausalLM.register(Cm3LeonConfig, Cm3LeonForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(Cm3LeonConfig, Cm3LeonForCausalLM, exist_ok=True)  # captioning, VQA
AutoModelForMultimodalLM.register(Cm3LeonConfig, Cm3LeonForCausalLM, exist_ok=True)  # pipeline("any-to-any")
AutoProcessor.register(Cm3LeonConfig, Cm3LeonProcessor, exist_ok=True)

Cm3LeonConfig.register_for_auto_class()
Cm3LeonModel.register_for_auto_class("AutoModel")
Cm3LeonForCausalLM.register_for_auto_class("AutoModelForCausalLM")
Cm3LeonProcessor.register_for_auto_class("AutoProcessor")

_LAZY = {
    "Cm3LeonCollatorEpochCallback": "data_collator",
    "Cm3LeonDataCollator": "data_collator",
    "Cm3LeonMemoryBank": "memory_bank",
    "Cm3LeonPretrainingConfig": "pretraining_config",
    "Cm3LeonRetriever": "retriever",
    "Cm3LeonTrainer": "trainer",
    "RetrievedDocument": "retriever",
    "TransformersVQImageTokenizer": "transformers_image_tokenizers",
    "build_retrieval_prompt": "layout",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchedClassifierFreeGuidanceLogitsProcessor",
    "Cm3LeonCollatorEpochCallback",
    "Cm3LeonConfig",
    "Cm3LeonDataCollator",
    "Cm3LeonForCausalLM",
    "Cm3LeonImageTextToImagePipeline",
    "Cm3LeonImageTokenizer",
    "Cm3LeonLayout",
    "Cm3LeonMemoryBank",
    "Cm3LeonModel",
    "Cm3LeonPreTrainedModel",
    "Cm3LeonPretrainingConfig",
    "Cm3LeonProcessor",
    "Cm3LeonRetriever",
    "Cm3LeonTextToImagePipeline",
    "Cm3LeonTrainer",
    "ContrastiveDecodingLogitsProcessor",
    "HUB_CONFIGS",
    "ImageTokenConstraintLogitsProcessor",
    "InstructClassifierFreeGuidanceLogitsProcessor",
    "RetrievedDocument",
    "TransformersVQImageTokenizer",
    "build_retrieval_prompt",
    "load_image_tokenizer",
]
