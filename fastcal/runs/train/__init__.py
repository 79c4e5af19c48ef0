"""Prompt-tuning runs: the settings (``TrainConfig``), the thin loop (``train``), saved prompts
(``load_prompt``), evaluation (``predict``) and transfer to other classes and datasets (``transfer``)."""

from fastcal.runs.train.config import TrainConfig
from fastcal.runs.train.loop import load_prompt, predict, train

__all__ = ["TrainConfig", "load_prompt", "predict", "train"]
