"""Model loaders: local folders, hash/offline errors, weights_only, caching (no network)."""

import time

import pytest
import torch

from napari_medclipsam.core import models
from napari_medclipsam.core.models import (
    ModelUnavailableError,
    clear_model_cache,
    load_clip,
    load_sam,
    resolve_device,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "cache"))
    clear_model_cache()
    yield
    clear_model_cache()


def test_local_dir_clip_loads_frozen_and_is_cached(tiny_clip_dir):
    a = load_clip(f"local-dir:{tiny_clip_dir}", "cpu")
    b = load_clip(f"local-dir:{tiny_clip_dir}", "cpu")
    assert a is b
    assert not a.model.training
    assert not any(p.requires_grad for p in a.model.parameters())
    assert a.image_size == 64 and len(a.weights_sha256) == 64
    tokens = a.tokenizer(["a disk"])
    assert tokens.shape == (1, 16)
    assert a.model.encode_text(tokens).shape == (1, 32)


def test_checkpoint_file_beside_config_loads_those_weights(tiny_clip_dir, tmp_path):
    import shutil

    folder = tmp_path / "ft"
    shutil.copytree(tiny_clip_dir, folder)
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    key = next(k for k in state if k.endswith("head.proj.weight"))
    state[key] = torch.zeros_like(state[key])
    torch.save(state, folder / "finetuned.pt")
    bundle = load_clip(str(folder / "finetuned.pt"), "cpu")
    assert torch.count_nonzero(bundle.model.state_dict()[key]) == 0


def test_hub_model_offline_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_clip("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "cpu")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "local-dir:" in message and "download" in message and "MEDCLIPSAM_HOME" in message


def test_clip_errors_name_the_problem(tmp_path, tiny_clip_dir):
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_clip(f"local-dir:{tmp_path / 'missing'}", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailableError, match="open_clip_config.json"):
        load_clip(f"local-dir:{empty}", "cpu")
    with pytest.raises(ModelUnavailableError, match="hf-hub:ORG/NAME"):
        load_clip("bert-base", "cpu")


def test_sam_loads_with_weights_only_and_is_cached(tiny_sam_checkpoint):
    from tiny_sam import build_tiny_sam

    a = load_sam("vit_b", tiny_sam_checkpoint, "cpu", builder=build_tiny_sam)
    b = load_sam("vit_b", tiny_sam_checkpoint, "cpu", builder=build_tiny_sam)
    assert a is b and a.checkpoint_sha256 and not a.model.training
    ref = torch.load(tiny_sam_checkpoint, weights_only=True)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, ref[k])


class Payload:
    """A pickled object: weights_only loading must refuse it."""


def test_sam_refuses_pickled_objects_and_wrong_architectures(tmp_path, tiny_sam_checkpoint):
    from tiny_sam import build_tiny_sam

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(ModelUnavailableError, match="holds Python objects, not only tensors"):
        load_sam("vit_b", str(evil), "cpu", builder=build_tiny_sam)
    with pytest.raises(ModelUnavailableError, match="medsam"):
        load_sam("vit_b", tiny_sam_checkpoint, "cpu",
                 builder=lambda: build_tiny_sam(img_size=32))
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_sam("vit_b", str(tmp_path / "none.pth"), "cpu")


def test_sam_download_failure_is_actionable(monkeypatch):
    spec = dict(models.SAM_CHECKPOINTS["vit_b"], url="http://127.0.0.1:9/sam_vit_b.pth")
    monkeypatch.setitem(models.SAM_CHECKPOINTS, "vit_b", spec)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="--sam-checkpoint"):
        load_sam("vit_b", None, "cpu")
    assert time.perf_counter() - start < 30


def test_unknown_sam_and_device():
    with pytest.raises(ValueError, match="vit_b"):
        models.build_sam("vit_x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda", "mps")


