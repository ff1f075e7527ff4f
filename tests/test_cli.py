"""`medclipsam segment` and `evaluate` end to end on synthetic files with tiny models."""

import json

import numpy as np
import pytest

from napari_medclipsam.cli import main


def _blob_image(h, w, cy, cx, r, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 40 + 10 * rng.standard_normal((h, w))
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    if dtype == np.uint16:
        return (img * 200).clip(0, 65535).astype(np.uint16)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path):
    import imageio.v3 as iio
    import tifffile

    d = tmp_path / "images"
    d.mkdir()
    iio.imwrite(d / "b_case.png", _blob_image(48, 64, 20, 30, 8))
    rgba = np.dstack([_blob_image(40, 40, 20, 20, 6, seed=1)] * 3 + [np.full((40, 40), 255,
                                                                             np.uint8)])
    iio.imwrite(d / "a_case.png", rgba)
    tifffile.imwrite(d / "c_case.tif", _blob_image(50, 30, 25, 15, 7, np.uint16, seed=2))
    return d


def test_segment_writes_every_output_at_input_size(model_flags, image_dir, tmp_path, capsys):
    import imageio.v3 as iio
    import tifffile

    out = tmp_path / "out"
    assert main(["segment", str(image_dir), "--prompt", "a disk", "-o", str(out),
                 *model_flags]) == 0
    sizes = {"a_case": (40, 40), "b_case": (48, 64), "c_case": (50, 30)}
    for name, shape in sizes.items():
        sal = tifffile.imread(out / "saliency" / f"{name}.tif")
        assert sal.shape == shape and sal.dtype == np.float32
        assert sal.min() >= 0.0 and sal.max() <= 1.0
        for folder in ("coarse", "masks"):
            m = iio.imread(out / folder / f"{name}.png")
            assert m.shape == shape and set(np.unique(m)) <= {0, 255}
        prompts = json.loads((out / "prompts" / f"{name}.json").read_text())
        assert {"boxes", "points", "components", "threshold", "found"} <= set(prompts)
        if prompts["found"]:
            x0, y0, x1, y1 = prompts["boxes"][0]
            assert 0 <= x0 <= x1 < shape[1] and 0 <= y0 <= y1 < shape[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["saliency"]["steps"] == 3
    assert manifest["config"]["saliency"]["layer"] == 2
    assert len(manifest["models"]["clip"]["sha256"]) == 64
    assert len(manifest["models"]["sam"]["sha256"]) == 64
    assert "torch" in manifest["versions"]
    assert sorted(e["name"] for e in manifest["images"]) == sorted(sizes)
    assert all(e["prompt"] == ["a disk"] for e in manifest["images"])


def test_prompt_file_pairs_by_name_not_order(model_flags, image_dir, tmp_path):
    prompts = {"c_case.tif": "a square", "a_case": ["a disk", "a round shape"],
               "default": "a circle", "zz_unused.png": "nothing"}
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(prompts))
    out = tmp_path / "out"
    assert main(["segment", str(image_dir / "c_case.tif"), str(image_dir / "a_case.png"),
                 str(image_dir / "b_case.png"), "--prompt-file", str(pf), "-o", str(out),
                 *model_flags]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    got = {e["name"]: e["prompt"] for e in manifest["images"]}
    assert got == {"c_case": ["a square"], "a_case": ["a disk", "a round shape"],
                   "b_case": ["a circle"]}


def test_refuses_to_overwrite_and_keeps_files(model_flags, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(image_dir / "b_case.png"), "--prompt", "a disk", "-o", str(out),
            *model_flags]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*args, "--overwrite"]) == 0
    # a rerun from the saved manifest reproduces the configuration
    out2 = tmp_path / "out2"
    assert main(["segment", str(image_dir / "b_case.png"), "--prompt", "a disk", "-o", str(out2),
                 "--config", str(out / "manifest.json"), *model_flags[:8]]) == 0
    m1 = json.loads((out / "manifest.json").read_text())["config"]
    m2 = json.loads((out2 / "manifest.json").read_text())["config"]
    assert m1 == m2


