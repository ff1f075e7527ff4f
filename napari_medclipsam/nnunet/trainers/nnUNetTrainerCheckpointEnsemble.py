"""Found by nnU-Net through ``nnUNet_extTrainer``; the class lives in ``..trainer``."""

from napari_medclipsam.nnunet.trainer import nnUNetTrainerCheckpointEnsemble

__all__ = ["nnUNetTrainerCheckpointEnsemble"]
