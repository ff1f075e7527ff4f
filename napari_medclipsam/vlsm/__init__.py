"""Vision-language segmentation models (VLSMs, after Poudel et al.'s medvlsm): CLIPSeg and
BiomedCLIPSeg, a prompt builder for their training captions, fine-tuning on corrected labels,
and prediction. Imports nothing heavy; the modules import torch and transformers late."""
