"""CLIP fine-tuning: caption data, retrieval protocol, the training loop and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medclipsam.core.errors import CancelledError, InputError
from napari_medclipsam.finetune.data import (
    Pair,
    clean_caption,
    clean_pairs,
    read_pairs,
    split_pairs,
)
from napari_medclipsam.finetune.retrieval import retrieval_from_embeddings

# --------------------------------------------------------------------------- data


def _png(path, value=128, size=16):
    import imageio.v3 as iio

    iio.imwrite(path, np.full((size, size), value, np.uint8), extension=".png")
    return path


def test_caption_cleaning_follows_the_paper():
    assert clean_caption("  CT   of the\tchest:\n nodule (12 mm) #3 ★ ") == \
        "CT of the chest: nodule (12 mm) 3"
    assert clean_caption("T2-weighted MRI, 50% <b>edema</b>") == \
        "T2-weighted MRI, 50% b edema /b"
    pairs = [Pair(None, "short one"), Pair(None, "a caption that is long enough")]
    kept, dropped = clean_pairs(pairs, 20)
    assert [p.caption for p in kept] == ["a caption that is long enough"] and dropped == 1


def test_reads_csv_and_sidecar_folders(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "b.png")
    csv = tmp_path / "pairs.csv"
    csv.write_text('path,caption\nimgs/a.png,"axial CT, lungs"\n' f"{tmp_path / 'b.png'},x\n")
    pairs = read_pairs(csv)
    assert [p.image.name for p in pairs] == ["a.png", "b.png"]
    assert pairs[0].caption == "axial CT, lungs" and pairs[0].image.is_file()

    folder = tmp_path / "side"
    folder.mkdir()
    _png(folder / "c.png")
    (folder / "c.txt").write_text("chest x-ray with both lungs")
    _png(folder / "no_caption.png")
    assert read_pairs(folder) == [Pair(folder / "c.png", "chest x-ray with both lungs")]


def test_reads_json_jsonl_and_open_clip_tab_csvs(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    expected = [Pair(tmp_path / "a.png", "axial CT of the lungs"),
                Pair(tmp_path / "b.png", "T2 MRI, édème")]
    (tmp_path / "list.json").write_text(json.dumps(
        [{"image": "a.png", "caption": "axial CT of the lungs"},
         {"image": str(tmp_path / "b.png"), "caption": "T2 MRI, édème"}]), encoding="utf-8")
    (tmp_path / "map.json").write_text(json.dumps(
        {"a.png": "axial CT of the lungs", "b.png": "T2 MRI, édème"}), encoding="utf-8")
    (tmp_path / "lines.jsonl").write_text(
        '{"image": "a.png", "caption": "axial CT of the lungs"}\n\n'
        '{"image": "b.png", "caption": "T2 MRI, édème"}\n', encoding="utf-8")
    # open_clip's own CSV layout: tab-separated filepath/title, commas inside captions
    (tmp_path / "oc.csv").write_text("filepath\ttitle\na.png\taxial CT of the lungs\n"
                                     "b.png\tT2 MRI, édème\n", encoding="utf-8")
    for name in ("list.json", "map.json", "lines.jsonl", "oc.csv"):
        assert read_pairs(tmp_path / name) == expected, name
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": \n')
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_pairs(tmp_path / "bad.jsonl")


def test_a_folder_names_images_without_captions(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a caption for the first image")
    lines = []
    assert [p.image.name for p in read_pairs(tmp_path, log=lines.append)] == ["a.png"]
    assert lines == [f"1 image(s) in {tmp_path} have no caption file and are left out "
                     "(e.g. b.png)."]


def test_bad_caption_data_is_named(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_pairs(tmp_path / "nothing.csv")
    csv = tmp_path / "p.csv"
    csv.write_text("file,label\na.png,x\n")
    with pytest.raises(InputError, match="caption column"):
        read_pairs(csv)
    csv.write_text("path,caption\nmissing.png,some caption here\n")
    with pytest.raises(InputError, match="do not exist.*missing.png"):
        read_pairs(csv)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image-caption pairs"):
        read_pairs(tmp_path / "empty")


def test_split_is_85_15_deterministic_and_stable():
    pairs = [Pair(f"img{i}.png", f"caption number {i:04d} long") for i in range(200)]
    train, val = split_pairs(pairs, 0.15, seed=0)
    assert len(val) == 30 and len(train) == 170
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(pairs)
    # A pair's side does not depend on the listing order, nor on other pairs being added.
    assert set(split_pairs(pairs[::-1], 0.15, seed=0)[1]) == set(val)
    assert set(split_pairs(pairs, 0.15, seed=1)[1]) != set(val)


# --------------------------------------------------------------------------- retrieval


def test_retrieval_perfect_random_and_duplicate_captions():
    rng = np.random.default_rng(0)
    n, d = 200, 32
    emb = rng.standard_normal((n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    captions = [f"caption {i}" for i in range(n)]
    perfect = retrieval_from_embeddings(emb, emb, captions)
    assert all(v == 1.0 for v in perfect.mean.values())
    assert perfect.batch_size == 50 and perfect.repeats == 5
    assert len(perfect.per_repeat["i2t@1"]) == 5

    other = rng.standard_normal((n, d))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    chance = retrieval_from_embeddings(emb, other, captions, repeats=20)
    assert 0.0 <= chance.mean["i2t@1"] < 0.06  # chance is 1/50
    assert chance.mean["i2t@2"] >= chance.mean["i2t@1"]
    assert chance.mean["t2i@2"] < 0.12

    # Text embeddings that only know the class: with 4 distinct captions, retrieving any
    # image/caption of the right class is correct.
    classes = np.arange(n) % 4
    centres = np.eye(d)[:4]
    dup = retrieval_from_embeddings(centres[classes] + 0.01 * emb, centres[classes],
                                    [f"class {c}" for c in classes])
    assert dup.mean["i2t@1"] == 1.0 and dup.mean["t2i@1"] == 1.0


def test_retrieval_batches_follow_the_protocol():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((120, 8))
    res = retrieval_from_embeddings(emb, emb, [str(i) for i in range(120)], batch_size=50)
    assert res.n_pairs == 120 and res.batch_size == 50  # 2 full batches per repeat
    small = retrieval_from_embeddings(emb[:10], emb[:10], [str(i) for i in range(10)])
    assert small.batch_size == 10
    with pytest.raises(InputError):
        retrieval_from_embeddings(emb[:1], emb[:1], ["x"])


# --------------------------------------------------------------------------- toy fine-tuning

# Captions in words the toy CLIP was not trained on: it tells the shapes apart in its image
# embeddings but not in these captions; fine-tuning must connect the two.
CAPTIONS = {"disk": "an xray image with a round tumor", "square": "an xray image with a box shape"}


def _toy_pairs(folder, n, seed):
    """Images with one shape (disk or square outline), captioned with new words."""
    import imageio.v3 as iio
    from toy_clip import random_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,caption"]
    for i in range(n):
        kind = ("disk", "square")[i % 2]
        image, _ = random_image(rng, (kind,))
        iio.imwrite(folder / f"{i:03d}.png", image[..., 0], extension=".png")
        rows.append(f"{i:03d}.png,{CAPTIONS[kind]}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


# Paper loss and tau; a toy's learning rate. The toy's ViT blocks are frozen: with 80 pairs of
# only two kinds, training them too collapses every image onto one embedding within a few
# steps (measured: retrieval stays at chance), while the head and text tower learn at once.
FAST = dict(lr=3e-4, batch_size=16, epochs=6, weight_decay=0.0, freeze_vision_layers=4)


def test_finetuning_raises_retrieval_accuracy(toy_clip_dir, tmp_path):
    """The toy CLIP tells disks from squares in its image embeddings but cannot read the
    new captions; after fine-tuning (DHN-NCE, tau 0.6) top-1 retrieval on held-out pairs
    rises from chance or worse (measured: 0.0 image->text, 0.5 text->image) to nearly
    perfect (measured: 1.0 both ways)."""
    from napari_medclipsam.core.models import clear_model_cache, load_clip
    from napari_medclipsam.finetune.retrieval import evaluate_retrieval
    from napari_medclipsam.finetune.train import FinetuneConfig, finetune_clip

    train_csv = _toy_pairs(tmp_path / "train", 160, seed=0)
    test_pairs = clean_pairs(read_pairs(_toy_pairs(tmp_path / "test", 100, seed=1)))[0]
    source = f"local-dir:{toy_clip_dir}"
    before = evaluate_retrieval(load_clip(source, "cpu"), test_pairs)
    out = tmp_path / "tuned"
    result = finetune_clip(source, train_csv, out, FinetuneConfig(**FAST), device="cpu")
    assert result.n_train + result.n_val == 160 and result.n_val == 24
    assert len(result.history) == 6 and result.best_epoch is not None
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    clear_model_cache()
    tuned = load_clip(f"local-dir:{out}", "cpu")  # the folder is a loadable CLIP
    after = evaluate_retrieval(tuned, test_pairs)
    for name in ("i2t@1", "t2i@1"):
        assert after.mean[name] > before.mean[name] + 0.2, (name, before.mean, after.mean)
        assert after.mean[name] > 0.8, (name, after.mean)
    info = json.loads((out / "finetune.json").read_text())
    assert info["config"]["loss"] == "dhn-nce" and info["best_epoch"] == result.best_epoch
    # The source model (cached, shared with the pipeline) was not modified.
    again = evaluate_retrieval(load_clip(source, "cpu"), test_pairs)
    assert again.mean == before.mean


def test_refuses_to_overwrite_resumes_and_cancels(tiny_clip_dir, tmp_path):
    import torch

    from napari_medclipsam.finetune.train import LAST_CHECKPOINT, FinetuneConfig, finetune_clip

    csv = _toy_pairs(tmp_path / "data", 24, seed=3)
    source = f"local-dir:{tiny_clip_dir}"
    out = tmp_path / "out"
    cfg = FinetuneConfig(**{**FAST, "epochs": 1, "batch_size": 8})
    finetune_clip(source, csv, out, cfg, device="cpu")
    weights = (out / "open_clip_pytorch_model.bin").read_bytes()
    with pytest.raises(InputError, match="already holds"):
        finetune_clip(source, csv, out, cfg, device="cpu")
    assert (out / "open_clip_pytorch_model.bin").read_bytes() == weights

    # Resume to 2 epochs: continues from epoch 1, history grows.
    res = finetune_clip(source, csv, out, FinetuneConfig(**{**FAST, "epochs": 2,
                                                            "batch_size": 8}),
                        device="cpu", resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2]
    state = torch.load(out / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    with pytest.raises(InputError, match="other parameters"):
        finetune_clip(source, csv, out, FinetuneConfig(**{**FAST, "epochs": 3, "lr": 0.1,
                                                          "batch_size": 8}),
                      device="cpu", resume=True)

    # Cancelled in epoch 1 of a new output: nothing appears, nothing is left beside it.
    calls = []
    with pytest.raises(CancelledError, match="nothing was saved"):
        finetune_clip(source, csv, tmp_path / "cancelled", cfg, device="cpu",
                      should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert not (tmp_path / "cancelled").exists()
    assert not [p.name for p in tmp_path.iterdir() if "finetune-" in p.name]

    # Cancelled in epoch 2: the folder holds epoch 1 (published after it), and resumes.
    calls.clear()
    two = FinetuneConfig(**{**FAST, "epochs": 2, "batch_size": 8})
    with pytest.raises(CancelledError, match="after epoch 1 is saved .*resume"):
        finetune_clip(source, csv, tmp_path / "half", two, device="cpu",
                      should_stop=lambda: calls.append(1) or len(calls) > 2)
    info = json.loads((tmp_path / "half" / "finetune.json").read_text())
    assert info["epochs_done"] == 1 and info["complete"] is False
    res = finetune_clip(source, csv, tmp_path / "half", two, device="cpu", resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2]

    # Cancelled --overwrite: the earlier model stays byte-identical.
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls.clear()
    with pytest.raises(CancelledError, match="keeps the earlier model"):
        finetune_clip(source, csv, out, cfg, device="cpu", overwrite=True,
                      should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if "finetune-" in p.name]


def test_overwrite_swaps_in_the_new_model_and_keeps_the_users_files(tiny_clip_dir, tmp_path):
    import torch

    from napari_medclipsam.finetune.train import FinetuneConfig, finetune_clip

    csv = _toy_pairs(tmp_path / "data", 24, seed=6)
    source = f"local-dir:{tiny_clip_dir}"
    out = tmp_path / "out"
    finetune_clip(source, csv, out, FinetuneConfig(**{**FAST, "epochs": 1, "batch_size": 8}),
                  device="cpu")
    (out / "retrieval.json").write_text('{"mine": 1}')  # the user's file in the output
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("keep me")
    old = (out / "open_clip_pytorch_model.bin").read_bytes()
    res = finetune_clip(source, csv, out, FinetuneConfig(**{**FAST, "epochs": 1,
                                                            "batch_size": 8, "lr": 1e-3}),
                        device="cpu", overwrite=True)
    assert res.out_dir == out and (out / "open_clip_pytorch_model.bin").read_bytes() != old
    assert json.loads((out / "finetune.json").read_text())["config"]["lr"] == 1e-3
    assert (out / "retrieval.json").read_text() == '{"mine": 1}'
    assert (out / "notes" / "a.txt").read_text() == "keep me"
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["lr"] == 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]

    # An empty folder is a new output: it is replaced by the finished first epoch.
    (tmp_path / "empty").mkdir()
    finetune_clip(source, csv, tmp_path / "empty", FinetuneConfig(**{**FAST, "epochs": 1,
                                                                      "batch_size": 8}),
                  device="cpu")
    assert (tmp_path / "empty" / "open_clip_pytorch_model.bin").is_file()


def test_freezing_layers_keeps_them_unchanged(tiny_clip_dir, tmp_path):
    import torch

    from napari_medclipsam.finetune.train import FinetuneConfig, finetune_clip

    csv = _toy_pairs(tmp_path / "data", 24, seed=4)
    out = tmp_path / "out"
    finetune_clip(f"local-dir:{tiny_clip_dir}", csv, out,
                  FinetuneConfig(**{**FAST, "epochs": 1, "batch_size": 8,
                                    "freeze_vision_layers": 2, "freeze_text_layers": 1}),
                  device="cpu")
    before = torch.load(tiny_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    after = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    for key in before:
        frozen = (key.startswith(("visual.trunk.blocks.0.", "visual.trunk.blocks.1.",
                                  "visual.trunk.patch_embed", "visual.trunk.cls_token",
                                  "visual.trunk.pos_embed", "text.transformer.embeddings",
                                  "text.transformer.encoder.layer.0."))
                  or key == "logit_scale")
        changed = not torch.equal(before[key], after[key])
        if frozen:
            assert not changed, key
    assert not torch.equal(before["visual.trunk.blocks.3.mlp.fc1.weight"],
                           after["visual.trunk.blocks.3.mlp.fc1.weight"])
    with pytest.raises(InputError, match="freeze_vision_layers is 9"):
        finetune_clip(f"local-dir:{tiny_clip_dir}", csv, tmp_path / "x",
                      FinetuneConfig(freeze_vision_layers=9), device="cpu")


def test_cli_finetune_then_eval_retrieval(tiny_clip_dir, tmp_path, capsys):
    from napari_medclipsam.cli import main

    csv = _toy_pairs(tmp_path / "data", 24, seed=5)
    out = tmp_path / "model"
    code = main(["finetune-clip", str(csv), "-o", str(out), "--clip-model",
                 f"local-dir:{tiny_clip_dir}", "--device", "cpu", "--epochs", "1",
                 "--batch-size", "8", "--lr", "1e-4"])
    assert code == 0
    assert f"local-dir:{out}" in capsys.readouterr().out
    res_json = tmp_path / "retrieval.json"
    code = main(["eval-retrieval", str(csv), "--clip-model", f"local-dir:{out}", "--device",
                 "cpu", "--repeats", "2", "-o", str(res_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "image->text top-1" in printed and "text->image top-2" in printed
    saved = json.loads(res_json.read_text())
    assert saved["repeats"] == 2 and saved["n_pairs"] == 24 and saved["batch_size"] == 24
    assert main(["finetune-clip", str(csv), "-o", str(out), "--clip-model",
                 f"local-dir:{tiny_clip_dir}", "--batch-size", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "medclipsam finetune-clip: error: --batch-size must be at least 2 (contrastive "
        "learning needs pairs to compare); got 1.")
