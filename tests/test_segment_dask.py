"""``medclipsam segment --scheduler``: the same outputs as a run on this machine, from a
2-process Dask cluster on the tiny models, file by file; resume; one bad image; errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_medclipsam.cli import main

TESTS = Path(__file__).resolve().parent
MODEL_STEPS = 2


@pytest.fixture
def worker_env(monkeypatch):
    """Worker processes see the tests' tiny-model builders (a Dask preload module)."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", '["dask_tiny_models"]')
    import dask

    dask.config.refresh()
    yield
    monkeypatch.undo()
    dask.config.refresh()


@pytest.fixture
def one_thread():
    """Torch on one thread here, as in each worker (--threads-per-worker 1): float sums then
    run in the same order, so the saliency maps agree to the bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(folder: Path, n: int = 5) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = (rng.random((48, 64)) * 60).astype(np.uint8)
        yy, xx = np.mgrid[:48, :64]
        image[(yy - 10 - 4 * i) ** 2 + (xx - 20 - 5 * i) ** 2 < 80] = 220
        Image.fromarray(image).save(folder / f"case_{i}.png")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_two_workers_write_what_one_machine_writes(tmp_path, model_flags, worker_env,
                                                   one_thread, capsys):
    images = _images(tmp_path / "images")
    base = ["segment", str(images), "--prompt", "bright disk", *model_flags]
    assert main([*base, "-o", str(tmp_path / "here")]) == 0
    capsys.readouterr()
    code = main([*base, "-o", str(tmp_path / "dask"), "--scheduler", "local", "--workers", "2",
                 "--threads-per-worker", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Dask: a local cluster of 2 worker(s)" in err and "dashboard http" in err
    here, there = _files(tmp_path / "here"), _files(tmp_path / "dask")
    assert sorted(here) == sorted(there) and len(here) == 5 * 4
    different = [name for name in here if here[name] != there[name]]
    assert not different, different
    ours = json.loads((tmp_path / "here" / "manifest.json").read_text())
    theirs = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert theirs["status"] == "finished" and theirs["done"] == ours["done"]
    assert theirs["parameters_sha256"] == ours["parameters_sha256"]
    assert theirs["models"]["clip"] == ours["models"]["clip"]
    assert {e["worker"] for e in theirs["images"]} <= {"0", "1"}
    for a, b in zip(ours["images"], theirs["images"], strict=True):
        assert a["name"] == b["name"] and a["parameters_sha256"] == b["parameters_sha256"]
        assert a["outputs"] == b["outputs"] and a["found"] == b["found"]


def test_resume_keeps_finished_images_and_a_bad_image_stops_nothing(
        tmp_path, model_flags, worker_env, one_thread, capsys):
    images = _images(tmp_path / "images", n=4)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    base = ["segment", str(images), "--prompt", "bright disk", *model_flags, "-o", str(out),
            "--scheduler", "local", "--workers", "2", "--threads-per-worker", "1"]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "broken.png: error:" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failed"] == ["broken"] and len(manifest["done"]) == 4
    # as if killed half way: two images' outputs gone, their entries left "pending"
    for name in ("case_2", "case_3"):
        (out / "masks" / f"{name}.png").unlink()
    before = (out / "masks" / "case_0.png").stat().st_mtime_ns
    assert main([*base, "--resume"]) == 1
    assert "(2 kept from the run resumed)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["done"]) == ["case_0", "case_1", "case_2", "case_3"]
    assert (out / "masks" / "case_0.png").stat().st_mtime_ns == before  # kept, not redone
    assert (out / "masks" / "case_3.png").is_file()
    redone = {e["name"] for e in manifest["images"] if "seconds" in e and e["status"] == "done"}
    assert {"case_2", "case_3"} <= redone


@pytest.mark.parametrize("flags, words", [
    (["--scheduler", "somewhere"], "give 'local'"),
    (["--workers", "2"], "applies with --scheduler"),
    (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "applies to --scheduler local"),
    (["--scheduler", "local", "--workers", "0"], "at least 1"),
])
def test_flags_are_checked_before_anything_starts(tmp_path, flags, words, capsys):
    images = _images(tmp_path / "images", n=1)
    code = main(["segment", str(images), "--prompt", "x", "-o", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_an_unreachable_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    from napari_medclipsam import cluster

    images = _images(tmp_path / "images", n=1)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "2s")
    code = main(["segment", str(images), "--prompt", "x", "-o", str(tmp_path / "o"),
                 "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err, err
    assert len(err.splitlines()) == 1


def test_a_run_killed_between_manifest_writes_loses_no_finished_image(
        tmp_path, model_flags, worker_env, one_thread, capsys, monkeypatch):
    from napari_medclipsam.cli import segment_dask

    images = _images(tmp_path / "images", n=3)
    out = tmp_path / "out"
    base = ["segment", str(images), "--prompt", "bright disk", *model_flags, "-o", str(out),
            "--scheduler", "local", "--workers", "1", "--threads-per-worker", "1"]
    # the state a SIGKILL leaves: every task wrote its outputs and its entry file, the
    # manifest was last written before any image finished
    with monkeypatch.context() as patch:
        patch.setattr(segment_dask, "_remove_entries", lambda out: None)
        assert main(base) == 0
    entries = sorted(p.name for p in (out / "entries").glob("*.json"))
    assert entries == ["case_0.json", "case_1.json", "case_2.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(status="running", images=[], done=[])
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    assert "(3 kept from the run resumed)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["done"] == [
        "case_0", "case_1", "case_2"]
    assert not (out / "entries").exists()  # all in manifest.json now
