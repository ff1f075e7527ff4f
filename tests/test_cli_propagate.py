"""`medclipsam segment VOLUME --volume --propagate`: seeds chosen by CLIP's ranking or by
--seed-slices, masks propagated (SAM 2's video predictor; box to box for SAM 1), outputs
with the scan's affine, the run's record (seeds, propagated slices, early stops, SAM backend,
precision), stops that keep the partial mask, resume rules, and bad flags in one line."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli_volume import BODY, N_SLICES, write_body_volume

from napari_medclipsam.cli import build_parser, main
from napari_medclipsam.core.models import SAM_MODELS
from napari_medclipsam.core.pipeline import ZeroShotPipeline

MODEL_STEPS = 2  # M2IB steps of the tiny models (conftest's model_flags)
#: A non-identity affine (axes swapped, a shear, an offset) the outputs must keep.
AFFINE = np.array([[0.0, -0.8, 0.0, 10.0],
                   [0.7, 0.0, 0.1, -5.0],
                   [0.0, 0.0, 2.5, 30.0],
                   [0.0, 0.0, 0.0, 1.0]])
PREFIX = "medclipsam segment: error: "


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """A tiny SAM 2.1 checkpoint whose masks on this volume's body slices are not empty
    (seed 1; the random weights of seed 0, conftest's tiny_sam2_checkpoint, give empty
    masks there, and an empty seed mask has nothing to propagate)."""
    from tiny_sam2 import save_tiny_sam2_checkpoint

    return save_tiny_sam2_checkpoint(tmp_path_factory.mktemp("sam2_seed1") / "sam2.pt",
                                     seed=1)


def _volume(tmp_path: Path) -> Path:
    """test_cli_volume's body volume, saved with :data:`AFFINE`."""
    return write_body_volume(tmp_path, AFFINE)


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(Z, Y, X) data and the affine of a NIfTI written by the CLI."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def _sam2(flags: list[str], checkpoint: Path, name: str = "sam2_t") -> list[str]:
    flags = list(flags)
    flags[flags.index("--sam-model") + 1] = name
    flags[flags.index("--sam-checkpoint") + 1] = str(checkpoint)
    return flags


class _Calls:
    """Counts the text chain's runs (ZeroShotPipeline.segment, one per slice)."""

    def __init__(self, monkeypatch):
        self.slices = 0
        original = ZeroShotPipeline.segment
        calls = self

        def segment(self, *args, **kwargs):
            calls.slices += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(ZeroShotPipeline, "segment", segment)


def test_sam_model_accepts_every_backend():
    parser = build_parser()
    for name in SAM_MODELS:
        args = parser.parse_args(["segment", "x.nii.gz", "-o", "out", "--sam-model", name])
        assert args.sam_model == name
    for precision in ("auto", "bf16", "fp32"):
        args = parser.parse_args(["segment", "x", "-o", "o", "--precision", precision])
        assert args.precision == precision


