"""The prompt-faithfulness check in the "Text-prompt segmentation" dock, opened from the
Plugins menu: its score under the status line (a single image, and summarised over the
slices of All slices), an orange warning and a napari notification when the text does not
steer, the Advanced fields that set it (on/off, neutral prompt, contrast prompts, the
correlation to warn at), saved and loaded with the other settings.

Two models: the toy CLIP that knows "a disk" and "a square" (its maps follow the text, so
the check passes), and the tiny random-weight CLIP, whose maps ignore the text (r = 1.00 with
any neutral prompt). A "not steered" case is forced honestly by making the neutral prompt the
prompt itself: the two maps are then the same map.

Needs a display with OpenGL (pytest-xvfb, or ``xvfb-run -a``).
"""

import dataclasses
import html
import json
import re

import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)

from napari_helpers import SEGMENT, dock  # noqa: E402

from napari_medclipsam._widgets.segment_controller import describe_settings  # noqa: E402
from napari_medclipsam.core.config import FaithfulnessConfig, PipelineConfig  # noqa: E402

PROMPT = "a disk"
#: the score line of a single image: score, r with the neutral prompt, then the parts
IMAGE_LINE = re.compile(r"^Faithfulness (-?\d\.\d\d) \(r = (-?\d\.\d\d) vs (.+?)(?:; (.*))?\)$")
VOLUME_LINE = re.compile(r"^Faithfulness (-?\d\.\d\d) \(mean r = (-?\d\.\d\d) vs (.+?) over "
                         r"(\d+) slices\); (.*)$")


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def warnings_seen():
    """Every napari warning notification dispatched during the test (the messages)."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    seen: list[str] = []

    def collect(notification):
        if notification.severity == NotificationSeverity.WARNING:
            seen.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    yield seen
    notification_manager.notification_ready.disconnect(collect)


@pytest.fixture
def toy_pipeline(toy_clip_dir, tiny_sam_checkpoint):
    """The toy shapes CLIP (its maps follow "a disk" and "a square" at block 1, beta 1, 20
    steps, as in test_faithfulness) with the tiny SAM."""
    from tiny_clip import register_tiny_vit
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core.config import SaliencyConfig
    from napari_medclipsam.core.models import clear_model_cache, load_clip, load_sam
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    register_tiny_vit()
    clear_model_cache()
    config = PipelineConfig(clip_model=f"local-dir:{toy_clip_dir}", device="cpu",
                            precision="fp32", sam_model="vit_b",
                            sam_checkpoint=str(tiny_sam_checkpoint),
                            saliency=SaliencyConfig(layer=1, beta=1.0, steps=20))
    yield ZeroShotPipeline(config, clip=load_clip(config.clip_model, "cpu"),
                           sam=load_sam("vit_b", tiny_sam_checkpoint, "cpu",
                                        builder=lambda: tiny_builder("vit_b")))
    clear_model_cache()


def _image(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[12:30, 18:42] = 220
    return img


def _toy_images(n, seed=11):
    """Images holding a disk and a square (test_faithfulness's seed): HxW uint8."""
    from toy_clip import random_image

    rng = np.random.default_rng(seed)
    return [random_image(rng, ("disk", "square"))[0][..., 0] for _ in range(n)]


def _dock(viewer, pipeline=None):
    """Plugins > Text-prompt segmentation, then (tests only) the models given."""
    w = dock(viewer, SEGMENT)
    if pipeline is not None:
        w.set_pipeline(pipeline)
    return w


def _run(w, qtbot, prompt=PROMPT):
    w.prompt_edit.setPlainText(prompt)
    w.run_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=180_000)


def _choose(combo, value):
    index = combo.findData(value)
    assert index >= 0, value
    combo.setCurrentIndex(index)


def _shown(w) -> str:
    """The faithfulness line as the dock shows it, as plain text with the warning on a line
    of its own ("" when hidden)."""
    from qtpy.QtCore import Qt

    if not w.faithfulness_row.isVisibleTo(w):
        return ""
    label = w.faithfulness_label
    if label.textFormat() != Qt.RichText:
        return label.text()
    return html.unescape(re.sub(r"<[^>]+>", "", label.text().replace("<br>", "\n")))


