"""napari's front door in a fresh process: a viewer exists before any heavy import.

Under Mesa's llvmpipe (Xvfb, remote desktops, VMs), importing triton after the GL context
exists killed napari with a segmentation fault on the first Run all. The script opens the
viewer first, docks the widget from the Plugins menu, loads the models and runs the whole
chain in the widget's worker thread.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)


def test_viewer_first_then_the_chain_in_the_worker(tiny_clip_dir, tiny_sam_checkpoint,
                                                   tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)]),
           "MEDCLIPSAM_CONFIG_DIR": str(tmp_path / "config")}
    out = subprocess.run([sys.executable, str(tests / "viewer_first_session.py"),
                          str(tiny_clip_dir), str(tiny_sam_checkpoint)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, (f"exit {out.returncode} (-11 is the segfault)\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    assert "OK" in out.stdout
