"""`medclipsam segment --volume`: finished slices saved as they go, a stopped run resumed
without redoing them, --slices and body skipping, and interrupts (Ctrl-C, SIGTERM, SIGKILL)
on the tiny models."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_pipeline import write_cli_runner

from napari_medclipsam.cli import main, segment
from napari_medclipsam.cli.segment_volume import VolumeState
from napari_medclipsam.core.io import temporary_name
from napari_medclipsam.core.pipeline import ZeroShotPipeline

TESTS = Path(__file__).parent
N_SLICES = 8
BODY = (2, 3, 4, 5, 6)  # slices holding "tissue"; 0, 1 and 7 are air


MODEL_STEPS = 2  # M2IB steps of the tiny models (conftest's model_flags)


def write_body_volume(tmp_path: Path, affine: np.ndarray | None = None) -> Path:
    """An int16 NIfTI (8 x 32 x 40 in (Z, Y, X)): air around a body (slices :data:`BODY`)
    with a bright disk; ``affine`` default 0.8 x 0.8 x 2.5 mm spacing."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :40]
    vol = np.full((N_SLICES, 32, 40), -1000.0) + 5 * rng.standard_normal((N_SLICES, 32, 40))
    for z in BODY:
        vol[z][(yy - 16) ** 2 / 14 ** 2 + (xx - 20) ** 2 / 18 ** 2 < 1] = 40
        vol[z][(yy - 16) ** 2 + (xx - 20) ** 2 < (3 + z) ** 2] = 300
    path = tmp_path / "vol.nii.gz"
    if affine is None:
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16).transpose(2, 1, 0), affine), str(path))
    return path


