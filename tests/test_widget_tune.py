"""Tune on my corrections, in the "Text-prompt segmentation" dock opened from the Plugins menu:
the exported nnU-Net dataset chosen in the folder dialog (the training dock's dataset by
default), only its cases marked corrected used, the calibration in a worker (progress, Cancel),
the tuned settings applied to the fields (Undo tuning puts the previous ones back), the preset
and its report written beside the dataset and never over an earlier one, and the result line.

The corrections are made by construction: the chain itself at known settings that are not the
dock's (top-2 regions, one box per region; the dock's are top-1, one box), on 64x64 images with
three bright disks, with the tiny random-weight models (test_calibrate's known-by-construction
set-up). The uncorrected cases hold the dock's own zero-shot masks: if they were used, the
defaults would look better than they are.

Needs a display with OpenGL (pytest-xvfb, or ``xvfb-run -a``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)

from napari_helpers import SEGMENT, TRAINING, dock  # noqa: E402

from napari_medclipsam._widgets.segment_controller import TUNED_FOLDER  # noqa: E402
from napari_medclipsam._widgets.segment_widget import combo_value  # noqa: E402
from napari_medclipsam.core.config import PipelineConfig  # noqa: E402

PROMPT = "a disk"
DATASET_ID = 7
#: the result line under the button
LINE = re.compile(r"^Tuned on (\d+) corrected cases: cross-validated Dice (\d\.\d+) -> "
                  r"(\d\.\d+) \(defaults -> tuned, (\d+) folds\)\.$")


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


def _star(config: PipelineConfig) -> PipelineConfig:
    """The settings the corrections are made with: top-2 regions, one box per region."""
    r = dataclasses.replace
    return r(config, coarse=r(config.coarse, top_k=2),
             prompts=r(config.prompts, box_mode="per_component"),
             faithfulness=r(config.faithfulness, enabled=False))


def _images(n: int, seed: int = 1) -> list[np.ndarray]:
    from tiny_pipeline import disk_images

    return disk_images(n, seed)


def _export(pipeline, raw, n: int, corrected: int, star: bool = True, **kwargs):
    """An exported dataset as the training dock writes it: the first ``corrected`` cases
    corrected (the chain at :func:`_star`'s settings; the dock's own without ``star``), the
    rest the dock's zero-shot masks."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline
    from napari_medclipsam.nnunet.export import ExportCase, export_dataset

    settings = _star(pipeline.config) if star else dataclasses.replace(
        pipeline.config, faithfulness=dataclasses.replace(pipeline.config.faithfulness,
                                                          enabled=False))
    star = ZeroShotPipeline(settings, clip=pipeline.clip, sam=pipeline.sam)
    plain = ZeroShotPipeline(dataclasses.replace(pipeline.config, faithfulness=dataclasses
                                                 .replace(pipeline.config.faithfulness,
                                                          enabled=False)),
                             clip=pipeline.clip, sam=pipeline.sam)
    cases = []
    for i, image in enumerate(_images(n)):
        fixed = i < corrected
        mask = (star if fixed else plain).segment(image, PROMPT).mask
        cases.append(ExportCase(f"case{i}", image, mask.astype(np.uint8), corrected=fixed,
                                source=f"scan{i}"))
    return export_dataset(cases, raw, DATASET_ID, "Disks", verify=False, **kwargs).folder


@pytest.fixture
def dialog(monkeypatch):
    """The folder dialog of Tune on my corrections: answers ``dialog.answer``, and records
    the folder it opened at."""
    from qtpy.QtWidgets import QFileDialog

    class Dialog:
        answer = ""
        opened_at: list[str] = []

    def choose(parent, caption, start="", *args, **kwargs):
        Dialog.opened_at.append(start)
        return Dialog.answer

    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(choose))
    Dialog.opened_at = []
    return Dialog


@pytest.fixture
def workers(monkeypatch):
    """Every worker the segment dock starts (the functions), still started."""
    from napari_medclipsam._widgets import segment_widget

    started = []
    original = segment_widget.start_worker

    def record(func, *args, **kwargs):
        started.append(getattr(func, "__name__", str(func)))
        return original(func, *args, **kwargs)

    monkeypatch.setattr(segment_widget, "start_worker", record)
    return started


def _dock(viewer, pipeline):
    """Plugins > Text-prompt segmentation, then (tests only) the tiny models."""
    w = dock(viewer, SEGMENT)
    w.set_pipeline(pipeline)
    w.prompt_edit.setPlainText(PROMPT)
    return w


def _tune(w, dialog, folder) -> None:
    """Tune on my corrections..., ``folder`` chosen in the dialog."""
    dialog.answer = str(folder)
    w.tune_button.click()


def _settings(w) -> tuple:
    return (w.topk_spin.value(), combo_value(w.box_mode_combo), w.layer_spin.value(),
            w.beta_spin.value(), combo_value(w.method_combo))


