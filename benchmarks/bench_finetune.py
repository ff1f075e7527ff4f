"""Fine-tuning throughput (images/s) of the full-size BiomedCLIP architecture on CPU.

    python benchmarks/bench_finetune.py [--batch 8 16] [--steps 3] [--threads 2]

One optimisation step = image and text towers forward on a batch of 224x224 images and
captions (BiomedCLIP's context length 256), DHN-NCE (tau 0.6, beta 0.15) backward, AdamW
step, exactly as ``napari_medclipsam.finetune.train`` runs it. Random weights cost the same
compute as the released ones. Also times the same step with the first 6 ViT blocks and
6 BERT layers frozen (``--freeze-vision-layers 6 --freeze-text-layers 6``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from bench_m2ib import build_random_biomedclip

    from napari_medclipsam.finetune.losses import dhn_nce
    from napari_medclipsam.finetune.train import FinetuneConfig, _freeze

    torch.set_num_threads(args.threads)
    captions = ["axial CT of the chest showing both lungs with a small nodule in the left "
                "lower lobe"] * max(args.batch)
    print(f"# fine-tuning step, BiomedCLIP architecture (random weights), CPU, torch "
          f"{torch.__version__}, {args.threads} threads\n")
    print("| batch | frozen | s/step (median) | images/s |")
    print("|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp))
        for frozen in (0, 6):
            model = copy.deepcopy(clip.model)
            _freeze(model, FinetuneConfig(freeze_vision_layers=frozen,
                                          freeze_text_layers=frozen))
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                    lr=1e-6)
            for batch in args.batch:
                x = torch.randn(batch, 3, 224, 224)
                tokens = clip.tokenizer(captions[:batch])
                times = []
                for i in range(args.steps + 1):
                    start = time.perf_counter()
                    loss = dhn_nce(model.encode_image(x), model.encode_text(tokens))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if i:
                        times.append(time.perf_counter() - start)
                t = statistics.median(times)
                label = f"{frozen}+{frozen} layers" if frozen else "none"
                print(f"| {batch} | {label} | {t:.2f} | {batch / t:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