def test_sam2_propagation_from_ranked_seed(model_flags, sam2_checkpoint, tmp_path, capsys):
    """auto -> sam2_t on the CPU (said once); the seed is the best-ranked slice where the
    chain found something; outputs keep the scan's affine; the record says it all."""
    import tifffile

    vol = _volume(tmp_path)
    out = tmp_path / "out"
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "--propagate",
               "--skip-empty-slices", "-o", str(out),
               *_sam2(model_flags, sam2_checkpoint, "auto")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("SAM: sam2_t (auto on cpu)") == 1
    assert err.index("SAM: sam2_t (auto on cpu)") < err.index("ranking")
    # progress, one line per stage (stderr is no terminal here)
    assert f"vol.nii.gz: ranking {len(BODY)} slice(s) by CLIP image-text similarity" in err
    assert "vol.nii.gz: text chain on seed slice z=" in err

    mask, affine = _nifti(out / "masks" / "vol.nii.gz")
    assert mask.shape == (N_SLICES, 32, 40) and np.allclose(affine, AFFINE)
    assert mask.any() and not mask[[0, 1, 7]].any()  # outside the body: not propagated
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    assert prompts["mode"] == "propagate" and prompts["sam_model"] == "sam2_t"
    assert prompts["method"] == "SAM 2 video predictor"
    ranking = prompts["ranking"]
    assert sorted(r["z"] for r in ranking) == list(BODY)
    sims = [r["similarity"] for r in ranking]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    chain = prompts["chain_slices"]
    assert chain == [r["z"] for r in ranking[:len(chain)]]  # tried best first
    seeds = prompts["seed_slices"]
    assert len(seeds) == 1 and seeds[0]["z"] == chain[-1]
    assert seeds[0]["similarity"] == next(r["similarity"] for r in ranking
                                          if r["z"] == seeds[0]["z"])
    assert mask[seeds[0]["z"]].any() and str(seeds[0]["z"]) in prompts["slices"]
    assert set(prompts["propagated_slices"]) <= set(BODY) - {seeds[0]["z"]}
    assert prompts["stop_after_empty"] == 3 and prompts["completed"] is True
    assert prompts["propagate_size"] == 256  # auto on a CPU: the tiny model's own input
    assert prompts["skipped_slices"] == [0, 1, 7] and prompts["slices_run"] == list(BODY)
    # saliency and coarse mask only where the text chain ran
    saliency = tifffile.imread(out / "saliency" / "vol.tif")
    coarse, coarse_affine = _nifti(out / "coarse" / "vol.nii.gz")
    assert saliency.shape == (N_SLICES, 32, 40) and np.allclose(coarse_affine, AFFINE)
    others = [z for z in range(N_SLICES) if z not in chain]
    assert saliency[chain].any() and not saliency[others].any() and not coarse[others].any()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["sam"]["name"] == "sam2_t"
    assert manifest["models"]["sam"]["requested"] == "auto"
    assert manifest["parameters"]["sam_model"] == "sam2_t"
    assert manifest["precision"]["requested"] == "auto"
    assert manifest["parameters"]["precision"] == manifest["precision"]["resolved"] \
        == prompts["precision"] in ("bf16", "fp32")
    entry = manifest["images"][0]
    assert entry["status"] == "done" and entry["found"] is True
    propagation = entry["volume"]["propagation"]
    assert propagation["seed_slices"] == seeds and propagation["sam_model"] == "sam2_t"
    assert propagation["propagated_slices"] == prompts["propagated_slices"]
    assert propagation["stopped_early"] == prompts["stopped_early"]
    assert "redone from the start" in propagation["resume"]
    assert entry["parameters"]["image"]["volume"]["propagate"] == {"seeds": 1,
                                                                   "seed_slices": None}


def test_seed_slices_sam1_box_path_and_stop_after_empty(model_flags, tmp_path, capsys,
                                                        monkeypatch):
    """--seed-slices runs the chain only there (no ranking); SAM 1 propagates box to box;
    --stop-after-empty 0 runs every other slice. On a terminal: a tqdm bar over the
    propagated slices."""
    vol = _volume(tmp_path)
    out = tmp_path / "out"
    calls = _Calls(monkeypatch)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "--propagate",
               "--seed-slices", "3,-3", "--stop-after-empty", "0", "--propagate-size", "512",
               "-o", str(out), *model_flags])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert calls.slices == 2 and "SAM: " not in err and "ranking" not in err
    assert "vol propagate:" in err and "seed z=5: saliency step" in err
    assert "6/6" in err and "propagating z=7" in err and "<" in err  # tqdm's remaining time
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    assert prompts["chain_slices"] == [3, 5] and prompts["ranking"] == []
    assert prompts["seeds_from"] == "--seed-slices" and prompts["sam_model"] == "vit_b"
    assert prompts["method"].startswith("box to box")
    seeds = [s["z"] for s in prompts["seed_slices"]]
    assert seeds and set(seeds) <= {3, 5}
    assert all(s["similarity"] is None for s in prompts["seed_slices"])
    assert prompts["stop_after_empty"] == 0 and prompts["stopped_early"] == {}
    assert prompts["propagated_slices"] == [z for z in range(N_SLICES) if z not in seeds]
    mask, affine = _nifti(out / "masks" / "vol.nii.gz")
    assert np.allclose(affine, AFFINE) and mask.shape == (N_SLICES, 32, 40)
    assert all(mask[z].any() for z in seeds)
    assert prompts["propagate_size"] is None  # SAM 2 only: recorded, unused by SAM 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["sam"]["propagate_size"] == 512
    assert manifest["config"]["sam"]["stop_after_empty"] == 0
    entry = manifest["images"][0]
    assert entry["volume"]["propagation"]["stop_after_empty"] == 0
    assert entry["parameters"]["image"]["volume"]["propagate"] == {"seeds": None,
                                                                   "seed_slices": [3, -3]}