def _warned(w) -> bool:
    """The warning look: the icon beside the line and orange text."""
    return (w.faithfulness_icon.isVisibleTo(w)
            and "#f08c00" in w.faithfulness_label.styleSheet())


def _image_numbers(line: str):
    match = IMAGE_LINE.match(line)
    assert match is not None, line
    score, r, neutral, rest = match.groups()
    return float(score), float(r), neutral, (rest or "").split("; ") if rest else []


def test_the_score_is_shown_when_the_text_steers(make_napari_viewer, toy_pipeline, qtbot,
                                                 warnings_seen):
    """The toy CLIP and "a square": its map differs from "an image"'s and from the
    contrast prompt "a disk"'s. The dock shows the result's own numbers, no warning; All
    slices shows the mean over the slices and that none was flagged."""
    images = _toy_images(2)
    viewer = make_napari_viewer()
    viewer.add_image(images[0], name="shapes")
    w = _dock(viewer, toy_pipeline)
    assert w.faithfulness_check.isChecked() and w.neutral_edit.text() == "an image"
    assert not w.faithfulness_row.isVisibleTo(w)  # nothing before a run
    w.contrast_edit.setText("a disk")
    assert "faithfulness 1 contrast" in w.settings_label.text()
    _run(w, qtbot, "a square")
    run = w.controller.state.run
    f = run.result.faithfulness
    assert f is not None and f.steers, (f, w.last_status)
    assert w.last_status.startswith("Done in")
    line = _shown(w)
    score, r, neutral, parts = _image_numbers(line)
    assert score == pytest.approx(f.score, abs=0.005)
    assert r == pytest.approx(f.correlation, abs=0.005)
    assert neutral == "'an image'" and f.neutral_prompt == "an image"
    contrast = [p for p in parts if p.endswith("vs 'a disk'")]
    assert len(contrast) == 1 and dict(f.contrasts).keys() == {"a disk"}
    assert float(contrast[0].split()[2]) == pytest.approx(dict(f.contrasts)["a disk"],
                                                          abs=0.005)
    if f.neutral_overlap is not None:
        assert f"{f.neutral_overlap:.0%} of the mask also neutral" in parts
    assert "\n" not in line and not _warned(w) and not warnings_seen
    assert w.last_faithfulness.score == pytest.approx(f.score)
    stages = [u.stage for u in w.progress_log]
    assert "saliency step 20/20" in stages and "faithfulness check step 40/40" in stages

    # All slices: every slice checked, the dock shows the mean over them
    viewer.layers.clear()
    viewer.add_image(np.stack(images), name="stack")
    w.image_combo.setCurrentText("stack")
    w.all_slices_check.setChecked(True)
    _run(w, qtbot, "a square")
    run = w.controller.state.run
    assert run.volume is not None and sorted(run.slice_faithfulness) == [0, 1], w.last_status
    checks = list(run.slice_faithfulness.values())
    assert all(c.steers for c in checks), checks
    match = VOLUME_LINE.match(_shown(w))
    assert match is not None, _shown(w)
    mean_r = np.mean([c.correlation for c in checks])
    assert float(match.group(1)) == pytest.approx(1 - mean_r, abs=0.005)
    assert float(match.group(2)) == pytest.approx(mean_r, abs=0.005)
    assert match.group(3) == "'an image'" and match.group(4) == "2"
    assert match.group(5) == "none flagged"
    assert not _warned(w) and not warnings_seen


