"""Hostile inputs for `medclipsam segment` and the CLI in general (issue 11's permanent sweep).

Every case asserts its exact outcome: the exit status, the one error line (no traceback),
the user's files unchanged by hash, nothing left behind, and, for mistakes that can be
seen before any work, that no model was loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_pipeline import write_cli_runner

from napari_medclipsam.cli import main
from napari_medclipsam.core import io, models
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.io import SUPPORTED
from napari_medclipsam.core.pipeline import ZeroShotPipeline

PREFIX = "medclipsam segment: error: "


MODEL_STEPS = 2  # M2IB steps of the tiny models (conftest's model_flags)


def _blob(h=40, w=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 40 + 10 * rng.standard_normal((h, w))
    img[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 < 49] = 200
    return img.clip(0, 255).astype(np.uint8)


@dataclass
class Ctx:
    """A folder of the user's files (images, prompt and config files) and the run's OUT."""

    root: Path
    images: Path
    out: Path
    flags: list[str]
    monkeypatch: Any

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / "user" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
        return path

    def seg(self, *items, prompt: str | None = "a disk") -> list[str]:
        # the random tiny CLIP ignores the text: its faithfulness warnings would sit between
        # the error lines these tests read (test_faithfulness checks them)
        args = ["segment", *map(str, items), "-o", str(self.out), *self.flags,
                "--no-faithfulness"]
        return args + (["--prompt", prompt] if prompt is not None else [])


@pytest.fixture
def ctx(tmp_path, model_flags, monkeypatch):
    import imageio.v3 as iio

    images = tmp_path / "user" / "images"
    images.mkdir(parents=True)
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        iio.imwrite(images / name, _blob(seed=k))
    return Ctx(tmp_path, images, tmp_path / "out", model_flags, monkeypatch)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_only(ctx: Ctx, folder: Path) -> None:
    """Make ``folder`` unwritable: chmod, and as root (whom chmod does not stop) make the
    kernel's answer explicit by refusing mkdir/open-for-writing under it."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_mkdir, real_open = os.mkdir, os.open

    def inside(path) -> bool:
        return Path(os.fspath(path)).resolve().is_relative_to(folder.resolve())

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    ctx.monkeypatch.setattr(os, "mkdir", mkdir)
    ctx.monkeypatch.setattr(os, "open", open_)


# --------------------------------------------------------------------------- before any work


def _case_device_foo(c: Ctx):
    return ([*c.seg(c.images / "a.png"), "--device", "foo"],
            "--device foo: unknown device; use cpu, cuda, cuda:N or mps (or leave it out to "
            "choose automatically).")


def _case_device_cuda(c: Ctx):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return ([*c.seg(c.images / "a.png"), "--device", "cuda"],
            "Device 'cuda' was requested but CUDA is not available here; use --device cpu (or "
            "leave it out to choose automatically).")


def _prompt_file_case(content: Any, expected_tail: str, raw: bytes | None = None):
    def case(c: Ctx):
        path = c.file("prompts.json", raw if raw is not None else json.dumps(content))
        return ([*c.seg(c.images, prompt=None), "--prompt-file", str(path)],
                f"--prompt-file {path}: {expected_tail}")
    return case


def _config_case(content: Any, expected_tail: str, raw: str | None = None):
    def case(c: Ctx):
        path = c.file("config.json", raw if raw is not None else json.dumps(content))
        return ([*c.seg(c.images / "a.png"), "--config", str(path)],
                f"--config {path}: {expected_tail}")
    return case


def _case_markdown(c: Ctx):
    notes = c.file("notes.md", "# my notes\n")
    return (c.seg(c.images / "a.png", notes),
            f"{notes}: not an image file (supported: {', '.join(SUPPORTED)}, or DICOM); give "
            "image files or folders of them.")


def _case_text_named_png(c: Ctx):
    fake = c.file("fake.png", "not a picture\n")
    return (c.seg(fake), f"fake.png: cannot be read as an image (UnidentifiedImageError: "
                         f"cannot identify image file {str(fake)!r}).")


