"""`medclipsam vlsm train|predict|evaluate` and `segment --method vlsm`, end to end through
``cli.main`` on files written to disk, with the tiny CLIPSeg of :mod:`tiny_clipseg`.

The central check is that the text steers the result through the whole command line: a tiny
CLIPSeg fine-tuned by ``vlsm train`` on 64x64 images holding a filled disk (label 1) and a
filled square (label 2), named ``disk`` and ``square``, then ``vlsm predict`` on fresh
two-shape images with ``--prompt disk`` and with ``--prompt square``: each run's masks must lie
on the named shape. Training takes about 12 s on one CPU thread (torch is held to one thread
here: on a shared two-core machine its thread pool otherwise waits on other processes and the
same training takes minutes).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medclipsam.cli import main

PREFIX = "medclipsam vlsm: error: "
N_TRAIN = 40
N_TEST = 10
#: The toy recipe (measured: validation Dice about 0.85, the named shape selected 20/20).
RECIPE = ["--class-name", "disk", "--class-name", "square", "--prompt-set", "p1",
          "--epochs", "150", "--lr", "3e-3", "--batch-size", "8", "--min-epochs", "0",
          "--patience", "150", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shape_masks(placed, size=64):
    yy, xx = np.mgrid[:size, :size]
    out = {}
    for kind, cy, cx, r in placed:
        out[kind] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if kind == "disk" else (
            (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r))
    return out


def _write_cases(folder: Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` two-shape images in folder/images, their label maps (1 disk, 2 square) in
    folder/masks, each shape's mask in folder/disk and folder/square."""
    from PIL import Image
    from toy_clip import random_image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "disk", "square"):
        (folder / sub).mkdir(parents=True)
    truth = []
    for i in range(n):
        image, placed = random_image(rng, ("disk", "square"))
        masks = _shape_masks(placed)
        labels = np.zeros(image.shape[:2], np.uint8)
        labels[masks["disk"]], labels[masks["square"]] = 1, 2
        name = f"case_{i:03d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        Image.fromarray(labels).save(folder / "masks" / name)
        for kind in ("disk", "square"):
            Image.fromarray(masks[kind].astype(np.uint8) * 255).save(folder / kind / name)
        truth.append(masks)
    return truth


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    _write_cases(root / "train", N_TRAIN, seed=0)
    truth = _write_cases(root / "test", N_TEST, seed=1000)
    return {"train": root / "train", "test": root / "test", "truth": truth, "root": root}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(shapes, tiny_clipseg_dir, tmp_path_factory):
    """The tiny CLIPSeg fine-tuned on the training shapes by ``vlsm train`` (the recipe)."""
    model = tmp_path_factory.mktemp("trained") / "model"
    data = shapes["train"]
    t0 = time.perf_counter()
    code, out, err = _run(["vlsm", "train", "--arch", "clipseg", "--images",
                           str(data / "images"), "--masks", str(data / "masks"),
                           "--clipseg-model", f"local-dir:{tiny_clipseg_dir}", *RECIPE,
                           "-o", str(model)])
    return {"model": model, "code": code, "out": out, "err": err,
            "seconds": time.perf_counter() - t0}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _read_mask(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path)) > 0


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    return lines[0]


# --------------------------------------------------------------------------- train


