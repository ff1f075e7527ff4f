"""Time M2IB saliency: our fast path vs the straightforward implementation (full-size
BiomedCLIP architecture, random weights, CPU).

    python benchmarks/bench_m2ib.py [--layers 9 7] [--repeats 1] [--threads 2] [--size 512]
                                    [--readout last_forward|final]

The model is BiomedCLIP's exact architecture (open_clip ``CustomTextCLIP``: timm
``vit_base_patch16_224`` trunk, linear projection to 512, a BERT-base text tower with
BiomedCLIP's context length 256 and MLP projection), built from its config with random
weights: it costs exactly the compute of the real one, and nothing is downloaded.

For each bottleneck layer both implementations run with the paper's defaults (10 steps,
batch 10, lr 1, beta 0.1, same seed) on the same image and prompt, side by side in one
process; the script prints a Markdown table with the times, the speed-up and the largest
difference between the two maps.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SPEEDUP = 4.0

BIOMEDCLIP_MODEL_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                 "context_length": 256, "hf_model_pretrained": False},
}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def build_random_biomedclip(folder: Path):
    """BiomedCLIP's architecture with random weights; the text tower's files go in folder."""
    import open_clip
    import torch
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertConfig

    from napari_medclipsam.core.models import ClipBundle

    # BiomedBERT's config is BERT-base's (vocabulary of 30522 word pieces).
    config = BertConfig()
    config.save_pretrained(str(folder))
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]",
                                                                "[MASK]"]
    words += ["breast", "tumor", "lung", "lungs", "both", "brain", "edema", "a", "the"]
    words += [f"w{i}" for i in range(config.vocab_size - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = {**BIOMEDCLIP_MODEL_CFG}
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": str(folder),
                       "hf_tokenizer_name": str(folder)}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**cfg).eval().requires_grad_(False)
    tokenizer = HFTokenizer(str(folder), context_length=256)
    return ClipBundle(model=model, tokenizer=tokenizer, image_size=224, mean=MEAN, std=STD,
                      source="random BiomedCLIP architecture", device="cpu",
                      weights_sha256=None)


def _time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[9, 7])
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--readout", choices=("last_forward", "final"), default="last_forward",
                        help="where the map is read (SaliencyConfig.readout)")
    args = parser.parse_args(argv)

    import torch

    from napari_medclipsam.core.config import SaliencyConfig
    from napari_medclipsam.core.saliency import m2ib_saliency, m2ib_saliency_reference

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    prompt = "breast tumor"
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp))
        n_params = sum(p.numel() for p in clip.model.parameters())
        print(f"# M2IB, BiomedCLIP architecture ({n_params / 1e6:.0f} M parameters, random), "
              f"{args.size}x{args.size} image, {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {args.threads} threads, readout {args.readout}\n")
        print("| layer | reference s | fast s | speed-up | max abs diff of maps |")
        print("|---:|---:|---:|---:|---:|")
        ok = True
        for layer in args.layers:
            cfg = SaliencyConfig(layer=layer, readout=args.readout)
            # warm-up (allocator, lazy init) on the fast path only: it is the cheaper one
            m2ib_saliency(clip, image, prompt, SaliencyConfig(layer=layer, steps=1))
            t_ref, ref = _time(lambda cfg=cfg: m2ib_saliency_reference(clip, image, prompt, cfg),
                               args.repeats)
            t_fast, fast = _time(lambda cfg=cfg: m2ib_saliency(clip, image, prompt, cfg),
                                 args.repeats)
            diff = float(np.abs(np.asarray(fast) - np.asarray(ref)).max())
            speedup = t_ref / t_fast
            ok &= speedup >= TARGET_SPEEDUP and diff <= 1e-4
            print(f"| {layer} | {t_ref:.2f} | {t_fast:.2f} | {speedup:.1f}x | {diff:.1e} |")
    print(f"\nTarget: >= {TARGET_SPEEDUP:.0f}x with maps equal to 1e-4: "
          f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
