"""Open this plugin's widgets, samples and files the way napari does (npe2 manifest,
viewer injection), never by constructing widget classes by hand."""

from __future__ import annotations

PLUGIN = "napari-medclipsam"
SEGMENT = "Text-prompt segmentation"
TRAINING = "Pseudo-labels & training"


def dock(viewer, display_name: str):
    """Open a widget as Plugins > MedCLIP-SAM > ``display_name`` does; returns the widget."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, display_name)
    return widget


def open_sample(viewer, key: str):
    """File > Open Sample > MedCLIP-SAM > ``key``; returns the new layers."""
    return viewer.open_sample(PLUGIN, key)