def test_train_learns_and_records_where_it_came_from(trained, shapes, tiny_clipseg_dir):
    assert trained["code"] == 0, trained["err"]
    model = trained["model"]
    assert {p.name for p in model.iterdir()} == {"vlsm.json", "decoder.safetensors",
                                                 "checkpoint.pt"}
    record = json.loads((model / "vlsm.json").read_text())
    assert record["arch"] == "clipseg"
    assert record["base"]["clipseg_model"] == f"local-dir:{Path(tiny_clipseg_dir).resolve()}"
    assert record["class_names"] == ["disk", "square"]
    assert record["data"] == {"images": str((shapes["train"] / "images").resolve()),
                              "masks": str((shapes["train"] / "masks").resolve()),
                              "cases": N_TRAIN}
    assert record["flags"]["lr"] == 3e-3 and record["flags"]["class_name"] == ["disk", "square"]
    assert record["train_config"]["prompt_sets"] == ["p1"]
    history = record["training"]["history"]
    assert len(history) == 150
    # learnt: far above the first epoch's (nearly untrained) validation Dice
    assert record["training"]["best_val_dice"] > 0.7
    assert record["training"]["best_val_dice"] > history[0]["val_dice"] + 0.4
    epoch_lines = [line for line in trained["err"].splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 150 and epoch_lines[0].startswith("epoch 1/150: loss ")
    last = trained["out"].strip().splitlines()[-1]
    assert last.startswith(f"Best epoch {record['training']['best_epoch']}: validation Dice ")
    assert f"use it with: medclipsam vlsm predict --model {model} " in last


# --------------------------------------------------------------------------- predict


def test_predict_prompt_selects_the_named_shape(trained, shapes, tmp_path):
    import tifffile

    assert trained["code"] == 0, trained["err"]
    images = shapes["test"] / "images"
    scores = {}
    for prompt, other in (("disk", "square"), ("square", "disk")):
        out = tmp_path / prompt
        code, stdout, err = _run(["vlsm", "predict", "--model", str(trained["model"]),
                                  "--images", str(images), "--prompt", prompt, "-o", str(out),
                                  "--device", "cpu"])
        assert code == 0, err
        right, wrong = [], []
        for i, truth in enumerate(shapes["truth"]):
            mask = _read_mask(out / "masks" / f"case_{i:03d}.png")
            right.append(_dice(mask, truth[prompt]))
            wrong.append(_dice(mask, truth[other]))
        scores[prompt] = (np.mean(right), np.mean(wrong),
                          sum(r > w for r, w in zip(right, wrong, strict=True)))
        # the probability is written where segment writes its saliency
        prob = tifffile.imread(out / "saliency" / "case_000.tif")
        assert prob.shape == (64, 64) and prob.dtype == np.float32
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest["models"]) == {"vlsm", "device"}  # no CLIP, no SAM
        vlsm = manifest["models"]["vlsm"]
        assert vlsm["id"].startswith("clipseg@") and vlsm["arch"] == "clipseg"
        assert vlsm["source"] == str(trained["model"]) and len(vlsm["decoder_sha256"]) == 64
        assert manifest["config"]["method"] == "vlsm"
        assert manifest["done"] == [f"case_{i:03d}" for i in range(N_TEST)]
        assert all("faithfulness" in e for e in manifest["images"])  # on by default
        prompts = json.loads((out / "prompts" / "case_000.json").read_text())
        assert prompts["method"] == "vlsm" and prompts["sam_model"] == "none"
        assert f"probability in {out / 'saliency'}" in stdout
    for prompt, (right, wrong, wins) in scores.items():
        assert right > 0.5, (prompt, scores)
        assert right > wrong + 0.3, (prompt, scores)
        assert wins >= N_TEST - 1, (prompt, scores)