def _case_all_unreadable(c: Ctx):
    one, two = c.file("one.png", "text\n"), c.file("two.tif", b"\x00" * 64)
    return (c.seg(one, two), "None of the 2 inputs can be read as an image; nothing was "
                             "computed (first: one.png: cannot be read as an image "
                             f"(UnidentifiedImageError: cannot identify image file "
                             f"{str(one)!r}).)")


def _case_missing(c: Ctx):
    return c.seg(c.root / "nope.png"), f"{c.root / 'nope.png'}: no such file or folder."


def _case_empty_folder(c: Ctx):
    empty = c.root / "user" / "empty"
    empty.mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    return c.seg(empty), f"{empty}: no images found (supported: {', '.join(SUPPORTED)})."


def _case_same_stem(c: Ctx):
    import imageio.v3 as iio

    other = c.root / "user" / "other"
    other.mkdir(parents=True)
    iio.imwrite(other / "a.png", _blob(seed=9))
    return (c.seg(c.images / "a.png", other / "a.png"),
            f"Two inputs share the name 'a' ({c.images / 'a.png'} and {other / 'a.png'}); "
            "outputs are named after inputs, so rename one.")


def _case_out_is_file(c: Ctx):
    c.out = c.file("out.txt", "my file")
    return c.seg(c.images / "a.png"), f"-o {c.out}: exists and is not a folder; choose a folder."


def _case_out_read_only(c: Ctx):
    locked = c.root / "locked"
    _read_only(c, locked)
    c.out = locked / "out"
    return (c.seg(c.images / "a.png"),
            f"-o {c.out}: cannot write in {locked} (Permission denied); choose a folder you "
            "can write to.")


def _case_out_under_a_file(c: Ctx):
    blocker = c.file("blocker", "a file where a folder should be")
    c.out = blocker / "out"
    return (c.seg(c.images / "a.png"),
            f"-o {c.out}: {blocker} is a file, not a folder; choose another place.")


def _case_slices_without_volume(c: Ctx):
    return ([*c.seg(c.images / "a.png"), "--slices", "0:4"],
            "--slices applies to volumes; add --volume.")


def _case_bad_window(c: Ctx):
    return ([*c.seg(c.images / "a.png"), "--window", "wide"],
            "A window is 'CENTER,WIDTH' (e.g. -600,1500); got 'wide'.")


def _case_empty_prompt(c: Ctx):
    return (c.seg(c.images / "a.png", prompt="   "),
            '--prompt is empty; write what to find (e.g. --prompt "breast tumor").')


def _case_resume_without_manifest(c: Ctx):
    (c.out / "masks").mkdir(parents=True)
    (c.out / "masks" / "a.png").write_bytes(b"someone's mask")
    return ([*c.seg(c.images / "a.png"), "--resume"],
            f"--resume: {c.out} has outputs but no manifest.json, so they cannot be checked; "
            "pass --overwrite to redo them, or choose another -o.")


def _case_models_missing(c: Ctx):
    flags = list(c.flags)
    flags[flags.index("--clip-model") + 1] = f"local-dir:{c.root / 'no_clip'}"
    flags[flags.index("--sam-checkpoint") + 1] = str(c.root / "no_sam.pth")
    c.flags = flags
    return (c.seg(c.images / "a.png"),
            "2 problem(s) with the models; nothing was computed:\n"
            f"CLIP: CLIP folder not found: {c.root / 'no_clip'} (--clip-model local-dir:"
            f"{c.root / 'no_clip'}).\nSAM: SAM checkpoint not found: {c.root / 'no_sam.pth'}.")


