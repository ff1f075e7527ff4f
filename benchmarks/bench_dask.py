"""``medclipsam segment`` on one machine vs a Dask LocalCluster of 1 and 2 workers, per-task
overhead, and the time to resume a run killed half way; then, on paper, 10,000 images on N
workers from the measured per-image cost.

Each case is a fresh ``medclipsam segment`` process (models loaded in it, or in each worker),
on the same synthetic images, one after another:

* ``--models tiny``: the tests' tiny CLIP and SAM (the cost is Dask's and ours, not the
  models'), 200 images of 128x128 by default;
* ``--models full``: BiomedCLIP's architecture (random weights) and a random SAM 2.1 tiny
  checkpoint, MedCLIP-SAMv2's whole chain with the faithfulness check, 40 images of 256x256.

Per-task overhead = (1-worker wall time - one-machine wall time) / images, startup included
(the cluster and each worker's model load happen once). The kill: a 2-worker run is killed
(SIGKILL of its whole process group, the workers with it) once its manifest lists half the
images done; ``--resume`` then keeps the finished ones and does the rest.

    python benchmarks/bench_dask.py --models tiny --images 200
    python benchmarks/bench_dask.py --models full --images 40
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "dask_bench_models.py"
sys.path.insert(0, str(ROOT / "tests"))


def _write_images(folder: Path, n: int, side: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for i in range(n):
        image = (rng.random((side, side)) * 60).astype(np.uint8)
        cy, cx = rng.integers(side // 4, 3 * side // 4, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < (side // 8) ** 2] = 210
        Image.fromarray(image).save(folder / f"img_{i:04d}.png")


def _model_flags(kind: str, tmp: Path) -> list[str]:
    if kind == "tiny":
        from tiny_clip import write_tiny_clip_dir
        from tiny_sam import save_tiny_sam_checkpoint

        clip = write_tiny_clip_dir(tmp / "clip")
        sam = save_tiny_sam_checkpoint(tmp / "sam_tiny.pth")
        return ["--clip-model", f"local-dir:{clip}", "--sam-model", "vit_b",
                "--sam-checkpoint", str(sam), "--steps", "3", "--layer", "2",
                "--batch-size", "2"]
    import torch

    from napari_medclipsam.core.models import build_sam2_model

    torch.manual_seed(0)
    path = tmp / "sam2_t_random.pt"
    torch.save({"model": build_sam2_model("sam2_t").state_dict()}, path)
    return ["--sam-model", "sam2_t", "--sam-checkpoint", str(path)]


def _env(kind: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_MODELS"] = kind
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["DASK_DISTRIBUTED__WORKER__PRELOAD"] = '["dask_bench_models"]'
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, str(RUNNER), *args], env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])}... failed ({result.returncode}):\n"
                         f"{result.stderr[-2000:]}")
    return seconds, result.stdout


def _done(out: Path) -> int:
    """Images finished: their mask is written last, atomically."""
    folder = out / "masks"
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def _kill_half_way(args: list[str], env: dict[str, str], out: Path, n: int) -> float:
    """Start the run in its own process group, SIGKILL the group once half is done; the
    seconds it ran."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(RUNNER), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while proc.poll() is None and _done(out) < n // 2:
            time.sleep(0.2)
    finally:
        if proc.poll() is None and os.getpgid(proc.pid) == proc.pid:  # ours: its own group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--side", type=int, default=None)
    args = parser.parse_args(argv)
    n = args.images or (200 if args.models == "tiny" else 40)
    side = args.side or (128 if args.models == "tiny" else 256)
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    images = tmp / "images"
    _write_images(images, n, side)
    env = _env(args.models)
    flags = _model_flags(args.models, tmp)
    common = ["segment", str(images), "--prompt", "bright round lesion", "--device", "cpu",
              *flags]
    rows = []
    t_one, _ = _run([*common, "-o", str(tmp / "one")], env)
    rows.append(("this machine, no --scheduler", t_one))
    t_w1, _ = _run([*common, "-o", str(tmp / "w1"), "--scheduler", "local", "--workers", "1",
                 "--threads-per-worker", str(cores)], env)
    rows.append((f"--scheduler local --workers 1 (torch {cores} threads)", t_w1))
    t_w2, _ = _run([*common, "-o", str(tmp / "w2"), "--scheduler", "local", "--workers", "2",
                 "--threads-per-worker", str(max(1, cores // 2))], env)
    rows.append((f"--scheduler local --workers 2 (torch {max(1, cores // 2)} thread(s) each)",
                 t_w2))
    kill_args = [*common, "-o", str(tmp / "killed"), "--scheduler", "local", "--workers",
                 "2", "--threads-per-worker", str(max(1, cores // 2))]
    t_killed = _kill_half_way(kill_args, env, tmp / "killed", n)
    done_at_kill = _done(tmp / "killed")
    t_resume, said = _run([*kill_args, "--resume"], env)
    found = re.search(r"\((\d+) kept from the run resumed\)", said)
    kept = int(found.group(1)) if found else 0

    print(f"\n{args.models} models, {n} images of {side}x{side}, {cores} CPU cores "
          "(wall seconds, each a fresh process; startup and model loading included)\n")
    print("| run | s | s per image | images/hour |")
    print("|---|---:|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / n:.3f} | {3600 * n / seconds:,.0f} |")
    print(f"\nPer-task overhead of Dask (1 worker vs this machine, startup included): "
          f"{(t_w1 - t_one) / n * 1000:+.0f} ms per image; 2 workers vs 1: "
          f"{t_w1 / t_w2:.2f}x.")
    print(f"Killed after {t_killed:.1f} s with {done_at_kill} of {n} done; --resume took "
          f"{t_resume:.1f} s ({kept} kept, {n - kept} done then), against {t_w2:.1f} s for "
          "the whole run.")
    cost = t_one / n
    print("\nOn paper, 10,000 images at the measured one-machine cost of "
          f"{cost:.3f} s per image per worker (these 2 cores), N such workers:")
    for workers in (1, 2, 8, 32):
        hours = 10_000 * cost / workers / 3600
        print(f"  N = {workers:3d}: {hours:6.2f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
