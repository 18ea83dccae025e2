"""The model card: `model_card.md` (shipped in the package) rendered through `huggingface_hub.ModelCard`."""

import importlib.resources
import os

from huggingface_hub import ModelCard, ModelCardData

from .atomic import atomic_file

DEFAULT_TAGS = ["cm3leon", "multimodal", "text-to-image", "image-to-text", "retrieval-augmented", "custom_code"]
DEFAULT_TRAINING_DATA = (
    "None: this checkpoint holds freshly initialised weights (the paper's initialisation), not a trained model."
)
DEFAULT_LIMITATIONS = (
    "The model knows only what its training data shows, and generates images only as good as its image tokenizer "
    "reconstructs them. The paper's models were trained on licensed Shutterstock images; models trained on other "
    "data inherit that data's biases. Generated images and text can be wrong or offensive and need human review."
)


def build_model_card(
    model,
    repo_id: str | None = None,
    model_description: str = "",
    training_data: str = DEFAULT_TRAINING_DATA,
    limitations: str = DEFAULT_LIMITATIONS,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    **card_data_kwargs,
) -> ModelCard:
    """Render the model card of `model` (a `Cm3LeonForCausalLM`) from the package's `model_card.md` template.

    The YAML metadata names the library (`transformers`), the pipeline tag (`any-to-any`: text and images in and out),
    tags (`DEFAULT_TAGS` plus `tags`) and license; the body states the architecture and the exact parameter count read off `model`.

    Example:

    ```python
    >>> from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM
    >>> from cm3leon_hf.modelcard import build_model_card
    >>> model = Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny"))
    >>> card = build_model_card(model, repo_id="some-org/cm3leon-tiny")
    >>> card.data.library_name, card.data.pipeline_tag
    ('transformers', 'any-to-any')

    ```
    """
    config = model.config
    num_parameters = model.num_parameters()
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="any-to-any",
        license=license,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(tags or [])])),
        **card_data_kwargs,
    )
    repo_id = repo_id or config.name_or_path or f"cm3leon-{_human(num_parameters).lower()}"
    template = importlib.resources.files("cm3leon_hf").joinpath("model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=repo_id.rstrip("/").split("/")[-1],
        repo_id=repo_id,
        model_description=model_description,
        training_data=training_data,
        limitations=limitations,
        num_parameters=f"{num_parameters:,}",
        num_parameters_human=_human(num_parameters),
        head_dim=config.hidden_size // config.num_attention_heads,
        dtype=str(model.dtype).removeprefix("torch."),
        **{key: getattr(config, key) for key in _CONFIG_FIELDS},
    )


def save_model_card(card: ModelCard, save_directory: str | os.PathLike) -> None:
    """Write `card` as `README.md` in `save_directory`, atomically (a reader never sees half a file)."""
    with atomic_file(os.path.join(save_directory, "README.md")) as tmp:
        tmp.write_text(str(card), encoding="utf-8")


_CONFIG_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "vocab_size",
    "text_vocab_size",
    "image_vocab_size",
    "image_token_offset",
    "image_seq_length",
    "pad_token_id",
    "eos_token_id",
    "break_token_id",
    "eoss_token_id",
    "sentinel_token_start_id",
    "num_sentinel_tokens",
)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