BEFORE_WORK = {
    "device-foo": _case_device_foo,
    "device-cuda-without-cuda": _case_device_cuda,
    "prompt-file-number": _prompt_file_case(
        {"a.png": 5, "default": "a disk"},
        "the prompt for 'a.png' must be a text or a list of texts; got a number (5)."),
    "prompt-file-object": _prompt_file_case(
        {"default": {"text": "a disk"}},
        "the prompt for 'default' must be a text or a list of texts; got an object."),
    "prompt-file-list-with-number": _prompt_file_case(
        {"default": ["a disk", 3]},
        "the prompt for 'default' must be a text or a list of texts; got a list holding a "
        "number (3)."),
    "prompt-file-empty-text": _prompt_file_case(
        {"default": " "}, "the prompt for 'default' is empty; write what to find (e.g. "
                          "\"breast tumor\")."),
    "prompt-file-not-an-object": _prompt_file_case(
        ["a disk"], "expected an object mapping file names to prompts; got a list."),
    "prompt-file-non-utf8": _prompt_file_case(
        None, "not UTF-8 text (byte 15); save it as UTF-8 JSON.",
        raw=b'{"default": "a \xe9\xff disk"}'),
    "prompt-file-invalid-json": _prompt_file_case(
        None, "not valid JSON (Expecting value at line 1 column 13).", raw=b'{"default": '),
    "config-invalid-json": _config_case(
        None, "not valid JSON (Expecting ',' delimiter at line 1 column 27).",
        raw='{"saliency": {"steps": 3} "coarse": {}}'),
    "config-wrong-type": _config_case(
        {"saliency": {"steps": "ten"}}, "saliency.steps must be a whole number; got a text "
                                        "('ten')."),
    "config-bool-for-int": _config_case(
        {"config": {"coarse": {"top_k": True}}}, "coarse.top_k must be a whole number; got "
                                                 "a boolean (true)."),
    "config-section-not-object": _config_case(
        {"saliency": 5}, "saliency must be an object of settings; got a number (5)."),
    "config-unknown-setting": _config_case({"colour": "red"}, "unknown setting(s) colour."),
    "config-not-an-object": _config_case([1, 2], "expected a JSON object (a saved "
                                                 "manifest.json or config); got a list."),
    "config-out-of-range": _config_case({"saliency": {"steps": 0}},
                                        "steps must be at least 1; got 0."),
    "markdown-input": _case_markdown,
    "text-named-png": _case_text_named_png,
    "all-inputs-unreadable": _case_all_unreadable,
    "missing-file": _case_missing,
    "folder-without-images": _case_empty_folder,
    "two-inputs-same-stem": _case_same_stem,
    "out-is-a-file": _case_out_is_file,
    "out-read-only": _case_out_read_only,
    "out-under-a-file": _case_out_under_a_file,
    "slices-without-volume": _case_slices_without_volume,
    "bad-window": _case_bad_window,
    "empty-prompt": _case_empty_prompt,
    "resume-without-manifest": _case_resume_without_manifest,
    "clip-and-sam-missing": _case_models_missing,
}


@pytest.mark.parametrize("case", list(BEFORE_WORK), ids=list(BEFORE_WORK))
def test_refused_before_any_work(ctx, case, capsys):
    loads = []
    ctx.monkeypatch.setattr(models, "load_clip",
                            lambda *a, **k: loads.append("clip") or pytest.fail("CLIP loaded"))
    ctx.monkeypatch.setattr(models, "load_sam",
                            lambda *a, **k: loads.append("sam") or pytest.fail("SAM loaded"))
    args, expected = BEFORE_WORK[case](ctx)
    out_existed = ctx.out.exists()
    before = _hashes(ctx.root / "user")
    out_before = _hashes(ctx.out) if ctx.out.is_dir() else None
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "Warning" not in err
    assert err == f"{PREFIX}{expected}\n"
    assert loads == []
    assert _hashes(ctx.root / "user") == before
    if out_before is not None:
        assert _hashes(ctx.out) == out_before
    elif not out_existed:
        assert not ctx.out.exists()  # nothing left behind
    leftovers = [p for p in ctx.root.rglob(".medclipsam-probe-*")]
    assert leftovers == []


# --------------------------------------------------------------------------- during the batch