def test_user_mistakes_give_clear_errors(model_flags, image_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["segment", str(image_dir), "-o", out, *model_flags]) == 2
    assert "No prompt for 3 image(s)" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "nope.png"), "--prompt", "x", "-o", out]) == 2
    assert "no such file" in capsys.readouterr().err
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "b_case.png").write_bytes((image_dir / "b_case.png").read_bytes())
    assert main(["segment", str(image_dir), str(dup), "--prompt", "x", "-o", out,
                 *model_flags]) == 2
    assert "share the name" in capsys.readouterr().err
    assert main(["segment", str(image_dir), "--prompt", "x", "-o", out, "--top-k", "-3",
                 *model_flags]) == 2
    assert "top_k" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_volume_slice_by_slice_to_nifti(model_flags, tmp_path, capsys):
    import nibabel as nib

    vol = np.stack([_blob_image(32, 40, 16, 20, 5 + z, seed=z) for z in range(3)])
    affine = np.diag([0.7, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.int16), affine),
             str(tmp_path / "vol.nii.gz"))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "vol.nii.gz"), "--prompt", "a disk", "-o",
                 str(out), *model_flags]) == 1
    assert "pass --volume" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "vol.nii.gz"), "--prompt", "a disk", "-o",
                 str(out), "--volume", "--overwrite", *model_flags]) == 0
    mask = nib.load(str(out / "masks" / "vol.nii.gz"))
    assert mask.shape == (40, 32, 3) and np.allclose(mask.affine, affine)
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    assert {"slices", "found_slices"} <= set(prompts)
    assert prompts["slices_run"] == [0, 1, 2] and prompts["skipped_slices"] == []
    assert not (out / "partial").exists()  # the partial files go once the volume is written


def test_nothing_found_is_reported_not_crashed(model_flags, image_dir, tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "out"
    assert main(["segment", str(image_dir / "b_case.png"), "--prompt", "a disk", "-o", str(out),
                 "--eta-c", "1.0", *model_flags]) == 0
    assert "Nothing found" in capsys.readouterr().err
    assert iio.imread(out / "masks" / "b_case.png").max() == 0
    assert json.loads((out / "prompts" / "b_case.json").read_text())["found"] is False


def test_evaluate_pairs_by_name_resizes_and_scores(tmp_path, capsys):
    import imageio.v3 as iio

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    g = np.zeros((40, 40), np.uint8)
    g[10:30, 10:30] = 255
    iio.imwrite(gt / "one.png", g)
    iio.imwrite(pred / "one.png", g[::2, ::2])  # half size: nearest upsampling restores it
    g2 = np.zeros((20, 20), np.uint8)
    g2[0:10, :] = 255
    p2 = np.zeros((20, 20), np.uint8)
    p2[0:5, :] = 255  # DSC = 2*100/(100+200) = 2/3
    iio.imwrite(gt / "two.png", g2)
    iio.imwrite(pred / "two.png", p2)
    iio.imwrite(gt / "three.png", g2)  # no prediction
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 0
    captured = capsys.readouterr()
    assert "no prediction: three" in captured.err
    result = json.loads((pred / "evaluation.json").read_text())
    scores = {r["name"]: r for r in result["images"]}
    assert scores["one"]["dsc"] == pytest.approx(1.0) and scores["one"]["nsd"] == pytest.approx(1)
    assert scores["two"]["dsc"] == pytest.approx(2 / 3)
    assert scores["three"]["dsc"] == 0.0
    assert result["mean_dsc"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert (pred / "evaluation.csv").read_text().startswith("name,dsc,nsd,status")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(empty), "--gt", str(gt)]) == 2


def test_an_unforeseen_os_error_is_one_line_for_every_command(monkeypatch, tmp_path, capsys):
    """main turns any OSError into one line (exit 2), whichever command raised it."""
    import errno

    from napari_medclipsam.cli import nnunet as nnunet_cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.nii.gz"))

    monkeypatch.setattr(nnunet_cli, "run_nnunet", full_disk)
    rc = main(["nnunet", "status", "--dataset-id", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    where = tmp_path / "x.nii.gz"
    assert err == (f"medclipsam nnunet: error: no space left on the device ({where}); free "
                   "some space or choose another -o folder, then rerun (with --resume where "
                   "the command has it).\n")
