"""The folder ``nnUNet_extTrainer`` points at: nnU-Net imports each module here by name."""