def test_predict_one_bad_image_does_not_stop_the_others(trained, shapes, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        shutil.copy(shapes["test"] / "images" / f"case_{i:03d}.png", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    code, _, err = _run(["vlsm", "predict", "--model", str(trained["model"]), "--images",
                         str(images), "--prompt", "disk", "-o", str(out), "--device", "cpu",
                         "--no-faithfulness"])
    assert code == 1
    assert "broken.png: error: " in err and "1 image(s) failed" in err
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "case_000.png", "case_001.png", "case_002.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failed"] == ["broken"] and len(manifest["done"]) == 3


# --------------------------------------------------------------------------- evaluate


def _mean_dsc(out: Path, truth_dir: Path) -> float:
    return float(np.mean([_dice(_read_mask(out / p.name), _read_mask(p))
                          for p in sorted(truth_dir.iterdir())]))


def test_evaluate_scores_as_computed_and_beats_the_untrained_model(
        trained, shapes, tiny_clipseg_dir, tmp_path):
    test = shapes["test"]
    out = tmp_path / "eval"
    code, stdout, err = _run(["vlsm", "evaluate", "--model", str(trained["model"]), "--images",
                              str(test / "images"), "--masks", str(test / "disk"), "--prompt",
                              "disk", "-o", str(out), "--device", "cpu", "--no-faithfulness"])
    assert code == 0, err
    ours = _mean_dsc(out / "masks", test / "disk")
    with open(out / "evaluation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["name"] == "mean" and len(rows) == N_TEST + 1
    assert float(rows[-1]["dsc"]) == pytest.approx(ours, abs=1e-5)
    for row in rows[:-1]:
        mask = _read_mask(out / "masks" / f"{row['name']}.png")
        assert float(row["dsc"]) == pytest.approx(_dice(mask, _read_mask(
            test / "disk" / f"{row['name']}.png")), abs=1e-5)
    assert json.loads((out / "evaluation.json").read_text())["mean_dsc"] == \
        pytest.approx(ours, abs=1e-9)
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"Mean DSC {ours:.4f}, NSD ") and "evaluation.csv" in line
    assert ours > 0.6
    # the released (here: untrained tiny) CLIPSeg, zero-shot, on the same images
    code, stdout, err = _run(["vlsm", "evaluate", "--model", f"local-dir:{tiny_clipseg_dir}",
                              "--images", str(test / "images"), "--masks", str(test / "disk"),
                              "--prompt", "disk", "-o", str(tmp_path / "untrained"),
                              "--device", "cpu", "--no-faithfulness"])
    assert code == 0, err
    assert _mean_dsc(tmp_path / "untrained" / "masks", test / "disk") < ours - 0.4


@pytest.mark.parametrize("where", ["masks", "images"])
def test_evaluate_refuses_an_output_inside_its_inputs(shapes, where, tmp_path):
    test = tmp_path / "copy"
    shutil.copytree(shapes["test"], test)
    before = sorted(p.relative_to(test) for p in test.rglob("*"))
    code, _, err = _run(["vlsm", "evaluate", "--model", "local-dir:/nowhere", "--images",
                         str(test / "images"), "--masks", str(test / "disk"), "--prompt", "disk",
                         "-o", str(test / ("disk" if where == "masks" else "images") / "out")])
    assert code == 2
    assert "lies inside the --" in _one_error_line(err)
    assert sorted(p.relative_to(test) for p in test.rglob("*")) == before


# --------------------------------------------------------------------------- resume


def _small_data(shapes, folder: Path, n: int = 8) -> Path:
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        for i in range(n):
            shutil.copy(shapes["train"] / sub / f"case_{i:03d}.png", folder / sub)
    return folder


def _history(model: Path) -> list[dict]:
    return json.loads((model / "vlsm.json").read_text())["training"]["history"]


def test_train_interrupted_then_resumed(shapes, tiny_clipseg_dir, tmp_path, monkeypatch):
    from napari_medclipsam.cli import vlsm as cli_vlsm

    data = _small_data(shapes, tmp_path / "data")
    model = tmp_path / "model"
    base = ["vlsm", "train", "--images", str(data / "images"), "--masks",
            str(data / "masks"), "--class-name", "disk", "--class-name", "square",
            "--clipseg-model", f"local-dir:{tiny_clipseg_dir}", "--prompt-set", "p1",
            "--batch-size", "8", "--lr", "3e-3", "--device", "cpu", "-o", str(model)]

    def ctrl_c_at_step_3(desc):  # epoch 2's first batch (2 batches an epoch)
        def progress(step, total):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return progress

    monkeypatch.setattr(cli_vlsm, "tqdm_progress", ctrl_c_at_step_3)
    code, _, err = _run([*base, "--epochs", "3"])
    assert code == 130
    checkpoint = model / "checkpoint.pt"
    assert err.strip().splitlines()[-1] == (f"Interrupted; the last finished epoch (1) is in "
                                            f"{checkpoint}: --resume continues.")
    assert [row["epoch"] for row in _history(model)] == [1]
    monkeypatch.undo()

    code, _, err = _run([*base, "--epochs", "3", "--resume"])
    assert code == 0, err
    assert "Resuming after epoch 1 " in err
    assert [row["epoch"] for row in _history(model)] == [1, 2, 3]
    code, _, err = _run([*base, "--epochs", "5", "--resume"])
    assert code == 0, err
    assert "Resuming after epoch 3 " in err and "epoch 4/5: loss" in err
    assert [row["epoch"] for row in _history(model)] == [1, 2, 3, 4, 5]

    # flags left out take the checkpoint's (--epochs 5, --lr...); one given must agree with it
    code, stdout, err = _run(["vlsm", "train", "--images", str(data / "images"), "--masks",
                              str(data / "masks"), "--class-name", "disk", "--class-name",
                              "square", "-o", str(model), "--device", "cpu", "--resume"])
    assert code == 0, err
    assert "up to 5 epochs" in err and stdout.startswith("5 epoch(s) on ")
    assert len(_history(model)) == 5
    stamp = checkpoint.stat().st_mtime_ns
    code, _, err = _run([*base[:base.index("--lr")], "--lr", "1e-2", "--device", "cpu",
                         "-o", str(model), "--epochs", "6", "--resume"])
    assert code == 2
    line = _one_error_line(err)
    assert "--lr 0.003 -> 0.01" in line and "--overwrite" in line
    assert checkpoint.stat().st_mtime_ns == stamp


def test_train_sigterm_keeps_the_last_epoch(shapes, tiny_clipseg_dir, tmp_path, monkeypatch):
    from napari_medclipsam.cli import vlsm as cli_vlsm

    data = _small_data(shapes, tmp_path / "data")
    model = tmp_path / "model"

    def sigterm_at_step_5(desc):  # epoch 3's first batch
        def progress(step, total):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
        return progress

    monkeypatch.setattr(cli_vlsm, "tqdm_progress", sigterm_at_step_5)
    code, _, err = _run(["vlsm", "train", "--images", str(data / "images"), "--masks",
                         str(data / "masks"), "--class-name", "disk", "--clipseg-model",
                         f"local-dir:{tiny_clipseg_dir}", "--prompt-set", "p1", "--batch-size",
                         "4", "--epochs", "4", "--device", "cpu", "-o", str(model)])
    assert code == 143
    assert err.strip().splitlines()[-1].startswith("Terminated; the last finished epoch (2) is")
    assert len(_history(model)) == 2


def test_train_from_an_nnunet_dataset_corrected_cases_only(shapes, tiny_clipseg_dir, tmp_path):
    dataset = tmp_path / "raw" / "Dataset001_Shapes"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    corrected = {}
    for i in range(6):
        name = f"case_{i:03d}"
        shutil.copy(shapes["train"] / "images" / f"{name}.png",
                    dataset / "imagesTr" / f"{name}_0000.png")
        shutil.copy(shapes["train"] / "masks" / f"{name}.png", dataset / "labelsTr")
        corrected[name] = {"corrected": i < 4}
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "image"}, "labels": {"background": 0, "disk": 1, "square": 2},
        "numTraining": 6, "file_ending": ".png"}))
    (dataset / "medclipsam_cases.json").write_text(json.dumps(corrected))
    model = tmp_path / "model"
    code, _, err = _run(["vlsm", "train", "--dataset", str(dataset), "--corrected-only",
                         "--clipseg-model", f"local-dir:{tiny_clipseg_dir}", "--prompt-set",
                         "p1,p6", "--epochs", "1", "--device", "cpu", "-o", str(model)])
    assert code == 0, err
    record = json.loads((model / "vlsm.json").read_text())
    assert record["data"] == {"dataset": str(dataset.resolve()), "corrected_only": True,
                              "cases": 4}
    assert record["class_names"] == ["disk", "square"]
    assert record["prompt_sets"] == ["p1", "p6"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case", ["foreign", "inside_images", "no_class", "p7", "clip_flag",
                                  "bad_set", "both_sources"])
