"""``TaskModel``: frozen EchoCare encoder + trainable head, as one ``nn.Module``.

Import it as ``from echocare.models.task_model import TaskModel`` (that module stays importable
without torch and loads this one on first use).
"""

from __future__ import annotations

import torch
from torch import nn

from echocare.models.encoder import encode, pooled_features
from echocare.models.heads import TASKS, ClassifyHead, SegmentHead


class TaskModel(nn.Module):
    """``forward(x)`` with ``x`` (N, 3, H, W) preprocessed (:func:`echocare.preprocess.preprocess_image`):

    - ``classify``: logits (N, K);
    - ``segment`` / ``hc``: logits (N, C, H, W) at the input resolution.

    The encoder is frozen: it runs without autograd and stays in eval mode even under
    ``model.train()``; only the head's parameters train.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if task == "classify" and not isinstance(head, ClassifyHead):
            raise TypeError(f"a classify task needs a ClassifyHead, got {type(head).__name__}")
        if task in ("segment", "hc") and not isinstance(head, SegmentHead):
            raise TypeError(f"a {task} task needs a SegmentHead, got {type(head).__name__}")
        self.encoder, self.head, self.task = encoder, head, task
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "TaskModel":
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps the head consumes (``head.needs`` order), computed without autograd."""
        with torch.no_grad():
            maps = encode(self.encoder, x)
        return [maps[i] for i in self.head.needs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        if self.task == "classify":
            return self.head(pooled_features(maps))
        return self.head(maps, x if self.head.needs_image else None)