def test_a_map_like_the_neutral_one_is_warned_about_and_the_check_switches_off(
        make_napari_viewer, tiny_pipeline, qtbot, warnings_seen):
    """The neutral prompt set to the prompt: the same map (r = 1.00), so the dock warns,
    in orange beside an icon, and as a notification. Switched off in Advanced: no check, no
    line, no warning, no faithfulness steps."""
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer, tiny_pipeline)
    w.neutral_edit.setText(PROMPT)
    assert f"faithfulness vs '{PROMPT}'" in w.settings_label.text()
    _run(w, qtbot)
    run = w.controller.state.run
    f = run.result.faithfulness
    assert f is not None and f.neutral_prompt == PROMPT
    assert f.correlation == pytest.approx(1.0) and not f.steers
    assert w.last_status.startswith("Done in")  # the run's own status is kept
    head, warning = _shown(w).split("\n")
    score, r, neutral, _ = _image_numbers(head)
    assert (score, r) == (pytest.approx(f.score, abs=0.005), 1.0)
    assert neutral == f"'{PROMPT}'"
    assert warning == f.message
    assert "1.00 correlated with the map of the neutral prompt 'a disk'" in warning
    assert "not guiding the result" in warning
    assert _warned(w)
    assert warnings_seen == [f.message]

    # a new run clears the line until it has its own
    w.run_button.click()
    assert not w.faithfulness_row.isVisibleTo(w)
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    assert _warned(w) and len(warnings_seen) == 2

    # switched off
    w.faithfulness_check.setChecked(False)
    assert not w.neutral_edit.isEnabled() and not w.contrast_edit.isEnabled()
    assert not w.max_correlation_spin.isEnabled()
    assert "no faithfulness check" in w.settings_label.text()
    _run(w, qtbot)
    run = w.controller.state.run
    assert run.result.faithfulness is None and w.controller.pipeline.config.faithfulness \
        .enabled is False
    assert w.last_status.startswith("Done in")
    assert _shown(w) == "" and w.faithfulness_label.text() == ""
    assert w.last_faithfulness is None and len(warnings_seen) == 2
    assert not any("faithfulness" in u.stage for u in w.progress_log)
    w.faithfulness_check.setChecked(True)
    assert w.neutral_edit.isEnabled() and w.neutral_edit.text() == PROMPT


def test_salip_runs_are_checked_too(make_napari_viewer, tiny_pipeline, qtbot, warnings_seen):
    """Method: SaLIP. The neutral prompt scores the same crops: with the prompt as neutral
    prompt the retrieval maps are the same (r = 1.00, the same proposal retrieved)."""
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer, tiny_pipeline)
    _choose(w.chain_combo, "salip")
    w.salip_points_spin.setValue(4)
    w.salip_layers_spin.setValue(0)
    w.salip_iou_spin.setValue(0.0)
    w.salip_stability_spin.setValue(0.0)
    w.salip_box_nms_spin.setValue(1.0)
    w.salip_area_spin.setValue(100.0)
    assert w.neutral_edit.isEnabled()  # both methods
    w.neutral_edit.setText(PROMPT)
    _run(w, qtbot)
    run = w.controller.state.run
    assert run.method == "salip" and run.result.found, w.last_status
    f = run.result.faithfulness
    assert f is not None and f.correlation == pytest.approx(1.0)
    assert f.neutral_overlap == pytest.approx(1.0)  # the same top-1 proposal
    head, warning = _shown(w).split("\n")
    score, r, neutral, parts = _image_numbers(head)
    assert (score, r) == (pytest.approx(f.score, abs=0.005), 1.0)
    assert parts == ["100% of the mask also neutral"]
    assert warning == f.message and _warned(w) and warnings_seen == [f.message]

    w.neutral_edit.setText("an image")  # the default: the tiny CLIP's scores still differ
    _run(w, qtbot)
    f = w.controller.state.run.result.faithfulness
    score, r, neutral, _ = _image_numbers(_shown(w).split("\n")[0])
    assert neutral == "'an image'"
    assert (score, r) == (pytest.approx(f.score, abs=0.005),
                          pytest.approx(f.correlation, abs=0.005))
    assert _warned(w) == (not f.steers)


def test_all_slices_summarises_the_flagged_slices(make_napari_viewer, tiny_pipeline, qtbot,
                                                  warnings_seen):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_image(seed=s) for s in range(3)]), name="vol")
    w = _dock(viewer, tiny_pipeline)
    w.neutral_edit.setText(PROMPT)
    w.all_slices_check.setChecked(True)
    _run(w, qtbot)
    run = w.controller.state.run
    assert run.volume is not None and sorted(run.slice_faithfulness) == [0, 1, 2]
    head, warning = _shown(w).split("\n")
    match = VOLUME_LINE.match(head)
    assert match is not None, head
    mean_r = np.mean([c.correlation for c in run.slice_faithfulness.values()])
    assert float(match.group(2)) == pytest.approx(mean_r, abs=0.005) == 1.0
    assert float(match.group(1)) == pytest.approx(1 - mean_r, abs=0.005)
    assert match.group(4) == "3" and match.group(5) == "3 of 3 flagged (z=0-2)"
    assert warning.startswith("The text did not steer the map on 3 of 3 slices. z=")
    assert "1.00 correlated with the map of the neutral prompt 'a disk'" in warning
    assert _warned(w) and warnings_seen == [warning]  # one notification for the run


