"""What every dock widget of this plugin does the same way.

- :func:`put_layer`: add an output layer aligned with its source (scale, translate), or update
  the one of that name in place, so a rerun does not pile up layers;
- :data:`MAP_KINDS` and :func:`is_map_layer`: the segment dock's map layers (saliency, SaLIP's
  retrieval map, a VLSM's probability), which no dock offers as an image to segment or train on;
- :func:`slice_index`: the slice of a (Z, Y, X) layer that is on screen, through the layer's
  own world-to-data mapping (never the viewer's raw step, which belongs to the tallest layer);
- :class:`Outcome` and :func:`run_guarded`: a worker's result, an error message or a
  cancellation, as one typed value (no string tags); :func:`start_worker` runs a function in
  napari's ``thread_worker`` with the guard below;
- :func:`report`: a status line and, for errors, a napari notification;
- :class:`SettingsStore`: JSON settings in ``$MEDCLIPSAM_CONFIG_DIR`` (default: the user
  config folder), written atomically, a read-only home never breaks a run.

Importing this module (napari does when a widget is opened from the Plugins menu) runs
:func:`~napari_medclipsam.core.runtime.avoid_triton_llvm_clash`, and so does every worker
start: under Mesa's LLVM, importing torchvision after a viewer exists otherwise kills napari.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medclipsam.core.errors import CancelledError, InputError
from napari_medclipsam.core.runtime import avoid_triton_llvm_clash

if TYPE_CHECKING:
    import napari

avoid_triton_llvm_clash()

#: exceptions whose message is meant for the user; anything else is reported as a bug
USER_ERRORS: tuple[type[BaseException], ...] = (InputError, ValueError, OSError, RuntimeError)


# --------------------------------------------------------------------------- layers
#: the first layer of each chain's run in the segment dock, ``"<kind> [<target>]"``, by
#: ``PipelineConfig.method``: maps of the image, not images to segment or train on
MAP_KINDS = {"medclipsamv2": "saliency", "salip": "retrieval map", "vlsm": "VLSM probability"}


def is_map_layer(name: str) -> bool:
    """True for a map layer of the segment dock (``"saliency [breast tumor]"``, ``"retrieval
    map [...]"``, ``"VLSM probability [...]"``)."""
    return name.startswith(tuple(f"{kind} [" for kind in MAP_KINDS.values()))


def geometry_of(source, ndim: int) -> dict[str, tuple[float, ...]]:
    """``{"scale", "translate"}`` of ``source``'s last ``ndim`` axes, for aligned outputs."""
    return {"scale": tuple(source.scale[-ndim:]),
            "translate": tuple(source.translate[-ndim:])}


def find_layer(viewer: napari.Viewer, name: str | None):
    """The viewer's layer called ``name``, or None (napari's LayerList has no ``get``)."""
    if not name:
        return None
    try:
        return viewer.layers[name]
    except KeyError:
        return None


def put_layer(viewer: napari.Viewer, name: str, kind: str, data, geometry: dict,
              **kwargs):
    """Add layer ``name`` of napari type ``kind`` ("image", "labels", "shapes", "points"), or
    update the existing one in place (its data, scale and translate; the user's display
    settings stay). A layer of another type or dimensionality under that name is replaced.

    Shapes are written as rectangles (``add_rectangles``), so every shape stays a box.
    """
    from napari import layers as napari_layers

    cls = {"image": napari_layers.Image, "labels": napari_layers.Labels,
           "shapes": napari_layers.Shapes, "points": napari_layers.Points}[kind]
    ndim = len(geometry["scale"])
    existing = find_layer(viewer, name)
    if existing is not None and (not isinstance(existing, cls) or existing.ndim != ndim):
        viewer.layers.remove(name)
        existing = None
    if existing is None:
        layer = cls(data, name=name, **geometry, **kwargs)
        viewer.layers.append(layer)
        return layer
    if kind == "shapes":
        existing.selected_data = set()
        existing.data = []
        if len(data):
            existing.add_rectangles(data)
    elif kind == "points":
        existing.data = data
        if "features" in kwargs:
            existing.features = kwargs["features"]
        if "face_color" in kwargs and len(data):
            existing.face_color = kwargs["face_color"]
    else:
        existing.data = data
    existing.scale = geometry["scale"]
    existing.translate = geometry["translate"]
    return existing


def layer_names(viewer: napari.Viewer, kind: str,
                skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Names of the viewer's layers of napari type ``kind`` ("image", "labels"), minus ``skip``."""
    from napari import layers as napari_layers

    cls = {"image": napari_layers.Image, "labels": napari_layers.Labels}[kind]
    return [layer.name for layer in viewer.layers
            if isinstance(layer, cls) and not skip(layer.name)]


def set_combo_items(combo, names: list[str]) -> None:
    """Replace a QComboBox's items, keeping the current choice when it still exists."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def is_stack(layer) -> bool:
    """True for a single-channel (Z, Y, X) image layer."""
    return (not getattr(layer, "rgb", False) and not getattr(layer, "multiscale", False)
            and layer.ndim == 3)


def slice_index(viewer: napari.Viewer, layer) -> int:
    """Index along axis 0 of ``layer`` of the slice on screen.

    Uses the layer's own world-to-data mapping of the viewer's current point, so layers of
    different depths, scales and offsets each give their own slice; clipped to the layer.
    """
    data_point = layer.world_to_data(viewer.dims.point[-layer.ndim:])
    depth = layer.data.shape[0]
    return int(np.clip(np.round(data_point[0]), 0, depth - 1))


# --------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class Outcome:
    """What a guarded worker call ended with: a ``value``, an ``error`` message, or
    ``cancelled``; exactly one applies. A cancelled call may leave ``partial``: what it
    finished before it stopped (the ``partial`` of the :class:`CancelledError` it raised)."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False
    partial: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled


def run_guarded(func: Callable, *args, **kwargs) -> Outcome:
    """Call ``func`` and wrap what happens in an :class:`Outcome`; never raises.

    User errors (bad input, a missing model, a full disk) become their message; a bug
    becomes "Unexpected error: ..." with the traceback printed to the console, so the viewer
    never crashes and the user's work is kept.
    """
    from napari_medclipsam.core.models import ModelUnavailableError

    avoid_triton_llvm_clash()
    try:
        return Outcome(value=func(*args, **kwargs))
    except CancelledError as exc:
        return Outcome(cancelled=True, partial=getattr(exc, "partial", None))
    except (ModelUnavailableError, *USER_ERRORS) as exc:
        return Outcome(error=str(exc))
    except Exception as exc:  # a bug: report it, never crash napari
        traceback.print_exc()
        return Outcome(error=f"Unexpected error: {type(exc).__name__}: {exc}")


def start_worker(func: Callable, *args, on_done: Callable[[Outcome], None],
                 on_finished: Callable[[], None] | None = None, **kwargs):
    """Run ``func(*args, **kwargs)`` in napari's worker thread; ``on_done(outcome)`` runs in
    the GUI thread. Returns the started worker."""
    from napari.qt.threading import create_worker

    avoid_triton_llvm_clash()  # before the worker's first heavy import
    worker = create_worker(run_guarded, func, *args, _start_thread=False, **kwargs)
    worker.returned.connect(on_done)
    worker.errored.connect(lambda exc: on_done(
        Outcome(error=f"Unexpected error: {type(exc).__name__}: {exc}")))
    if on_finished is not None:
        worker.finished.connect(on_finished)
    worker.start()
    return worker


def report(label, message: str, error: bool = False) -> None:
    """Show ``message`` in a status QLabel; an error also as a napari notification."""
    label.setText(message)
    if error:
        from napari.utils.notifications import show_error

        show_error(message)


# --------------------------------------------------------------------------- settings
class SettingsStore:
    """One JSON file of a widget's settings in the plugin's config folder.

    ``$MEDCLIPSAM_CONFIG_DIR`` chooses the folder (tests point it at a temporary one);
    by default the user config folder (``platformdirs``).
    """

    def __init__(self, filename: str):
        self.filename = filename

    @property
    def path(self) -> Path:
        folder = os.environ.get("MEDCLIPSAM_CONFIG_DIR")
        if not folder:
            import platformdirs

            folder = platformdirs.user_config_dir("napari-medclipsam")
        return Path(folder) / self.filename

    def load(self) -> dict[str, Any] | None:
        """The saved dictionary; None when there is none. Raises ValueError if unreadable."""
        path = self.path
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"Ignored unreadable settings in {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"Ignored unreadable settings in {path}: not a JSON object.")
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Write atomically; raises OSError (e.g. a read-only home) for the caller to report."""
        from napari_medclipsam.core.io import write_text

        write_text(self.path, json.dumps(data, indent=2) + "\n")
