"""Models for ``bench_dask.py`` in every process of a run (the client and each Dask worker,
through Dask's ``distributed.worker.preload``): ``BENCH_MODELS=tiny`` builds the tests' tiny
SAM and knows their tiny ViT; ``BENCH_MODELS=full`` gives BiomedCLIP's architecture with
random weights (seeded: the same in every process) in place of the download. Nothing is
downloaded either way.

    python benchmarks/dask_bench_models.py segment ...    # the CLI with these models
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "benchmarks", ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def dask_setup(worker=None) -> None:
    from napari_medclipsam.core import models

    kind = os.environ.get("BENCH_MODELS", "tiny")
    if kind == "tiny":
        from tiny_clip import register_tiny_vit
        from tiny_sam2 import tiny_builder

        register_tiny_vit()
        models.build_sam = tiny_builder
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-bert-"))

    def load_clip(*args, **kwargs):
        import torch
        from bench_m2ib import build_random_biomedclip

        if not hasattr(load_clip, "bundle"):
            torch.manual_seed(0)
            load_clip.bundle = build_random_biomedclip(folder)
        return load_clip.bundle

    models.load_clip = load_clip
    models.check_clip_source = lambda source: []


if __name__ == "__main__":
    dask_setup()
    from napari_medclipsam.cli import main

    sys.exit(main(sys.argv[1:]))