def test_train_refusals_before_any_model_loads(case, shapes, tiny_clipseg_dir, tmp_path,
                                               monkeypatch):
    from napari_medclipsam.vlsm import models

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(models, "build_vlsm", no_build)
    data = _small_data(shapes, tmp_path / "data", n=3)
    out = tmp_path / "model"
    flags = {"--images": str(data / "images"), "--masks": str(data / "masks"),
             "--class-name": "disk", "--prompt-set": "p1", "-o": str(out)}
    expect = {"foreign": "is not empty", "inside_images": "lies inside the input folder",
              "no_class": "--class-name is missing", "p7": "--definitions FILE",
              "clip_flag": "--clip-model applies to --arch biomedclipseg",
              "bad_set": "--prompt-set 'p10'", "both_sources": "--dataset and --images"}[case]
    extra: list[str] = []
    if case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "inside_images":
        flags["-o"] = str(data / "images" / "model")
    elif case == "no_class":
        del flags["--class-name"]
    elif case == "p7":
        flags["--prompt-set"] = "p1,p7"
    elif case == "clip_flag":
        extra = ["--clip-model", "local-dir:/nowhere"]
    elif case == "bad_set":
        flags["--prompt-set"] = "p10"
    elif case == "both_sources":
        extra = ["--dataset", str(data)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, err = _run(["vlsm", "train", *[v for kv in flags.items() for v in kv], *extra])
    assert code == 2
    assert expect in _one_error_line(err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- BiomedCLIPSeg


def test_biomedclipseg_trains_from_a_clip_and_predicts(shapes, tiny_clip_dir, tiny_clipseg_dir,
                                                       tmp_path):
    data = _small_data(shapes, tmp_path / "data")
    model = tmp_path / "model"
    code, stdout, err = _run([
        "vlsm", "train", "--arch", "biomedclipseg", "--clip-model", f"local-dir:{tiny_clip_dir}",
        "--decoder-init", "clipseg", "--clipseg-model", f"local-dir:{tiny_clipseg_dir}",
        "--images", str(data / "images"), "--masks", str(data / "masks"), "--class-name",
        "disk", "--class-name", "square", "--prompt-set", "p1", "--epochs", "2",
        "--batch-size", "8", "--device", "cpu", "-o", str(model)])
    assert code == 0, err
    record = json.loads((model / "vlsm.json").read_text())
    assert record["arch"] == "biomedclipseg" and record["base"]["decoder_init"] == "clipseg"
    assert record["base"]["clip_model"] == f"local-dir:{Path(tiny_clip_dir).resolve()}"
    assert len(record["training"]["history"]) == 2
    out = tmp_path / "pred"
    code, _, err = _run(["vlsm", "predict", "--model", str(model), "--images",
                         str(shapes["test"] / "images" / "case_000.png"), "--prompt", "disk",
                         "-o", str(out), "--device", "cpu", "--threshold", "0.3"])
    assert code == 0, err
    assert _read_mask(out / "masks" / "case_000.png").shape == (64, 64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["vlsm"]["arch"] == "biomedclipseg"
    assert manifest["config"]["vlsm"]["threshold"] == 0.3


# --------------------------------------------------------------------------- segment --method vlsm


def test_segment_method_vlsm_needs_no_clip_and_refines_with_sam(
        shapes, tiny_clipseg_dir, model_flags, tmp_path, monkeypatch):
    from tiny_clipseg import write_tiny_clipseg_dir

    from napari_medclipsam.core import models

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP was touched")

    monkeypatch.setattr(models, "load_clip", no_clip)
    monkeypatch.setattr(models, "check_clip_source", no_clip)
    images = shapes["test"] / "images"
    vlsm = ["--method", "vlsm", "--vlsm-model", f"local-dir:{tiny_clipseg_dir}"]
    out = tmp_path / "plain"
    code, _, err = _run(["segment", str(images), "--prompt", "disk", *vlsm, "-o", str(out),
                         "--device", "cpu"])
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["models"]) == {"vlsm", "device"}
    assert len(list((out / "masks").iterdir())) == N_TEST

    # --vlsm-refine: SAM from the VLSM mask's boxes (the tiny SAM; no CLIP flag needed)
    sam_flags = model_flags[model_flags.index("--sam-model"):model_flags.index("--steps")]
    refined = tmp_path / "refined"
    code, _, err = _run(["segment", str(images / "case_000.png"), str(images / "case_001.png"),
                         "--prompt", "disk", *vlsm, "--vlsm-refine", "--vlsm-threshold", "0.3",
                         *sam_flags, "-o", str(refined)])
    assert code == 0, err
    manifest = json.loads((refined / "manifest.json").read_text())
    assert set(manifest["models"]) == {"vlsm", "sam", "device"}
    assert manifest["models"]["sam"]["name"] == "vit_b" and manifest["config"]["vlsm"]["refine"]
    prompts = json.loads((refined / "prompts" / "case_000.json").read_text())
    assert prompts["sam_model"] == "vit_b"
    assert (refined / "masks" / "case_001.png").is_file()

    # --resume refuses another VLSM (compared by id, not by path) and keeps the same one's
    other = write_tiny_clipseg_dir(tmp_path / "other_clipseg", seed=1)
    code, _, err = _run(["segment", str(images), "--prompt", "disk", "--method", "vlsm",
                         "--vlsm-model", f"local-dir:{other}", "-o", str(out), "--device",
                         "cpu", "--resume"])
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "was made with other model weights (VLSM clipseg@" in line
    moved = tmp_path / "moved_clipseg"
    shutil.copytree(tiny_clipseg_dir, moved)
    code, stdout, err = _run(["segment", str(images), "--prompt", "disk", "--method", "vlsm",
                              "--vlsm-model", f"local-dir:{moved}", "-o", str(out), "--device",
                              "cpu", "--resume"])
    assert code == 0, err
    assert f"({N_TEST} kept from the run resumed)" in stdout


@pytest.mark.parametrize("flags, expect", [
    (["--vlsm-model", "local-dir:/x"], "--vlsm-model applies to --method vlsm"),
    (["--method", "vlsm", "--threshold", "0.4"], "--threshold applies to the saliency's"),
    (["--method", "vlsm", "--vlsm-threshold", "1.5"], "VLSM threshold must be in (0, 1)"),
    (["--method", "vlsm", "--volume", "--propagate"], "--propagate needs SAM"),
])
def test_segment_vlsm_flag_refusals(flags, expect, shapes, tmp_path):
    code, _, err = _run(["segment", str(shapes["test"] / "images"), "--prompt", "disk",
                         "-o", str(tmp_path / "out"), *flags])
    assert code == 2
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert line.startswith("medclipsam segment: error: ") and expect in line, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize("argv, flags", [
    (["vlsm", "train"], ["--arch", "--images", "--masks", "--class-name", "--dataset",
                         "--corrected-only", "--prompt-set", "--definitions", "--clipseg-model",
                         "--clip-model", "--decoder-init", "--extract-layers", "--epochs",
                         "--min-epochs", "--patience", "--batch-size", "--lr", "--weight-decay",
                         "--val-fraction", "--threshold", "--cache-gb", "--no-amp", "--seed",
                         "--device", "--resume", "--overwrite"]),
    (["vlsm", "predict"], ["--model", "--images", "--prompt", "--threshold", "--refine-sam",
                           "--sam-model", "--sam-checkpoint", "--resume", "--overwrite",
                           "--device", "--no-faithfulness", "saliency"]),
    (["vlsm", "evaluate"], ["--model", "--images", "--masks", "--prompt", "--threshold",
                            "--refine-sam", "--tolerance", "evaluation.csv"]),
    (["vlsm"], ["train", "predict", "evaluate"]),
    (["segment"], ["--vlsm-model", "--vlsm-threshold", "--vlsm-refine", "vlsm"]),
])
def test_help_names_the_flags(argv, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, flag


def test_the_parser_stays_light():
    code = ("import sys; from napari_medclipsam.cli import build_parser; build_parser(); "
            "sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
