"""VLSMs on a CPU: inference per 512x512 image and training step time, CLIPSeg vs
BiomedCLIPSeg (full-size architectures, random weights), beside M2IB's saliency in the same run.

* CLIPSeg: ``CLIPSegForImageSegmentation`` with rd64-refined's config (ViT-B/16 at 352x352,
  CLIP text transformer, reduce_dim 64, the "complex" transposed convolutions).
* BiomedCLIPSeg: BiomedCLIP's architecture (ViT-B/16 at 224x224, PubMedBERT) + a CLIPSeg
  decoder at blocks 3, 6, 9.
* M2IB: MedCLIP-SAMv2's saliency on the same BiomedCLIP (10 steps, layer 9), as the pipeline
  runs it.

Inference: one 512x512 image and one prompt, models loaded, fp32 and bf16 autocast; cases
interleaved, median of ``--repeats``. Training: one optimisation step of a batch of 16
(medvlsm's batch), decoder only (the encoders are frozen): with the encoders' outputs cached
(what ``train_vlsm`` does from its second epoch) and without (the first epoch, or past the
cache).

    python benchmarks/bench_vlsm.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_clipseg(folder: Path):
    """rd64-refined's architecture with random weights, saved and loaded as a user's would be
    (the tokenizer is the tests' small CLIP BPE: tokenising is not what is timed)."""
    import torch
    from tiny_clipseg import tiny_tokenizer
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        ViTImageProcessor,
    )

    from napari_medclipsam.vlsm.models import load_clipseg

    tokenizer = tiny_tokenizer(max_length=77)
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(size={"height": 352, "width": 352},
                                          image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225]),
        tokenizer=tokenizer)
    torch.manual_seed(0)
    config = CLIPSegConfig(use_complex_transposed_convolution=True,
                           vision_config={"patch_size": 16},  # ViT-B/16, as rd64-refined's
                           text_config={"bos_token_id": tokenizer.bos_token_id,
                                        "eos_token_id": tokenizer.eos_token_id,
                                        "pad_token_id": tokenizer.pad_token_id})
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return load_clipseg(f"local-dir:{folder}", "cpu")


def build_biomedclipseg(folder: Path):
    from bench_m2ib import build_random_biomedclip

    from napari_medclipsam.vlsm.models import BiomedClipSegVlsm, biomedclipseg_decoder

    clip = build_random_biomedclip(folder)
    return clip, BiomedClipSegVlsm(clip, biomedclipseg_decoder(clip, (3, 6, 9)), (3, 6, 9),
                                   {"clip_model": "random"})


def _training_steps(label: str, model, images, prompt: str, repeats: int
                    ) -> dict[str, list[float]]:
    """Seconds of one decoder optimisation step on ``images``, with the encoders' outputs
    cached and with the encoders run."""
    import torch

    from napari_medclipsam.vlsm.train import dice_bce_loss

    params = [p for p in model.decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-3)
    with torch.no_grad():
        cached = model.activations(model.image_inputs(images))
        emb = model.text_embeddings([prompt] * len(images))
        side = model.decode([a[:1] for a in cached], emb[:1]).shape[-1]
    target = torch.from_numpy(np.random.default_rng(1).random((len(images), side, side)) > 0.7)

    def step(acts) -> None:
        loss = dice_bce_loss(model.decode(acts, emb), target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()

    model.decoder.train()
    step(cached)  # warm-up
    out: dict[str, list[float]] = {}
    for name, fn in ((f"{label} step, cached encoders", lambda: step(cached)),
                     (f"{label} step, encoders run",
                      lambda: step(model.activations(model.image_inputs(images))))):
        values = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            values.append(time.perf_counter() - t0)
        out[name] = values
    print(f"  {label} decoder: {sum(p.numel() for p in params) / 1e6:.2f} M trainable "
          f"parameters, logits {side}x{side}")
    return out


def _median(times: list[float]) -> float:
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from napari_medclipsam.core.config import SaliencyConfig
    from napari_medclipsam.core.precision import autocast
    from napari_medclipsam.core.saliency import encode_text, m2ib_saliency
    from napari_medclipsam.vlsm.models import predict_probabilities

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "cs").mkdir()
    (tmp / "bert").mkdir()
    clipseg = build_clipseg(tmp / "cs")
    clip, bioseg = build_biomedclipseg(tmp / "bert")
    rng = np.random.default_rng(0)
    image = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    prompt = "breast tumor"
    m2ib_cfg = SaliencyConfig()
    embedding = encode_text(clip, prompt)

    cases = {
        "CLIPSeg fp32": lambda: predict_probabilities(clipseg, image, prompt),
        "CLIPSeg bf16": lambda: _bf16(lambda: predict_probabilities(clipseg, image, prompt)),
        "BiomedCLIPSeg fp32": lambda: predict_probabilities(bioseg, image, prompt),
        "BiomedCLIPSeg bf16": lambda: _bf16(lambda: predict_probabilities(bioseg, image,
                                                                          prompt)),
        "M2IB saliency bf16 (10 steps)": lambda: _bf16(
            lambda: m2ib_saliency(clip, image, prompt, m2ib_cfg, text_embedding=embedding)),
    }

    def _bf16(fn):
        with autocast("bf16", "cpu"):
            return fn()

    for fn in cases.values():  # warm-up (oneDNN primitives, allocations)
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"\nInference, one 512x512 image, one prompt (median of {args.repeats}, "
          f"{args.threads} threads):")
    base = _median(times["M2IB saliency bf16 (10 steps)"])
    for name, values in times.items():
        print(f"  {name:32s} {_median(values):7.3f} s   ({base / _median(values):5.1f}x "
              "faster than M2IB)")

    # training steps: batch of 16, decoder only
    images = [(rng.random((512, 512, 3)) * 255).astype(np.uint8) for _ in range(args.batch)]
    steps: dict[str, list[float]] = {}
    for label, model in (("CLIPSeg", clipseg), ("BiomedCLIPSeg", bioseg)):
        steps.update(_training_steps(label, model, images, prompt, max(2, args.repeats // 2)))
    print(f"\nTraining step, batch {args.batch}, decoder only (median):")
    for name, values in steps.items():
        print(f"  {name:40s} {_median(values):7.3f} s  ({_median(values) / args.batch * 1000:6.1f}"
              " ms per image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
