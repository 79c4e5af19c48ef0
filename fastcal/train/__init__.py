"""The thin training loop of the prompt-tuning methods: config (``TrainConfig``), the loop (``train``),
objectives (``fastcal.train.objectives``: losses and pluggable regularizers), saved prompts
(``load_prompt``) and evaluation (``predict``)."""

from fastcal.train.config import TrainConfig
from fastcal.train.loop import load_prompt, predict, train

__all__ = ["TrainConfig", "load_prompt", "predict", "train"]
