"""Run as a script: a viewer first, then the widget from the Plugins menu, then the whole
chain in the widget's worker thread, exactly the order that killed napari under Mesa's
llvmpipe (triton imported after the GL context exists). Exit 0 and print OK when it worked.

Usage: python viewer_first_session.py TINY_CLIP_DIR TINY_SAM_CHECKPOINT
"""

import sys
import time

import napari
import numpy as np

viewer = napari.Viewer(show=False)
assert "torchvision" not in sys.modules and "open_clip" not in sys.modules
viewer.open_sample("napari-medclipsam", "head_phantom")
_, widget = viewer.window.add_plugin_dock_widget("napari-medclipsam",
                                                 "Text-prompt segmentation")
# the heavy imports (open_clip -> torchvision -> torch._dynamo -> triton) happen only now,
# after the viewer and its GL context exist
from tiny_pipeline import build_tiny_pipeline  # noqa: E402

widget.set_pipeline(build_tiny_pipeline(sys.argv[1], sys.argv[2]))
widget.prompt_edit.setPlainText("a bright ellipse")
widget.run_button.click()
end = time.monotonic() + 300
app = napari.qt.get_qapp()
while widget.running and time.monotonic() < end:
    app.processEvents()
    time.sleep(0.01)
assert not widget.running, "timed out"
assert "SAM mask [a bright ellipse]" in viewer.layers, widget.last_status
assert np.asarray(viewer.layers["saliency [a bright ellipse]"].data).shape == (400, 400)
print("OK", widget.last_status)
viewer.close()