def test_tune_uses_the_corrected_cases_and_applies_the_tuned_settings(
        make_napari_viewer, tiny_pipeline, qtbot, tmp_path, dialog, workers):
    dataset = _export(tiny_pipeline, tmp_path / "raw", 6, corrected=4)
    w = _dock(make_napari_viewer(), tiny_pipeline)
    before = _settings(w)
    assert before[:2] == (1, "single")                       # not the corrections' settings
    w.tune_folds_spin.setValue(2)
    assert combo_value(w.tune_grid_combo) == "small"         # the quick grid by default
    _tune(w, dialog, dataset)
    assert w.running and not w.tune_button.isEnabled() and w.cancel_button.isEnabled()
    assert "on 4 corrected cases of Dataset007_Disks" in w.last_status, w.last_status
    assert "2 uncorrected cases not used" in w.last_status
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    assert workers == ["tune"]
    tuning = w.last_tuning
    assert tuning is not None, w.last_status

    # only the corrected cases, the dataset's files, the report beside it
    folder = dataset / TUNED_FOLDER
    preset = folder / "preset.json"
    assert tuning.paths["preset"] == preset
    assert sorted(p.name for p in folder.iterdir()) == [
        "preset.folds.csv", "preset.folds.png", "preset.json", "preset.report.json",
        "preset.table.csv"]
    data = json.loads(preset.read_text())
    record = data["calibration"]
    assert sorted(record["cases"]) == ["case0", "case1", "case2", "case3"]
    assert record["tuned_on"] == 4 and record["folds"] == 2
    assert data["prompt"] == [PROMPT]
    # the grid's layers 7 and 9 of BiomedCLIP's 12 blocks are 2 and 3 of the tiny ViT's 4
    assert record["grid"]["layers"] == [2, 3] and record["grid"]["top_ks"] == [1, 2]

    # the dock's settings are the tuned preset's: the corrections' top-2, one box per region
    tuned = PipelineConfig.from_dict(data["config"])
    assert (tuned.coarse.top_k, tuned.prompts.box_mode) == (2, "per_component")
    assert _settings(w)[:2] == (2, "per_component")
    config = PipelineConfig.from_dict(w.run_state()["config"])
    for stage in ("saliency", "coarse", "prompts", "sam"):
        assert getattr(config, stage) == getattr(tuned, stage), stage
    assert w.prompt_edit.toPlainText() == PROMPT
    assert "preset: tuned on 4 corrected cases (preset.json)" in w.settings_label.text()

    # the result line: the cross-validated Dice, defaults -> tuned, as the report has it
    lines = w.tune_label.text().splitlines()
    match = LINE.match(lines[0])
    assert match, lines[0]
    cv = record["cross_validated"]
    assert match.group(1) == "4" and match.group(4) == "2"
    assert float(match.group(2)) == pytest.approx(cv["default_dice"], abs=0.006)
    assert float(match.group(3)) == pytest.approx(cv["tuned_dice"], abs=0.006)
    assert cv["tuned_dice"] >= cv["default_dice"]
    assert any(str(folder) in line and "preset.folds.png" in line for line in lines)
    assert "Not used: 2 uncorrected." in lines
    assert not w.tune_label.isHidden()
    assert w.tune_warning_label.text() == (record["warning"] or "")
    assert w.tune_warning_label.isHidden() == (record["warning"] is None)
    # measured: 0.966 -> 1.000, a gain within the noise of 2 folds: applied, and warned
    assert tuning.beats_defaults and "within the folds' noise" in w.tune_warning_label.text()
    assert any(u.unit == "cases" and u.slice_count == 4 for u in w.progress_log)
    assert w.last_status.startswith(lines[0][:-1])
    assert w.progress_bar.value() == 100 and not w.undo_tune_button.isHidden()

    # Undo tuning puts the settings back; the preset stays on disk
    w.undo_tune_button.click()
    assert _settings(w) == before and w.undo_tune_button.isHidden()
    assert "Settings before the tuning put back" in w.last_status and preset.is_file()

    # a second tuning never overwrites the first: it is numbered
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    w.tune_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    assert w.last_tuning is not tuning and w.last_tuning.paths["preset"].name == "preset_2.json"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in first} == first
    assert (folder / "preset_2.json").is_file() and (folder / "preset_2.folds.png").is_file()
    assert "(preset_2.json)" in w.settings_label.text()