def test_the_four_fields_are_saved_loaded_and_kept_by_presets(make_napari_viewer, qtbot,
                                                              tiny_pipeline, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer)
    w.neutral_edit.setText("a photo")
    w.contrast_edit.setText("normal tissue; a cyst, small")
    w.max_correlation_spin.setValue(0.75)
    w.faithfulness_check.setChecked(False)
    expected = FaithfulnessConfig(enabled=False, neutral_prompt="a photo",
                                  contrast_prompts=("normal tissue", "a cyst, small"),
                                  max_correlation=0.75)
    assert w.build_config().faithfulness == expected
    assert "no faithfulness check" in w.settings_label.text()
    path = tmp_path / "run.json"
    w.save_run(path)
    saved = json.loads(path.read_text())["config"]["faithfulness"]
    assert saved == {"enabled": False, "neutral_prompt": "a photo",
                     "contrast_prompts": ["normal tissue", "a cyst, small"],
                     "max_correlation": 0.75}

    other = _dock(make_napari_viewer())
    assert other.faithfulness_check.isChecked()  # a new dock: the defaults
    other.load_run(path)
    assert not other.faithfulness_check.isChecked() and not other.neutral_edit.isEnabled()
    assert other.neutral_edit.text() == "a photo"
    assert other.contrast_edit.text() == "normal tissue; a cyst, small"
    assert other.max_correlation_spin.value() == 0.75
    assert other.build_config().faithfulness == expected

    # a preset sets MedCLIP-SAMv2's settings and keeps the check's
    other.faithfulness_check.setChecked(True)
    other.preset_combo.setCurrentText("breast tumor (ultrasound)")
    assert other.layer_spin.value() == 9
    assert other.build_config().faithfulness == dataclasses.replace(expected, enabled=True)
    assert "faithfulness vs 'a photo', 2 contrasts, warn at r 0.75" in \
        other.settings_label.text()

    # a run remembers them for the next session
    w.set_pipeline(tiny_pipeline)  # its config: the default check
    assert w.faithfulness_check.isChecked() and w.neutral_edit.text() == "an image"
    w.neutral_edit.setText("")  # the empty prompt
    w.contrast_edit.setText("a square")
    _run(w, qtbot)
    f = w.controller.state.run.result.faithfulness
    assert f.neutral_prompt == "" and dict(f.contrasts).keys() == {"a square"}
    assert "vs the empty prompt" in _shown(w) and "vs 'a square'" in _shown(w)
    fresh = _dock(make_napari_viewer())
    assert fresh.faithfulness_check.isChecked() and fresh.neutral_edit.text() == ""
    assert fresh.contrast_edit.text() == "a square"
    assert fresh.build_config().faithfulness == FaithfulnessConfig(
        neutral_prompt="", contrast_prompts=("a square",))


def test_settings_line_names_the_check_only_when_off_or_changed():
    config = PipelineConfig(sam_model="vit_b")
    assert "faithfulness" not in describe_settings(config)
    off = dataclasses.replace(config, faithfulness=FaithfulnessConfig(enabled=False))
    assert describe_settings(off).endswith("one box · no faithfulness check · SAM vit_b · "
                                           "custom settings")
    changed = dataclasses.replace(config, faithfulness=FaithfulnessConfig(
        neutral_prompt="", contrast_prompts=("normal tissue",)))
    assert " · faithfulness vs the empty prompt, 1 contrast · SAM vit_b" in describe_settings(
        changed)
    salip = dataclasses.replace(off, method="salip")
    assert "best 1 · no faithfulness check · SAM" in describe_settings(salip)