def _degenerate(c: Ctx):
    import imageio.v3 as iio

    iio.imwrite(c.images / "b.png", np.full((2, 10000), 90, np.uint8))
    with pytest.raises(InputError) as info:
        io.to_rgb_uint8(np.full((2, 10000), 90, np.uint8))
    return "b.png", str(info.value), "InputError"


def _truncated(c: Ctx):
    data = (c.images / "b.png").read_bytes()
    (c.images / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        io.read_image(c.images / "b.png")
    return "b.png", str(info.value), "InputError"


def _internal_error(c: Ctx):
    original = ZeroShotPipeline.segment

    def segment(self, image, *args, **kwargs):
        if np.array_equal(image, _blob(seed=1)):
            raise TypeError("boom in b")
        return original(self, image, *args, **kwargs)

    c.monkeypatch.setattr(ZeroShotPipeline, "segment", segment)
    return ("b.png", "internal error (TypeError: boom in b); rerun with --debug for the "
                     "traceback and please report it.", "TypeError")


def _io_error(c: Ctx):
    original = io.write_mask_png

    def write_mask_png(path, mask):
        if Path(path).name == "b.png":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return original(path, mask)

    c.monkeypatch.setattr(io, "write_mask_png", write_mask_png)
    return "b.png", f"input/output error ({c.out / 'coarse' / 'b.png'}).", "OSError"


def _volume_without_flag(c: Ctx):
    import nibabel as nib

    (c.images / "b.png").unlink()
    vol = np.stack([_blob(seed=z) for z in range(3)]).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(c.images / "b.nii.gz"))
    return ("b.nii.gz", "b.nii.gz is a 3-D volume (3, 40, 48); pass --volume to process it "
                        "slice by slice.", "InputError")


DURING = {"degenerate-2x10000": _degenerate, "truncated-png": _truncated,
          "internal-error": _internal_error, "io-error-writing": _io_error,
          "volume-without-flag": _volume_without_flag}


