"""Trainer checkpoints that are complete or absent: a kill while saving never leaves a partial `checkpoint-N`.

transformers' `Trainer` writes `checkpoint-N` in place, so a kill in the middle leaves a directory that
`get_last_checkpoint` picks on the next resume, and the resume fails or loads half-written state.
`AtomicCheckpointsMixin` makes every process write its part under `<output_dir>/.staging/`; the checkpoint is renamed
into place only once complete. `last_complete_checkpoint` clears what a kill left there and returns the last complete
one. `training/pretrain.py` and `training/train_clip.py` (with sentence-transformers' trainer) use both.

Example:

>>> from transformers import Trainer
>>> class MyTrainer(AtomicCheckpointsMixin, Trainer):  # the mixin first, so that its `_save_checkpoint` runs
...     pass
>>> last_complete_checkpoint("no-such-run") is None
True
"""

import logging
import os
import re
import shutil
import warnings

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .file_checks import file_problems

logger = logging.getLogger(__name__)
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")

STAGING_DIR = ".staging"


class AtomicCheckpointsMixin:
    """For a `transformers.Trainer` subclass (or one of a library built on it, such as sentence-transformers' or
    TRL's): `checkpoint-N` is written under `.staging/`, then renamed into place. Override `save_checkpoint_extras`
    to add files to the checkpoint before the rename."""

    def save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        """Called on the saving process with the staged, complete checkpoint directory; nothing by default."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._get_output_dir = lambda trial=None: staging  # Trainer writes to `_get_output_dir()/checkpoint-N`
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            self.save_checkpoint_extras(os.path.join(staging, name))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(self.state.best_model_checkpoint))
            if not os.listdir(staging):
                os.rmdir(staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


def checkpoint_problems(checkpoint: str) -> list[str]:
    """What is damaged in a Trainer checkpoint (empty when whole): `trainer_state.json` missing or not JSON, a
    safetensors file whose size is not the one its header describes, a torch file (optimizer, scheduler, RNG states)
    that fails its zip CRCs (`file_checks.file_problems`: this reads those files once)."""
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        return [f"{TRAINER_STATE_NAME} is missing"]
    problems = file_problems(checkpoint, torch_files=True)
    for sub in sorted(os.listdir(checkpoint)):  # a model saved in a subfolder (the VQ trainer's `vq/`)
        if os.path.isdir(os.path.join(checkpoint, sub)) and not sub.startswith("."):
            problems += [f"{sub}/{problem}" for problem in file_problems(os.path.join(checkpoint, sub))]
    return problems


def _checkpoints(output_dir: str) -> list[str]:
    """`output_dir`'s `checkpoint-N` folders, last step first."""
    steps = [(int(match.group(1)), name) for name in os.listdir(output_dir)
             if (match := _CHECKPOINT_RE.fullmatch(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(steps, reverse=True)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The last complete checkpoint of `output_dir`, or None; a partial one (left in `.staging/` by a kill) is
    deleted. A checkpoint whose files are damaged (`checkpoint_problems`: a file truncated or changed after it was
    saved) is passed over, with a warning that names it and its files, for the one before it; it is not deleted."""
    if not os.path.isdir(output_dir):
        return None
    shutil.rmtree(os.path.join(output_dir, STAGING_DIR), ignore_errors=True)
    for checkpoint in _checkpoints(output_dir):
        problems = checkpoint_problems(checkpoint)
        if not problems:
            return checkpoint
        message = (f"Checkpoint {checkpoint} is damaged ({'; '.join(problems)}): resuming from the checkpoint before "
                   f"it instead. Delete or move it once you have looked at it.")
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
    return None
