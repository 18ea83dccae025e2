"""cm3leon-hf: CM3Leon (arXiv 2309.02591) for the Hugging Face ecosystem.

Importing the package registers the model with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`) and marks the classes for `register_for_auto_class`, so that a saved directory carries its
code and `auto_map` and loads elsewhere with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_cm3leon import Cm3LeonConfig
from .modeling_cm3leon import Cm3LeonForCausalLM, Cm3LeonModel, Cm3LeonPreTrainedModel

__version__ = "0.1.0.dev0"

AutoConfig.register(Cm3LeonConfig.model_type, Cm3LeonConfig, exist_ok=True)
AutoModel.register(Cm3LeonConfig, Cm3LeonModel, exist_ok=True)
AutoModelForCausalLM.register(Cm3LeonConfig, Cm3LeonForCausalLM, exist_ok=True)

Cm3LeonConfig.register_for_auto_class()
Cm3LeonModel.register_for_auto_class("AutoModel")
Cm3LeonForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["Cm3LeonConfig", "Cm3LeonForCausalLM", "Cm3LeonModel", "Cm3LeonPreTrainedModel"]
