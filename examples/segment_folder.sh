#!/usr/bin/env bash
# Zero-shot segmentation of the example images from the command line, then evaluation.
# The first run downloads BiomedCLIP (~800 MB) and SAM ViT-B (~375 MB) into $MEDCLIPSAM_HOME.
set -euo pipefail
cd "$(dirname "$0")"
medclipsam segment images --prompt-file prompts/examples.json --sam-model vit_b \
  --layer 9 -o ../results/examples --overwrite
medclipsam evaluate --pred ../results/examples/masks --gt masks