@pytest.mark.parametrize(("flags", "expected"), [
    (["--propagate"], "--propagate applies to volumes; add --volume."),
    (["--volume", "--seeds", "2"], "--seeds applies to propagation; add --volume --propagate."),
    (["--volume", "--stop-after-empty", "2"], "--stop-after-empty applies to propagation"),
    (["--volume", "--propagate", "--seeds", "0"], "--seeds 0: give 1 or more seed slices."),
    (["--volume", "--propagate", "--seeds", "2", "--seed-slices", "1"],
     "--seeds and --seed-slices: give one of them"),
    (["--volume", "--propagate", "--seed-slices", "1,a"],
     "--seed-slices '1,a': write slice indices of axis 0 separated by commas"),
    (["--volume", "--propagate", "--stop-after-empty", "-1"],
     "--stop-after-empty -1: give 0 (never stop early) or a number of slices."),
])
def test_bad_propagation_flags_are_one_line(model_flags, tmp_path, capsys, flags, expected):
    vol = _volume(tmp_path)
    out = tmp_path / "out"
    rc = main(["segment", str(vol), "--prompt", "a disk", "-o", str(out), *flags,
               *model_flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(PREFIX + expected), err
    assert not out.exists()


def test_propagate_on_a_2d_image_is_one_line(model_flags, tmp_path, capsys, monkeypatch):
    import imageio.v3 as iio

    from napari_medclipsam.core import models

    monkeypatch.setattr(models, "load_sam", lambda *a, **k: pytest.fail("SAM loaded"))
    image = tmp_path / "a.png"
    iio.imwrite(image, np.zeros((16, 16), np.uint8))
    out = tmp_path / "out"
    rc = main(["segment", str(image), "--prompt", "a disk", "--volume", "--propagate", "-o",
               str(out), *model_flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"{PREFIX}--propagate applies to 3-D volumes; a.png is a 2-D "
                               "image. Leave --propagate out for 2-D images."]
    assert not out.exists()


def test_seed_slice_outside_the_volume_fails_that_volume(model_flags, tmp_path, capsys):
    vol = _volume(tmp_path)
    out = tmp_path / "out"
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "--propagate",
               "--seed-slices", "9", "-o", str(out), *model_flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[0] == ("vol.nii.gz: error: --seed-slices 9 is outside vol.nii.gz "
                                  "(8 slices, 0..7).")
    entry = json.loads((out / "manifest.json").read_text())["images"][0]
    assert entry["status"] == "failed" and not (out / "masks" / "vol.nii.gz").exists()


def test_resume_refused_when_precision_or_sam_model_changes(model_flags, tmp_path, capsys,
                                                            monkeypatch):
    vol = _volume(tmp_path)
    out = tmp_path / "out"
    base = ["segment", str(vol), "--prompt", "a disk", "--volume", "--propagate",
            "--seed-slices", "4", "-o", str(out), *model_flags]
    assert main([*base, "--precision", "fp32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == {"resolved": "fp32", "requested": "fp32"}
    assert manifest["parameters"]["precision"] == "fp32"
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    assert prompts["precision"] == "fp32" and prompts["sam_model"] == "vit_b"
    capsys.readouterr()
    before = (out / "masks" / "vol.nii.gz").read_bytes()

    for change, difference in ((["--precision", "bf16"], 'precision "fp32" -> "bf16"'),
                               (["--precision", "fp32", "--sam-model", "sam2_t"],
                                'sam_model "vit_b" -> "sam2_t"')):
        rc = main([*base, *change, "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(PREFIX + "--resume: ") and difference in err[0]
        assert "--overwrite" in err[0]
        assert (out / "masks" / "vol.nii.gz").read_bytes() == before

    calls = _Calls(monkeypatch)
    assert main([*base, "--precision", "fp32", "--resume"]) == 0
    assert calls.slices == 0 and "1 kept from the run resumed" in capsys.readouterr().out


@pytest.mark.parametrize(("sig", "rc", "word"), [("SIGINT", 130, "Interrupted"),
                                                 ("SIGTERM", 143, "Terminated")])
def test_signal_keeps_the_partial_mask_and_resume_redoes_it(model_flags, tmp_path, capsys,
                                                            monkeypatch, sig, rc, word):
    """A real signal (sent to this process) during propagation: it stops after the slice
    under way, the partial mask is saved with the manifest interrupted; --resume redoes the
    volume from the start."""
    vol = _volume(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(vol), "--prompt", "a disk", "--volume", "--propagate",
            "--seed-slices", "2", "--stop-after-empty", "0", "-o", str(out), *model_flags]
    original = ZeroShotPipeline.propagate_volume

    def propagate_volume(self, *a, progress=None, **k):
        def report(stage, fraction):
            progress(stage, fraction)
            if stage.startswith("propagating: slice 2/"):
                os.kill(os.getpid(), getattr(signal, sig))

        return original(self, *a, progress=report, **k)

    with monkeypatch.context() as m:
        m.setattr(ZeroShotPipeline, "propagate_volume", propagate_volume)
        assert main(args) == rc
    err = capsys.readouterr().err
    assert "vol.nii.gz: stopping at the end of this step" in err and "Traceback" not in err
    assert f"{word}: 0 of 1 image(s) done; the partial mask of vol.nii.gz is kept" in err
    assert "redone from the start by --resume" in err
    record = json.loads((out / "partial" / "vol.json").read_text())
    assert record["mode"] == "propagate" and record["propagation"]["completed"] is False
    seeds = [s["z"] for s in record["propagation"]["seed_slices"]]
    assert seeds == [2] and len(record["propagation"]["propagated_slices"]) == 2
    assert record["done"] == sorted([2, *record["propagation"]["propagated_slices"]])
    partial, affine = _nifti(out / "partial" / "vol.mask.nii.gz")
    assert np.allclose(affine, AFFINE) and partial[2].any()
    assert not partial[[z for z in range(N_SLICES) if z not in record["done"]]].any()
    assert not (out / "masks" / "vol.nii.gz").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    entry = manifest["images"][0]
    assert entry["status"] == "interrupted" and entry["slices_done"] == len(record["done"])
    assert "redone from the start" in entry["resume"]

    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "vol.nii.gz: the stopped propagation is redone from the start." in err
    assert not (out / "partial").exists()
    entry = json.loads((out / "manifest.json").read_text())["images"][0]
    assert entry["status"] == "done" and entry["volume"]["redone_from_start"] is True
    propagation = entry["volume"]["propagation"]
    assert propagation["completed"] is True
    assert propagation["propagated_slices"] == [z for z in range(N_SLICES) if z != 2]
    mask, _ = _nifti(out / "masks" / "vol.nii.gz")
    assert np.array_equal(mask[record["done"]], partial[record["done"]])


def test_stop_while_finding_seeds_keeps_the_seeds_found(model_flags, tmp_path, capsys,
                                                        monkeypatch):
    """Ctrl-C while the text chain runs on the second-ranked slice (--seeds 2): the first
    seed's mask is the partial result; nothing was propagated."""
    vol = _volume(tmp_path)
    out = tmp_path / "out"
    original = ZeroShotPipeline.propagate_volume
    seen: list[str] = []

    def propagate_volume(self, *a, progress=None, **k):
        def report(stage, fraction):
            progress(stage, fraction)
            if stage.startswith("seed slice") and stage.endswith("saliency step 1/2"):
                seen.append(stage)
                if len(seen) == 2:
                    os.kill(os.getpid(), signal.SIGINT)

        return original(self, *a, progress=report, **k)

    monkeypatch.setattr(ZeroShotPipeline, "propagate_volume", propagate_volume)
    rc = main(["segment", str(vol), "--prompt", "a disk", "--volume", "--propagate",
               "--seeds", "2", "-o", str(out), *model_flags])
    err = capsys.readouterr().err
    assert rc == 130 and "Interrupted: 0 of 1 image(s) done; the partial mask" in err
    record = json.loads((out / "partial" / "vol.json").read_text())
    propagation = record["propagation"]
    first = propagation["chain_slices"]
    assert len(first) == 1 and record["found_slices"] == first and record["done"] == first
    assert seen[0].startswith(f"seed slice z={first[0]}:")  # the best-ranked ran first
    assert propagation["propagated_slices"] == [] and propagation["completed"] is False
    partial, _ = _nifti(out / "partial" / "vol.mask.nii.gz")
    assert partial[first[0]].any()
    assert not partial[[z for z in range(N_SLICES) if z != first[0]]].any()
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
