"""The synthetic world: scenes of coloured shapes, every task of the paper in miniature, an exact
evaluator, and helpers for the small CLIP trained on it.

- `scene`: vocabulary (`SHAPES`, `COLORS`, `BACKGROUNDS`, `SIZES`, `POSITIONS`), `Scene`/`SceneObject`,
  grid geometry, seeded `sample_scene`.
- `drawing`: `render` (PIL) / `render_array`, edge and segmentation maps.
- `captions`: captions, long captions, referring expressions, VQA questions, edit instructions.
- `parsing`: `parse_caption`, `parse_instruction`/`apply_instruction`, `answer_question`.
- `evaluator`: `read_scene`, `score`, `score_many`.
- `tasks`: `build_task`/`build_tasks` (`datasets.DatasetDict`s), `make_row`.
- `clip` (needs the `retrieval` extra for sentence-transformers): the world's CLIP tokenizer and model,
  CLIP score, Fréchet distance, retrieval top-1.

>>> from cm3leon_hf.synthetic import make_row, read_scene, score
>>> row = make_row("text_to_image", "train", 0)
>>> score(row["images"][0], row["caption"])["scene_correct"]
True
"""

from .captions import caption, long_caption, make_question, vocabulary
from .evaluator import read_scene, score, score_many
from .parsing import Edit, answer_question, apply_instruction, parse_caption, parse_instruction
from .drawing import edge_array, render, render_array, segmentation_array
from .scene import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    MIN_RESOLUTION,
    POSITIONS,
    SHAPES,
    SIZES,
    Relation,
    Scene,
    SceneObject,
    sample_scene,
)
from .tasks import FEATURES, SPLITS, TASKS, build_row, build_task, build_tasks, make_row

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "FEATURES",
    "HELDOUT_PAIRS",
    "MIN_RESOLUTION",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "Edit",
    "Relation",
    "Scene",
    "SceneObject",
    "answer_question",
    "apply_instruction",
    "build_row",
    "build_task",
    "build_tasks",
    "caption",
    "edge_array",
    "long_caption",
    "make_question",
    "make_row",
    "parse_caption",
    "parse_instruction",
    "read_scene",
    "render",
    "render_array",
    "sample_scene",
    "score",
    "score_many",
    "segmentation_array",
    "vocabulary",
]