@pytest.mark.parametrize("case", list(DURING), ids=list(DURING))
def test_one_bad_image_in_the_middle_of_a_batch(ctx, case, capsys):
    """The others are written, the failure is one line and a manifest entry, exit 1."""
    import imageio.v3 as iio

    name, message, kind = DURING[case](ctx)
    before = _hashes(ctx.root / "user")
    rc = main(ctx.seg(ctx.images))
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err and "Warning" not in err
    lines = err.strip().splitlines()
    assert f"{name}: error: {message}" in lines
    assert lines[-1] == (f"1 image(s) failed (see the errors above and manifest.json): "
                         f"{name}")
    for stem in ("a", "c"):
        assert iio.imread(ctx.out / "masks" / f"{stem}.png").shape == (40, 48)
    manifest = json.loads((ctx.out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["done"] == ["a", "c"]
    failed = [e for e in manifest["images"] if e["status"] == "failed"]
    assert [(e["image"], e["error"], e["error_type"]) for e in failed] == [
        (str(ctx.images / name), message, kind)]
    assert _hashes(ctx.root / "user") == before
    assert not list(ctx.out.rglob(".*.partial-*"))  # no temporary left


def test_internal_error_shows_its_traceback_with_debug(ctx, capsys):
    _internal_error(ctx)
    assert main(["--debug", *ctx.seg(ctx.images)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: boom in b" in err
    # --debug may also stand after the command
    ctx.out = ctx.root / "out2"
    assert main([*ctx.seg(ctx.images), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_full_disk_stops_the_batch_in_one_line(ctx, capsys):
    calls = []
    original = io.write_float_tiff

    def write_float_tiff(path, data):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)

    ctx.monkeypatch.setattr(io, "write_float_tiff", write_float_tiff)
    rc = main(ctx.seg(ctx.images))
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"{PREFIX}no space left on the device ({ctx.out / 'saliency' / 'b.tif'}); "
                   "free some space or choose another -o folder, then rerun (with --resume "
                   "where the command has it).\n")
    assert calls == ["a.tif", "b.tif"]  # c was not attempted
    manifest = json.loads((ctx.out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert (manifest["done"], manifest["failed"], manifest["pending"]) == (["a"], ["b"], ["c"])


def test_existing_outputs_are_counted_once(ctx, capsys):
    assert main(ctx.seg(ctx.images / "a.png")) == 0
    before = _hashes(ctx.out)
    capsys.readouterr()
    assert main(ctx.seg(ctx.images / "a.png")) == 2
    err = capsys.readouterr().err
    # saliency, coarse, prompts, mask and the manifest: 5 files, not 5 + the other variants
    assert err.startswith(f"{PREFIX}5 output file(s) already exist in {ctx.out} ")
    assert "--resume" in err and "--overwrite" in err
    assert _hashes(ctx.out) == before


def test_two_runs_into_one_folder(ctx, capsys):
    import fcntl

    ctx.out.mkdir()
    fd = os.open(ctx.out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(ctx.seg(ctx.images / "a.png")) == 2
    finally:
        os.close(fd)
    assert capsys.readouterr().err == (
        f"{PREFIX}Another medclipsam segment is writing to {ctx.out}; wait for it to finish, "
        "or choose another -o folder.\n")
    assert not (ctx.out / "masks").exists()


def test_ctrl_c_while_models_load_writes_nothing(ctx, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    ctx.monkeypatch.setattr(models, "load_clip", interrupted)
    assert main(ctx.seg(ctx.images)) == 130
    assert capsys.readouterr().err == (
        "Interrupted while loading the models; nothing was written.\n")
    assert not ctx.out.exists()


def test_ctrl_c_in_a_batch_writes_the_manifest_and_resume_continues(ctx, capsys):
    calls = []
    original = ZeroShotPipeline.segment

    def segment(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with ctx.monkeypatch.context() as m:
        m.setattr(ZeroShotPipeline, "segment", segment)
        assert main(ctx.seg(ctx.images)) == 130
    err = capsys.readouterr().err
    assert err.endswith("Interrupted: 1 of 3 image(s) done; manifest.json written. Continue "
                        "with the same command and --resume.\n")
    manifest = json.loads((ctx.out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert (manifest["done"], manifest["pending"]) == (["a"], ["b", "c"])
    assert [e["status"] for e in manifest["images"]] == ["done", "interrupted"]
    assert len(manifest["images"][0]["parameters_sha256"]) == 64
    kept = _hashes(ctx.out / "masks")
    seen = []

    def counting(self, image, *args, **kwargs):
        seen.append(next(k for k in range(3) if np.array_equal(image, _blob(seed=k))))
        return original(self, image, *args, **kwargs)

    with ctx.monkeypatch.context() as m:
        m.setattr(ZeroShotPipeline, "segment", counting)
        assert main([*ctx.seg(ctx.images), "--resume"]) == 0
    assert seen == [1, 2]  # b and c only; a is kept
    assert _hashes(ctx.out / "masks")["a.png"] == kept["a.png"]
    manifest = json.loads((ctx.out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["done"] == ["a", "b", "c"]
    # a resume with another prompt for the images already done is refused
    capsys.readouterr()
    assert main([*ctx.seg(ctx.images, prompt="a round shape"), "--resume"]) == 2
    assert "were made with another prompt" in capsys.readouterr().err


# --------------------------------------------------------------------------- noise


def test_third_party_warnings_hidden_unless_debug(ctx):
    """A fresh process imports torch and timm inside main (as the console script does):
    their import-time FutureWarning is hidden; --debug shows it."""
    runner = write_cli_runner(ctx.root)
    env = {**os.environ, "MEDCLIPSAM_HOME": str(ctx.root / "cache")}
    args = [sys.executable, str(runner), *ctx.seg(ctx.images / "a.png")]
    quiet = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("Segmented 1 image(s)")
    ctx.out = ctx.root / "out2"
    loud = subprocess.run([sys.executable, str(runner), "--debug",
                           *ctx.seg(ctx.images / "a.png")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "FutureWarning" in loud.stderr
