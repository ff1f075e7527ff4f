"""Packaging: light imports, the npe2 manifest, the console script."""

import subprocess
import sys


def test_import_does_not_pull_torch_or_napari():
    code = ("import sys, napari_medclipsam, napari_medclipsam.cli, "
            "napari_medclipsam.core.pipeline, napari_medclipsam.core.models, "
            "napari_medclipsam.core.sam, napari_medclipsam.core.saliency; "
            "heavy = [m for m in ('torch', 'open_clip', 'segment_anything', 'napari', 'qtpy') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_manifest_is_valid_and_registered():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-medclipsam"]
    assert eps and eps[0].value == "napari_medclipsam:napari.yaml"
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-medclipsam")
    assert manifest.name == "napari-medclipsam"
    for command in manifest.contributions.commands or []:
        module, _, attr = command.python_name.partition(":")
        mod = __import__(module, fromlist=[attr])
        assert hasattr(mod, attr), command.python_name
    proc = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-medclipsam"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stdout + proc.stderr


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "napari_medclipsam.cli", "segment", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--prompt-file", "--clip-model", "--sam-model", "--sam-checkpoint", "--device",
                 "--layer", "--beta", "--eta-c", "--top-k", "--box-mode", "--overwrite"):
        assert flag in proc.stdout