def _zyx(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class _Counter:
    """Counts ZeroShotPipeline.segment calls (one per slice) and can raise Ctrl-C at one."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.calls = 0
        self.slices: list[list[int]] = []
        original, original_volume = ZeroShotPipeline.segment, ZeroShotPipeline.segment_volume
        counter = self

        def segment(self, *args, **kwargs):
            counter.calls += 1
            if interrupt_at is not None and counter.calls == interrupt_at:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        def segment_volume(self, volume, text, *args, slices=None, **kwargs):
            counter.slices.append(list(slices) if slices is not None else None)
            return original_volume(self, volume, text, *args, slices=slices, **kwargs)

        monkeypatch.setattr(ZeroShotPipeline, "segment", segment)
        monkeypatch.setattr(ZeroShotPipeline, "segment_volume", segment_volume)


def _run(monkeypatch, args, interrupt_at=None) -> tuple[int, _Counter]:
    with monkeypatch.context() as m:
        counter = _Counter(m, interrupt_at)
        return main(args), counter


def test_interrupted_volume_resumes_without_redoing_slices(model_flags, tmp_path, capsys,
                                                           monkeypatch):
    vol = write_body_volume(tmp_path)
    base = ["segment", str(vol), "--prompt", "a disk", "--volume", *model_flags]
    full = tmp_path / "full"
    rc, counter = _run(monkeypatch, [*base, "-o", str(full)])
    assert rc == 0 and counter.calls == N_SLICES

    out = tmp_path / "out"
    rc, counter = _run(monkeypatch, [*base, "-o", str(out)], interrupt_at=4)
    err = capsys.readouterr().err
    assert rc == 130 and counter.calls == 4
    assert "Interrupted: 0 of 1 image(s) done; the finished slices of vol.nii.gz are kept" in err
    assert "--resume" in err and "Traceback" not in err
    # the finished slices and their record survive; no final output yet
    record = json.loads((out / "partial" / "vol.json").read_text())
    assert record["done"] == [0, 1, 2] and record["slices_planned"] == list(range(N_SLICES))
    assert len(record["parameters_sha256"]) == 64 and set(record["models_sha256"]) == {
        "clip", "sam"}
    partial_mask = _zyx(out / "partial" / "vol.mask.nii.gz")
    assert np.array_equal(partial_mask[:3], _zyx(full / "masks" / "vol.nii.gz")[:3])
    assert not partial_mask[3:].any()
    assert not (out / "masks" / "vol.nii.gz").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["pending"] == ["vol"]
    assert manifest["images"][0]["status"] == "interrupted"
    assert manifest["images"][0]["slices_done"] == 3

    # a plain rerun refuses and changes nothing; the message points at --resume
    before = _hashes(out)
    rc, counter = _run(monkeypatch, [*base, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and counter.calls == 0 and _hashes(out) == before
    assert err[-1].startswith("medclipsam segment: error: ") and "--resume" in err[-1]

    # --resume runs only the 5 slices left, and the result equals the uninterrupted run
    rc, counter = _run(monkeypatch, [*base, "-o", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 0 and counter.calls == N_SLICES - 3 and counter.slices == [[3, 4, 5, 6, 7]]
    assert "resuming, 3 of 8 slice(s) already done" in err
    for rel in ("masks/vol.nii.gz", "coarse/vol.nii.gz"):
        assert np.array_equal(_zyx(out / rel), _zyx(full / rel)), rel
    import tifffile

    assert np.array_equal(tifffile.imread(out / "saliency" / "vol.tif"),
                          tifffile.imread(full / "saliency" / "vol.tif"))
    assert json.loads((out / "prompts" / "vol.json").read_text()) == json.loads(
        (full / "prompts" / "vol.json").read_text())
    assert not (out / "partial").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["done"] == ["vol"]
    assert manifest["images"][0]["volume"]["slices_resumed"] == 3

    # resuming a finished run redoes nothing
    rc, counter = _run(monkeypatch, [*base, "-o", str(out), "--resume"])
    assert rc == 0 and counter.calls == 0
    assert "1 kept from the run resumed" in capsys.readouterr().out


@pytest.mark.parametrize(("change", "expected"), [
    (["--steps", "3"], "config.saliency.steps 2 -> 3"),
    (["--prompt", "a round shape"], 'vol.nii.gz: prompt ["a disk"] -> ["a round shape"]'),
    (["--slices", "0:6"], 'vol.nii.gz: volume.slices "all" -> "0:6"'),
])
def test_resume_with_other_parameters_is_refused(model_flags, tmp_path, capsys, monkeypatch,
                                                 change, expected):
    vol = write_body_volume(tmp_path)
    out = tmp_path / "out"
    base = ["segment", str(vol), "--volume", "-o", str(out), *model_flags]
    rc, _ = _run(monkeypatch, [*base, "--prompt", "a disk"], interrupt_at=3)
    assert rc == 130
    before = _hashes(out)
    capsys.readouterr()
    args = [*base, "--resume", *change]
    if "--prompt" not in change:
        args += ["--prompt", "a disk"]
    rc, counter = _run(monkeypatch, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and counter.calls == 0 and _hashes(out) == before
    assert len(err) == 1 and err[0].startswith("medclipsam segment: error: --resume: ")
    assert expected in err[0] and "--overwrite" in err[0]
    # --overwrite redoes it from the start, with the new parameters
    rc, counter = _run(monkeypatch, [*args, "--overwrite"])
    selected = 6 if "--slices" in change else N_SLICES
    assert rc == 0 and counter.calls == selected


def test_resume_with_other_model_weights_is_refused(model_flags, tmp_path, capsys,
                                                    monkeypatch):
    from tiny_sam import save_tiny_sam_checkpoint

    vol = write_body_volume(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(vol), "--prompt", "a disk", "--volume", "-o", str(out), *model_flags]
    assert _run(monkeypatch, args, interrupt_at=2)[0] == 130
    other = save_tiny_sam_checkpoint(tmp_path / "other_sam.pth", seed=5)
    args[args.index("--sam-checkpoint") + 1] = str(other)
    before = _hashes(out)
    capsys.readouterr()
    rc, counter = _run(monkeypatch, [*args, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and counter.calls == 0 and _hashes(out) == before
    assert "other model weights (SAM weights" in err[-1] and "--overwrite" in err[-1]


def test_slice_range_and_body_skipping(model_flags, tmp_path, capsys, monkeypatch):
    vol = write_body_volume(tmp_path)
    base = ["segment", str(vol), "--prompt", "a disk", "--volume", *model_flags]
    out = tmp_path / "range"
    rc, counter = _run(monkeypatch, [*base, "-o", str(out), "--slices", "2:-3"])
    assert rc == 0 and counter.slices == [[2, 3, 4]]
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    assert prompts["slices_run"] == [2, 3, 4] and prompts["skipped_slices"] == []
    mask = _zyx(out / "masks" / "vol.nii.gz")
    assert mask.shape == (N_SLICES, 32, 40) and not mask[[0, 1, 5, 6, 7]].any()
    entry = json.loads((out / "manifest.json").read_text())["images"][0]
    assert entry["volume"]["slices_selected"] == "2:-3"

    out = tmp_path / "body"
    rc, counter = _run(monkeypatch, [*base, "-o", str(out), "--skip-empty-slices"])
    assert rc == 0 and counter.slices == [list(BODY)]
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    assert prompts["skipped_slices"] == [0, 1, 7] and prompts["slices_run"] == list(BODY)
    assert prompts["body"]["threshold_from"] == "otsu"
    assert -1000 < prompts["body"]["threshold"] < 40  # between air and tissue
    entry = json.loads((out / "manifest.json").read_text())["images"][0]
    assert entry["volume"]["skipped_slices"] == [0, 1, 7]
    assert "3 skipped outside the body" in entry["message"]

    # a given threshold above everything skips every slice: said, not crashed
    out = tmp_path / "none"
    rc, counter = _run(monkeypatch, [*base, "-o", str(out), "--body-threshold", "5000",
                                     "--slices", "1:4"])
    assert rc == 0 and counter.calls == 0
    assert "nothing segmented: all 3 selected slice(s) are outside the body" in \
        capsys.readouterr().err
    assert not _zyx(out / "masks" / "vol.nii.gz").any()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--slices", "5:2"], "--slices 5:2 selects no slice of vol.nii.gz (8 slices, 0..7)."),
    (["--slices", "a:b"], "--slices 'a:b': write a range of axis 0 as A:B"),
    (["--slices", "0:8:0"], "--slices '0:8:0': the step must be positive."),
    (["--body-fraction", "2"], "--body-fraction 2: give a share between 0 and 1"),
])
def test_bad_volume_options(model_flags, tmp_path, capsys, flags, expected):
    vol = write_body_volume(tmp_path)
    out = tmp_path / "out"
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "-o", str(out), *flags,
               *model_flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2) and expected in "\n".join(err) and "Traceback" not in "\n".join(err)
    if rc == 1:  # per-volume problem: recorded in the manifest
        entry = json.loads((out / "manifest.json").read_text())["images"][0]
        assert entry["status"] == "failed" and expected in entry["error"]
    else:
        assert not out.exists()


def test_progress_names_the_slice_and_gives_an_eta(model_flags, tmp_path, capsys,
                                                   monkeypatch):
    vol = write_body_volume(tmp_path)
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "-o",
               str(tmp_path / "out"), "--slices", "0:3", *model_flags])
    err = capsys.readouterr().err
    assert rc == 0
    for k, z in ((1, 0), (2, 1), (3, 2)):  # not a terminal: one line per slice
        assert f"vol.nii.gz: slice {k}/3 done (z={z}), ETA " in err
    # on a terminal: a tqdm bar over slices with the stage as postfix
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "-o",
               str(tmp_path / "tty"), "--slices", "0:3", *model_flags])
    err = capsys.readouterr().err
    assert rc == 0
    assert "vol slices:" in err and "3/3" in err and "z=2: saliency step" in err
    assert "<" in err  # tqdm's remaining-time field


def test_checkpoint_interval_limits_writes(model_flags, tmp_path, monkeypatch):
    """Partial files are rewritten at most every CHECKPOINT_SECONDS; an interrupt still
    saves every finished slice."""
    writes = []
    original = VolumeState.save

    def save(self):
        writes.append(sorted(self.done))
        return original(self)

    monkeypatch.setattr(VolumeState, "save", save)
    monkeypatch.setattr(segment, "CHECKPOINT_SECONDS", 3600.0)
    vol = write_body_volume(tmp_path)
    out = tmp_path / "out"
    rc, _ = _run(monkeypatch, ["segment", str(vol), "--prompt", "a disk", "--volume", "-o",
                               str(out), *model_flags], interrupt_at=6)
    assert rc == 130
    assert writes == [[0, 1, 2, 3, 4]]  # none while running (interval), one on the interrupt
    assert json.loads((out / "partial" / "vol.json").read_text())["done"] == [0, 1, 2, 3, 4]
    writes.clear()
    monkeypatch.setattr(segment, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(segment, "CHECKPOINT_SHARE", 1e9)
    out = tmp_path / "every"
    rc, _ = _run(monkeypatch, ["segment", str(vol), "--prompt", "a disk", "--volume", "-o",
                               str(out), "--slices", "0:3", *model_flags])
    assert rc == 0 and writes == [[0], [0, 1], [0, 1, 2]]


# --------------------------------------------------------------------------- real signals

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_keeps_finished_slices_and_resume_finishes(model_flags, tmp_path, sig,
                                                          monkeypatch):
    vol = write_body_volume(tmp_path)
    out = tmp_path / "out"
    runner = write_cli_runner(tmp_path, delay=0.4)
    args = [sys.executable, str(runner), "segment", str(vol), "--prompt", "a disk",
            "--volume", "-o", str(out), *model_flags]
    env = {**os.environ, "MEDCLIPSAM_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    record_path = out / "partial" / "vol.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        if len(record.get("done", [])) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    expected_rc = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}[sig]
    assert proc.returncode == expected_rc, err
    assert "Traceback" not in err and "Warning" not in err
    done = json.loads(record_path.read_text())["done"]
    assert len(done) >= 2 and done == list(range(len(done)))
    if sig != "SIGKILL":  # a handled stop writes the manifest; a kill leaves the last one
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        word = "Interrupted" if sig == "SIGINT" else "Terminated"
        assert f"{word}: 0 of 1 image(s) done" in err
    # a leftover temporary of a killed writer is removed by the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    target = out / "partial" / "vol.mask.nii.gz"
    stale = target.parent / temporary_name(target).replace(f"-{os.getpid()}-", f"-{dead}-")
    stale.write_bytes(b"half written")
    rc, counter = _run(monkeypatch, ["segment", str(vol), "--prompt", "a disk", "--volume",
                                     "-o", str(out), "--resume", *model_flags])
    assert rc == 0 and counter.calls == N_SLICES - len(done)
    assert not stale.exists() and not (out / "partial").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
