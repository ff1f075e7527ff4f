"""Ensemble prediction of G nnU-Net checkpoints: ours vs predicting a folder once per checkpoint.

    python benchmarks/bench_ensemble.py [--cases 8] [--size 128] [--members 6] [--threads 2]

Builds a synthetic 2-D dataset (bright disks on noise), trains nnU-Net v2 for a few iterations
with our checkpoint-ensembling trainer (a real planned 2-D U-Net; the weights barely matter for
timing) keeping ``--members`` checkpoints, then predicts the same folder three ways, side by
side in one process:

* ours: :func:`load_ensemble` + :func:`predict_folder` (load G checkpoints once, preprocess
  each case once, G network passes, one resampling and export per case, writes masks,
  probability and entropy maps and the ranking);
* nnU-Net ``predict_from_files`` once per checkpoint (what ``nnUNetv2_predict -chk`` does, with
  ``--save_probabilities``), then reading every ``.npz`` back and averaging;
* nnU-Net ``predict_from_files_sequential`` once per checkpoint (no worker processes), same.

All three use nnU-Net's defaults (mirroring on, step 0.5, Gaussian). The mean probabilities
are checked to agree. Prints a Markdown table; interpreter start-up is not counted for either.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_dataset(root: Path, n: int, size: int) -> None:
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    for d in ("images", "masks", "predict"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 10, size // 5)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = (rng.normal(60, 20, (size, size)) + 120 * mask).clip(0, 255).astype(np.uint8)
        iio.imwrite(root / "images" / f"case{i:02d}.png", img)
        iio.imwrite(root / "predict" / f"case{i:02d}_0000.png", img)
        iio.imwrite(root / "masks" / f"case{i:02d}.png", mask.astype(np.uint8) * 255)


def baseline(model_dir: Path, checkpoints, input_dir: Path, out_root: Path, device,
             sequential: bool) -> dict[str, np.ndarray]:
    """Predict the folder once per checkpoint with nnU-Net, then average the saved softmax."""
    import os

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from napari_medclipsam.nnunet.trainer import trainer_search_path

    os.environ["nnUNet_extTrainer"] = trainer_search_path()   # as a user of nnUNetv2_predict
    sums: dict[str, np.ndarray] = {}
    for k, ckpt in enumerate(checkpoints):
        out = out_root / f"member{k}"
        predictor = nnUNetPredictor(device=device, verbose=False, allow_tqdm=False,
                                    perform_everything_on_device=False)
        predictor.initialize_from_trained_model_folder(
            str(model_dir), use_folds=("all",), checkpoint_name=f"ensemble/{ckpt.name}")
        if sequential:
            predictor.predict_from_files_sequential(str(input_dir), str(out),
                                                    save_probabilities=True, overwrite=True)
        else:
            predictor.predict_from_files(str(input_dir), str(out), save_probabilities=True,
                                         overwrite=True, num_processes_preprocessing=1,
                                         num_processes_segmentation_export=1)
        for f in sorted(out.glob("*.npz")):
            p = np.load(f)["probabilities"].astype(np.float64)
            sums[f.stem] = sums.get(f.stem, 0) + p
    return {case: (s / len(checkpoints)).astype(np.float32) for case, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--members", type=int, default=6, help="G, ensemble checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_medclipsam.nnunet import job
    from napari_medclipsam.nnunet.ensemble import list_checkpoints, load_ensemble, predict_folder
    from napari_medclipsam.nnunet.export import cases_from_folders, export_dataset
    from napari_medclipsam.nnunet.schedule import EnsembleSchedule

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_ens_"))
    try:
        make_dataset(root, args.cases, args.size)
        export_dataset(cases_from_folders(root / "images", root / "masks"), root / "raw", 1,
                       "Bench", verify=False)
        folders = job.NnUNetFolders.resolve(root / "raw", root / "pre", root / "res")
        g = args.members
        t = time.perf_counter()
        job_dir = job.start_training(1, EnsembleSchedule(
            epochs=2 * g, cycles=2, checkpoints_per_cycle=g // 2 or 1, iterations_per_epoch=2,
            val_iterations_per_epoch=1), folders=folders, device="cpu", data_workers=0)
        status = job.wait(job_dir, timeout=3600)
        if status["phase"] != "done":
            print(status.get("log_tail", ""), file=sys.stderr)
            raise SystemExit(f"training failed: {status.get('error')}")
        print(f"trained in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        model_dir = job.model_dir_for(folders, 1)
        ckpts = list_checkpoints(model_dir)
        device = torch.device("cpu")

        import nnunetv2.inference.predict_from_raw_data  # noqa: F401 (imports not timed)

        timings = {}
        t = time.perf_counter()
        ens = load_ensemble(model_dir, device="cpu")
        predict_folder(ens, root / "predict", root / "ours", overwrite=True)
        timings["ours"] = time.perf_counter() - t
        ours = {}
        for f in sorted((root / "predict").glob("*.png")):
            data, props = ens.plans_manager.image_reader_writer_class().read_images([str(f)])
            ours[f.name[:-9]] = ens.predict_nnunet_array(data, props["spacing"]).probabilities
        results = {}
        for name, seq in (("nnU-Net predict_from_files x G", False),
                          ("nnU-Net predict_from_files_sequential x G", True)):
            t = time.perf_counter()
            results[name] = baseline(model_dir, ckpts, root / "predict", root / name[:20],
                                     device, seq)
            timings[name] = time.perf_counter() - t
        for res in results.values():
            worst = max(float(np.abs(res[c] - ours[c]).max()) for c in ours)
            assert worst < 1e-3, f"mean probabilities differ by {worst}"

        print(f"\n{args.cases} images of {args.size}x{args.size}, G = {len(ckpts)} checkpoints, "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} threads, mirroring on. Max |difference| of the mean "
              f"probabilities: {worst:.1e}.\n")
        print("| method | seconds | per image | ours faster by |")
        print("|---|---:|---:|---:|")
        for name, sec in timings.items():
            print(f"| {name} | {sec:.1f} | {sec / args.cases:.2f} | "
                  f"{sec / timings['ours']:.1f}x |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
