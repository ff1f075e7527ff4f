"""nnU-Net v2 trainer with checkpoint ensembling: a subclass of the released ``nnUNetTrainer``.

nnU-Net finds it by name through ``nnUNet_extTrainer`` (pointed at ``nnunet/trainers/`` by
:func:`trainer_search_path`), so ``nnUNetv2_train DATASET 2d all -tr
nnUNetTrainerCheckpointEnsemble`` works as well as our background job. The schedule comes from
``$MEDCLIPSAM_NNUNET_SCHEDULE`` (see :mod:`.schedule`); it is stored beside the checkpoints and
a resumed run must use the same one.

What changes against ``nnUNetTrainer``:

* the learning rate follows :meth:`EnsembleSchedule.lr_at` (cyclic cosine, restarts per cycle);
* after each of the last G_d epochs of every cycle the weights are written to
  ``fold_all/ensemble/cycle{c}_epoch{e}.pth`` (weights and the inference metadata only; loadable
  with ``weights_only=True``);
* ``checkpoint_latest.pth`` is written after every epoch, atomically, so a crash or a cancel
  loses at most one epoch; a checkpoint must load with ``weights_only=True`` before nnU-Net
  reads it back;
* the final validation is skipped for fold ``all`` (it would score the network on its own
  pseudo-labels);
* progress goes to the job's ``status.json`` when run by our job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .job import JOB_DIR_ENV, update_status
from .schedule import EnsembleSchedule

ENSEMBLE_DIR = "ensemble"
SCHEDULE_FILE = "ensemble_schedule.json"
_CUDA = torch.device("cuda")   # nnU-Net's default


def trainer_search_path() -> str:
    """The folder to put in ``nnUNet_extTrainer`` so nnU-Net finds our trainers."""
    return str(Path(__file__).with_name("trainers"))


def _numpy_safe_globals() -> list:
    """numpy types found in nnU-Net's logging dict, allowed for ``weights_only`` loading."""
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    return [scalar, np.dtype, *{type(np.dtype(t)) for t in ("float64", "float32", "int64")}]


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` of an nnU-Net checkpoint (numpy scalars allowed)."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class CyclicCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets the learning rate of every parameter group to ``schedule.lr_at(epoch)``."""

    def __init__(self, optimizer, schedule: EnsembleSchedule):
        self.schedule = schedule
        self.ctr = 0
        super().__init__(optimizer, -1)

    def get_lr(self):
        return [self.schedule.lr_at(max(self.last_epoch, 0))] * len(self.optimizer.param_groups)

    def step(self, current_step: int | None = None):  # nnU-Net passes the epoch
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        self.last_epoch = current_step
        lr = self.schedule.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)


class nnUNetTrainerCheckpointEnsemble(nnUNetTrainer):  # noqa: N801 (nnU-Net naming)
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = _CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.schedule = EnsembleSchedule.from_env()
        self.num_epochs = self.schedule.epochs
        self.initial_lr = self.schedule.lr_max
        self.num_iterations_per_epoch = self.schedule.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.schedule.val_iterations_per_epoch
        self.save_every = 1
        self._job_dir = os.environ.get(JOB_DIR_ENV)
        self._iteration = 0
        self._last_status = 0.0

    # ------------------------------------------------------------------ schedule
    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        return optimizer, CyclicCosineLR(optimizer, self.schedule)

    @property
    def ensemble_folder(self) -> str:
        return os.path.join(self.output_folder, ENSEMBLE_DIR)

    def on_train_start(self):
        super().on_train_start()
        path = Path(self.output_folder) / SCHEDULE_FILE
        if path.is_file():
            saved = EnsembleSchedule.from_json(path.read_text())
            if saved != self.schedule and self.current_epoch > 0:
                raise RuntimeError(
                    f"This run was started with another schedule ({saved}); resume it with the "
                    f"same one, or start a new training.")
        path.write_text(self.schedule.to_json() + "\n")
        os.makedirs(self.ensemble_folder, exist_ok=True)
        self._status(phase="training", epoch=self.current_epoch, epochs=self.num_epochs)

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self._iteration += 1
        now = time.monotonic()
        if now - self._last_status > 2.0:
            self._last_status = now
            self._status(iteration=self._iteration % self.num_iterations_per_epoch or
                         self.num_iterations_per_epoch,
                         iterations_per_epoch=self.num_iterations_per_epoch)
        return out

    def on_epoch_end(self):
        epoch = self.current_epoch
        if self.schedule.is_ensemble_epoch(epoch):
            self._save_ensemble_member(epoch)
        super().on_epoch_end()   # logs, checkpoint_latest / best, increments current_epoch
        log = {k: self.logger.get_value(k, step=None) for k in (
            "epoch_start_timestamps", "epoch_end_timestamps", "lrs", "train_losses",
            "val_losses", "ema_fg_dice")}
        starts, ends = log["epoch_start_timestamps"], log["epoch_end_timestamps"]
        recent = [e - s for s, e in zip(starts[-5:], ends[-5:], strict=False)]
        remaining = self.num_epochs - self.current_epoch
        self._status(
            phase="training", epoch=self.current_epoch, epochs=self.num_epochs,
            cycle=self.schedule.cycle_of(epoch) + 1, cycles=self.schedule.cycles,
            lr=float(log["lrs"][-1]), train_loss=float(log["train_losses"][-1]),
            val_loss=float(log["val_losses"][-1]) if log["val_losses"] else None,
            pseudo_dice=float(log["ema_fg_dice"][-1]) if log["ema_fg_dice"] else None,
            train_losses=[float(v) for v in log["train_losses"]],
            epoch_time_s=recent[-1] if recent else None,
            eta_s=float(np.mean(recent)) * remaining if recent else None,
            iteration=0, checkpoints=sorted(os.listdir(self.ensemble_folder)))

    def _save_ensemble_member(self, epoch: int) -> None:
        mod = self.network.module if self.is_ddp else self.network
        mod = getattr(mod, "_orig_mod", mod)
        init_args = dict(self.my_init_kwargs)
        init_args["device"] = str(init_args.get("device", "cpu"))
        member = {
            "network_weights": mod.state_dict(),
            "init_args": init_args,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "current_epoch": epoch + 1,
            "cycle": self.schedule.cycle_of(epoch) + 1,
            "lr": self.schedule.lr_at(epoch),
        }
        target = os.path.join(self.ensemble_folder, self.schedule.checkpoint_name(epoch))
        tmp = target + ".partial"
        torch.save(member, tmp)
        os.replace(tmp, target)
        self.print_to_log_file(f"Ensemble checkpoint {os.path.basename(target)}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        tmp = filename + ".partial"
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):
            os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            # nnU-Net 2.8.1 unpickles with weights_only=False and its dict branch is broken
            # (``checkpoint`` unbound), so: refuse anything that does not load safely first.
            load_checkpoint_file(filename_or_checkpoint, "cpu")
            filename_or_checkpoint = str(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":
            self.print_to_log_file("Skipping the final validation: fold 'all' trains on every "
                                   "case, so it would score the network on its own training "
                                   "(pseudo-)labels.")
            return
        super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ status
    def _status(self, **fields) -> None:
        if self._job_dir and self.local_rank == 0:
            update_status(self._job_dir, **fields)
