"""Contrastive losses and the CLIP fine-tuning loop."""