def test_too_few_corrected_cases_is_one_line_and_starts_nothing(
        make_napari_viewer, tiny_pipeline, tmp_path, dialog, workers):
    """The training dock's dataset is where the dialog opens; 3 corrected cases are too few
    for 5 folds: one line saying what is needed and what to do, no worker, nothing written."""
    raw = tmp_path / "raw"
    dataset = _export(tiny_pipeline, raw, 6, corrected=3)
    viewer = make_napari_viewer()
    training = dock(viewer, TRAINING)
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir(exist_ok=True)
        training.folder_edits[key].setText(str(tmp_path / key))
    training.dataset_spin.setValue(DATASET_ID)
    w = _dock(viewer, tiny_pipeline)
    before = _settings(w)
    _tune(w, dialog, dataset)
    assert [Path(p).resolve() for p in dialog.opened_at] == [dataset.resolve()]  # training's
    assert w.last_status == (
        "Tuning needs at least 5 corrected cases for 5-fold cross-validation; found 3 in "
        "Dataset007_Disks (3 uncorrected not used). Export more cases with 'corrected by "
        "hand' checked (Pseudo-labels & training dock), or set Folds to 3.")
    assert workers == [] and not w.running and w.run_button.isEnabled()
    assert not (dataset / TUNED_FOLDER).exists() and _settings(w) == before
    assert w.last_tuning is None and w.tune_label.isHidden()

    # the last dataset is remembered for the next time (the training dock closed)
    viewer.window.remove_dock_widget(training)
    _tune(w, dialog, "")                                     # the dialog cancelled
    assert dialog.opened_at[-1] == str(dataset) and workers == []


def test_wrong_folders_and_prompts_are_one_line(make_napari_viewer, tiny_pipeline, tmp_path,
                                                dialog, workers):
    """Not a dataset, no prompt, a label map of several targets whose names the prompt does
    not give, Method SaLIP: each one line in the status, no worker."""
    from napari_medclipsam.nnunet.export import ExportCase, export_dataset

    w = _dock(make_napari_viewer(), tiny_pipeline)
    plain = tmp_path / "plain"
    plain.mkdir()
    _tune(w, dialog, plain)
    assert w.last_status == (f"{plain}: no dataset.json; give an nnU-Net raw dataset folder "
                             "(RAW/Dataset001_NAME).")
    two = []
    for i, image in enumerate(_images(5)):
        labels = np.zeros((64, 64), np.uint8)
        labels[5:20, 5:20], labels[30:50, 30:50] = 1, 2
        two.append(ExportCase(f"case{i}", image, labels, corrected=True))
    table = {"a square": 1, "a ring": 2}
    dataset = export_dataset(two, tmp_path / "raw", 3, "Two", label_table=table,
                             verify=False).folder
    _tune(w, dialog, dataset)
    assert w.last_status == (
        "Dataset003_Two holds 2 labels ('a square', 'a ring') and none is named like the "
        "prompt 'a disk': type the prompt of the target to tune (its label's name, e.g. "
        "'a square').")
    # the label named like the prompt is the one tuned on (planned; not run here)
    plan = w.controller.plan_tuning(dataset, ["a ring"], grid="small", folds=5)
    assert (plan.label, plan.label_name, len(plan.files)) == (2, "a ring", 5)
    w.prompt_edit.setPlainText("")
    _tune(w, dialog, dataset)
    assert w.last_status.startswith("Type a prompt first")
    w.prompt_edit.setPlainText(PROMPT)
    w.chain_combo.setCurrentIndex(w.chain_combo.findData("salip"))
    _tune(w, dialog, dataset)
    assert w.last_status.startswith("Tuning tunes the MedCLIP-SAMv2 chain")
    assert workers == [] and "\n" not in w.last_status


def test_cancel_changes_nothing(make_napari_viewer, tiny_pipeline, qtbot, tmp_path, dialog):
    dataset = _export(tiny_pipeline, tmp_path / "raw", 4, corrected=4)
    w = _dock(make_napari_viewer(), tiny_pipeline)
    before = _settings(w)
    w.tune_folds_spin.setValue(2)
    _tune(w, dialog, dataset)
    assert w.running
    w.cancel_button.click()
    assert "Cancelling the tuning" in w.last_status
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    assert w.last_status == "Tuning cancelled; nothing changed."
    assert w.progress_bar.format() == "cancelled"
    assert _settings(w) == before and w.last_tuning is None and w.undo_tune_button.isHidden()
    assert not (dataset / TUNED_FOLDER).exists()
    assert w.run_button.isEnabled() and w.tune_button.isEnabled()


def test_settings_that_do_not_beat_the_current_ones_are_not_applied(
        make_napari_viewer, tiny_pipeline, qtbot, tmp_path, dialog):
    """Corrections made with the dock's own settings: nothing beats them on held-out cases,
    so the tuning keeps them, says so (the calibration's warning in orange) and still writes
    the preset and its report."""
    dataset = _export(tiny_pipeline, tmp_path / "raw", 4, corrected=4, star=False)
    w = _dock(make_napari_viewer(), tiny_pipeline)
    before = _settings(w)
    w.tune_folds_spin.setValue(2)
    _tune(w, dialog, dataset)
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    tuning = w.last_tuning
    assert tuning is not None and not tuning.beats_defaults, w.last_status
    assert _settings(w) == before and w.undo_tune_button.isHidden()
    assert "the current settings are kept" in w.last_status
    assert LINE.match(w.tune_label.text().splitlines()[0])
    assert "did not beat the defaults" in w.tune_warning_label.text()
    assert not w.tune_warning_label.isHidden()
    assert (dataset / TUNED_FOLDER / "preset.json").is_file()
