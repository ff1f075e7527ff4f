"""The checkpoint-ensembling schedule (Zhao et al. 2022, as used by MedCLIP-SAMv2).

``epochs`` are split into ``cycles`` of equal length L = epochs / cycles. Inside a cycle the
learning rate follows a cosine from ``lr_max`` (the cycle's first epoch) down to ``lr_min``
(its last epoch) and restarts at ``lr_max`` with the next cycle::

    k = epoch mod L,   lr(epoch) = lr_min + (lr_max - lr_min) * (1 + cos(pi * k / (L - 1))) / 2

(``lr_max`` throughout when L = 1). The weights after each of the last
``checkpoints_per_cycle`` epochs of every cycle are kept: ``cycles * checkpoints_per_cycle``
ensemble members. The learning rate is set once per epoch, at its start, as nnU-Net does.

Paper defaults: E = 600, D = 3, G_d = 10, lr 0.01 (30 checkpoints). nnU-Net's defaults are kept
for the rest (SGD, momentum 0.99, Nesterov, 250 iterations per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from ..core.errors import InputError

SCHEDULE_ENV = "MEDCLIPSAM_NNUNET_SCHEDULE"


@dataclass(frozen=True)
class EnsembleSchedule:
    """Epochs, cycles, kept checkpoints and learning rates of a checkpoint-ensembling run."""

    epochs: int = 600
    cycles: int = 3
    checkpoints_per_cycle: int = 10
    lr_max: float = 0.01
    lr_min: float = 1e-4
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50

    def __post_init__(self) -> None:
        for name in ("epochs", "cycles", "checkpoints_per_cycle", "iterations_per_epoch"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.val_iterations_per_epoch < 0:
            raise InputError("val_iterations_per_epoch must be 0 or more.")
        if self.epochs % self.cycles:
            raise InputError(f"epochs ({self.epochs}) must be a multiple of cycles "
                             f"({self.cycles}) so that every cycle has the same length.")
        if self.checkpoints_per_cycle > self.cycle_length:
            raise InputError(f"checkpoints_per_cycle ({self.checkpoints_per_cycle}) cannot exceed "
                             f"the cycle length ({self.cycle_length} epochs).")
        if not 0 <= self.lr_min <= self.lr_max or self.lr_max <= 0:
            raise InputError(f"Need 0 <= lr_min <= lr_max and lr_max > 0; got lr_min "
                             f"{self.lr_min}, lr_max {self.lr_max}.")

    @property
    def cycle_length(self) -> int:
        return self.epochs // self.cycles

    @property
    def n_checkpoints(self) -> int:
        return self.cycles * self.checkpoints_per_cycle

    def cycle_of(self, epoch: int) -> int:
        """0-based cycle of a 0-based epoch."""
        return min(epoch // self.cycle_length, self.cycles - 1)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 0-based epoch."""
        length = self.cycle_length
        if length == 1:
            return float(self.lr_max)
        k = epoch % length
        return float(self.lr_min + (self.lr_max - self.lr_min)
                     * (1.0 + math.cos(math.pi * k / (length - 1))) / 2.0)

    def is_ensemble_epoch(self, epoch: int) -> bool:
        """Whether the weights after this 0-based epoch join the ensemble."""
        return epoch % self.cycle_length >= self.cycle_length - self.checkpoints_per_cycle

    def ensemble_epochs(self) -> list[int]:
        return [e for e in range(self.epochs) if self.is_ensemble_epoch(e)]

    def checkpoint_name(self, epoch: int) -> str:
        return f"cycle{self.cycle_of(epoch) + 1}_epoch{epoch + 1:04d}.pth"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EnsembleSchedule:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"Not a schedule (JSON): {text[:80]!r}") from exc
        return cls(**data)

    @classmethod
    def from_env(cls) -> EnsembleSchedule:
        """From ``$MEDCLIPSAM_NNUNET_SCHEDULE`` (JSON), else the paper's defaults."""
        text = os.environ.get(SCHEDULE_ENV)
        return cls.from_json(text) if text else cls()