def test_every_missing_model_is_reported_at_once_before_any_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = []
    monkeypatch.setattr(models, "_build_clip", lambda *a, **k: built.append(a))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        models.check_model_sources(
            clip_model="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            sam_model="vit_b", sam_checkpoint=str(tmp_path / "sam_missing.pth"), device="tpu")
    assert time.perf_counter() - start < 10 and not built
    message = str(err.value)
    assert message.startswith("3 problem(s) with the models; nothing was computed:")
    assert "Unknown device 'tpu'" in message
    assert "CLIP: Could not download" in message and "local-dir:" in message
    assert f"SAM: SAM checkpoint not found: {tmp_path / 'sam_missing.pth'}" in message


def test_complete_sources_pass_the_check(tiny_clip_dir, tiny_sam_checkpoint):
    models.check_model_sources(f"local-dir:{tiny_clip_dir}", "vit_b", str(tiny_sam_checkpoint),
                               "cpu")


def test_clip_without_vocabulary_is_refused(tmp_path, tiny_clip_dir):
    import shutil

    broken = tmp_path / "clip_no_vocab"
    shutil.copytree(tiny_clip_dir, broken)
    for vocab in broken.rglob("vocab.txt"):
        vocab.unlink()
    with pytest.raises(ModelUnavailableError, match=r"no tokenizer vocabulary.*\[UNK\]"):
        models.check_model_sources(clip_model=f"local-dir:{broken}")
    with pytest.raises(ModelUnavailableError, match="no tokenizer vocabulary"):
        load_clip(f"local-dir:{broken}", "cpu")


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_unsafe_or_damaged_weights_are_one_clear_line(tmp_path, tiny_clip_dir,
                                                      tiny_sam_checkpoint, damage, capsys):
    import shutil

    from tiny_sam import build_tiny_sam

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    weights = models._find_weights(clip)
    sam = tmp_path / "sam.pth"
    if damage == "pickle":
        for path in (weights, sam):
            torch.save({"model": Payload()}, path)
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
        sam.write_bytes(tiny_sam_checkpoint.read_bytes()[:1000])
    expected = ("was not loaded: its weights file holds Python objects" if damage == "pickle"
                else "could not be loaded: its weights file is damaged, truncated")
    with pytest.raises(ModelUnavailableError) as clip_err:
        load_clip(f"local-dir:{clip}", "cpu")
    with pytest.raises(ModelUnavailableError) as sam_err:
        load_sam("vit_b", str(sam), "cpu", builder=build_tiny_sam)
    for err, what in ((clip_err, f"The CLIP model local-dir:{clip}"),
                      (sam_err, f"The SAM checkpoint {sam}")):
        message = str(err.value)
        assert message.startswith(f"{what} {expected}") and "\n" not in message
        assert "weights_only" not in message and "payload ran" not in capsys.readouterr().out


# --------------------------------------------------------------------------- SAM 2.1


def test_sam2_loads_from_a_released_style_checkpoint(tiny_sam2_checkpoint):
    from tiny_sam2 import build_tiny_sam2

    bundle = load_sam("sam2_t", str(tiny_sam2_checkpoint), "cpu",
                      builder=lambda: build_tiny_sam2(seed=7))  # other random weights
    assert bundle.family == "sam2" and bundle.name == "sam2_t"
    assert bundle.model_id.startswith("sam2_t@") and len(bundle.checkpoint_sha256) == 64
    assert not bundle.model.training
    assert not any(p.requires_grad for p in bundle.model.parameters())
    state = torch.load(tiny_sam2_checkpoint, map_location="cpu", weights_only=True)["model"]
    loaded = bundle.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert load_sam("sam2_t", str(tiny_sam2_checkpoint), "cpu",
                    builder=lambda: build_tiny_sam2(seed=7)) is bundle  # cached
    # "auto" on a CPU is SAM 2.1 tiny.
    auto = load_sam("auto", str(tiny_sam2_checkpoint), "cpu", builder=build_tiny_sam2)
    assert auto.name == "sam2_t" and auto.family == "sam2"


def test_sam2_refuses_pickled_objects_in_one_line(tmp_path):
    from tiny_sam2 import build_tiny_sam2

    evil = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": Payload()}, evil)
    built = []
    with pytest.raises(ModelUnavailableError) as err:
        load_sam("sam2_t", str(evil), "cpu", builder=lambda: built.append(1) or build_tiny_sam2())
    message = str(err.value)
    assert message == (f"The SAM checkpoint {evil} was not loaded: its weights file holds "
                       "Python objects, not only tensors, and such a file can run code when "
                       "it is opened. Use the model's original weights.")
    assert not built  # refused before any model was built


def test_sam1_and_sam2_checkpoints_are_not_interchangeable(tiny_sam_checkpoint,
                                                           tiny_sam2_checkpoint):
    from tiny_sam import build_tiny_sam
    from tiny_sam2 import build_tiny_sam2

    with pytest.raises(ModelUnavailableError) as err:
        load_sam("sam2_t", str(tiny_sam_checkpoint), "cpu", builder=build_tiny_sam2)
    message = str(err.value)
    assert message.startswith(f"{tiny_sam_checkpoint} is not a sam2_t checkpoint in SAM 2.1's "
                              "format")
    assert "(the file holds a SAM model; RuntimeError: " in message
    assert "'sam2_t'" in message and "--sam-model" in message and "\n" not in message
    with pytest.raises(ModelUnavailableError, match=r"is not a vit_b checkpoint in SAM's "
                                                    r"format \(the file holds a SAM 2.1 model;"
                       ) as err:
        load_sam("vit_b", str(tiny_sam2_checkpoint), "cpu", builder=build_tiny_sam)
    assert "\n" not in str(err.value)


def test_sam2_offline_check_names_the_url_and_the_flag(tmp_path, monkeypatch):
    spec = dict(models.SAM2_CHECKPOINTS["sam2_t"],
                url="http://127.0.0.1:9/sam2.1_hiera_tiny.pt")  # nothing listens: offline
    monkeypatch.setitem(models.SAM2_CHECKPOINTS, "sam2_t", spec)
    start = time.perf_counter()
    problems = models.check_sam_source("sam2_t", device="cpu")
    assert time.perf_counter() - start < 30
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("Could not download the sam2_t checkpoint from "
                              "http://127.0.0.1:9/sam2.1_hiera_tiny.pt")
    assert "--sam-checkpoint PATH" in message and str(spec["hash"]) in message
    assert str(tmp_path / "cache" / "sam2" / "sam2.1_hiera_tiny.pt") in message
    assert not (tmp_path / "cache" / "sam2" / "sam2.1_hiera_tiny.pt").exists()
    # "auto" on a CPU checks the same model; a local file needs no download.
    assert models.check_sam_source("auto", device="cpu") == problems
    local = tmp_path / "mine.pt"
    local.write_bytes(b"x")
    assert models.check_sam_source("sam2_t", str(local), device="cpu") == []
    assert models.check_sam_source("sam2_t", str(tmp_path / "none.pt"), device="cpu") == [
        f"SAM checkpoint not found: {tmp_path / 'none.pt'}."]
    assert "Unknown SAM model 'sam3'" in models.check_sam_source("sam3", device="cpu")[0]


def test_default_sam_model_per_device(monkeypatch):
    for device, expected in (("cpu", "sam2_t"), ("mps", "sam2_t"), ("cuda", "vit_h"),
                             ("cuda:1", "vit_h")):
        monkeypatch.setattr(models, "resolve_device", lambda d=None, device=device: device)
        assert models.default_sam_model() == expected
        for name in (None, "", "auto"):
            assert models.resolve_sam_model(name) == expected
        assert models.resolve_sam_model("vit_b") == "vit_b"
        assert models.resolve_sam_model("sam2_b+") == "sam2_b+"


def test_sam_registry_names_and_families():
    assert models.SAM_MODELS == ("auto", "vit_h", "vit_l", "vit_b", "medsam", "sam2_t",
                                 "sam2_s", "sam2_b+", "sam2_l", "medsam2")
    assert [models.sam_family(n) for n in models.SAM_MODELS[1:]] == ["sam"] * 4 + ["sam2"] * 5
    assert models.SamBundle(None, "sam2_l", "cpu", None, None).family == "sam2"
    assert models.SamBundle(None, "medsam", "cpu", None, None).family == "sam"
    for spec in models.SAM2_CHECKPOINTS.values():
        assert str(spec["url"]).endswith(str(spec["fname"]))
        assert str(spec["config"]).startswith("configs/sam2.1/sam2.1_hiera_")
    with pytest.raises(ValueError, match="Unknown SAM model 'sam2_x'; choose one of auto, "):
        models.resolve_sam_model("sam2_x", "cpu")
    with pytest.raises(ValueError, match="Unknown SAM 2 model 'vit_b'"):
        models.build_sam2_model("vit_b")
    with pytest.raises(ValueError, match="sam2_t"):
        load_sam("sam2_x", None, "cpu")


def test_medsam2_is_sam2_tiny_at_512_and_takes_its_weights(tmp_path):
    """MedSAM2 is built from the tiny config at 512x512 inputs; a file holding SAM 2.1 tiny's
    keys (as MedSAM2_latest.pt, a fine-tuned tiny, does) loads strictly into it."""
    import torch
    from tiny_sam2 import TINY_SAM2_OVERRIDES, build_tiny_sam2

    model = models.build_sam2_model("medsam2", TINY_SAM2_OVERRIDES[1:])
    assert model.image_size == 512
    tiny = models.build_sam2_model("sam2_t", TINY_SAM2_OVERRIDES[1:])
    assert tiny.image_size == 1024  # the override is medsam2's own, not the tests'
    assert models.build_sam2_model("medsam2", TINY_SAM2_OVERRIDES).image_size == 256
    path = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": build_tiny_sam2(3).state_dict(), "epoch": 7}, path)
    builder = lambda: models.build_sam2_model("medsam2", TINY_SAM2_OVERRIDES)  # noqa: E731
    bundle = load_sam("medsam2", str(path), "cpu", builder=builder)
    assert bundle.family == "sam2" and bundle.name == "medsam2"
    assert bundle.model_id.startswith("medsam2@")


@pytest.mark.parametrize("name", ["sam2_b+", "sam2_l", "medsam2"])
def test_unpinned_sam2_checkpoint_is_checked_against_its_first_download(tmp_path, monkeypatch,
                                                                        name):
    import pooch

    spec = models.SAM2_CHECKPOINTS[name]
    assert spec["hash"] is None  # no published hash: trust on first use
    folder = tmp_path / "cache" / "sam2"

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        assert url == spec["url"] and known_hash is None
        path.mkdir(parents=True, exist_ok=True)  # as pooch does
        target = path / fname
        target.write_bytes(b"first download")
        return str(target)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    target = models.download_sam_checkpoint(name)
    pin = folder / f"{spec['fname']}.sha256"
    assert target == folder / str(spec["fname"])
    assert pin.read_text().strip() == models.file_sha256(target)

    def no_network(**kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    assert models.download_sam_checkpoint(name) == target  # matches its pin
    target.write_bytes(b"replaced by something else")
    with pytest.raises(ModelUnavailableError, match="changed since it was downloaded") as err:
        models.download_sam_checkpoint(name)
    assert str(pin) in str(err.value) and "delete both files" in str(err.value)
    with pytest.raises(ModelUnavailableError, match="changed since it was downloaded"):
        load_sam(name, None, "cpu")
