"""Saving and uploading `Cm3LeonForCausalLM`: the directory written as a whole, with the model card, in one Hub commit.

transformers keeps these apart from the model too: `PreTrainedModel.save_pretrained` writes the files,
`utils/hub.py`'s `PushToHubMixin` uploads them and `modelcard.py` renders the card. `Cm3LeonHubMixin` goes first in
the model's bases and wraps the first two; the card is this package's `modelcard.py`.

A saved model's remote code imports this module (it is copied beside `modeling_cm3leon.py`): it needs only the
standard library, `atomic.py` and, when uploading, `huggingface_hub`. Without the installed package such code saves
no card.
"""

import os
import tempfile

from .atomic import atomic_directory
from .file_checks import check_pretrained_folder


def _is_weights_file(name: str) -> bool:
    """Weights of an earlier save (maybe sharded otherwise): not carried over into a new save's directory."""
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")) and not name.startswith(
        "diffusion_pytorch_model")


class Cm3LeonHubMixin:
    """`save_pretrained` and `push_to_hub` for a `PreTrainedModel` subclass that lists this mixin before it, and a
    `from_pretrained` that names a missing local folder or a damaged file (`file_checks.check_pretrained_folder`)
    before transformers reads it."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_pretrained_folder(pretrained_model_name_or_path, kwargs.get("subfolder"), what="model")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        *args,
        model_card_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        """`PreTrainedModel.save_pretrained` (config, safetensors weights, and this code with `auto_map` for
        `trust_remote_code`) plus a `README.md` model card rendered from the package's `model_card.md`.

        The directory is written as a whole (`atomic.atomic_directory`): a kill while saving over an earlier copy leaves
        that copy, not new files beside old ones. Files of other savers already there (a processor's) are kept;
        weights of an earlier save are replaced.

        Args:
            model_card_kwargs (`dict`, *optional*):
                Passed to `cm3leon_hf.modelcard.build_model_card` (e.g. `training_data`, `repo_id`, `license`).
        """
        if self._auto_class is not None:  # the saved code also serves `AutoModel` and image-text-to-text
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_cm3leon.Cm3LeonModel",
                "AutoModelForImageTextToText": "modeling_cm3leon.Cm3LeonForCausalLM",
            }
        if not is_main_process or kwargs.get("push_to_hub"):
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
            return
        with atomic_directory(save_directory, skip=_is_weights_file) as staging:
            super().save_pretrained(staging, is_main_process, *args, **kwargs)
            try:  # the template ships with the package; this file loaded as remote code without it saves no card
                from cm3leon_hf.modelcard import build_model_card, save_model_card
            except ImportError:
                return
            save_model_card(build_model_card(self, **(model_card_kwargs or {})), staging)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card_kwargs: dict | None = None,
    ) -> str:
        """Upload the model with `save_pretrained`'s files to the Hub in one commit. Unlike
        `PreTrainedModel.push_to_hub`, the README is this model's card (`model_card.md`), not transformers' generic
        one; `tags` are added to the card's metadata."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        card_kwargs["tags"] = [*card_kwargs.get("tags", []), *(tags or [])]
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size, model_card_kwargs=card_kwargs)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=work_dir,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        return commit


__all__ = ["Cm3LeonHubMixin"]
