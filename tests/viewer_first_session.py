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
from tiny_clip import register_tiny_vit  # noqa: E402
from tiny_sam import build_tiny_sam  # noqa: E402

from napari_medclipsam.core.config import PipelineConfig, SaliencyConfig  # noqa: E402
from napari_medclipsam.core.models import load_clip, load_sam  # noqa: E402
from napari_medclipsam.core.pipeline import ZeroShotPipeline  # noqa: E402

register_tiny_vit()  # the tiny CLIP's timm trunk
config = PipelineConfig(clip_model=f"local-dir:{sys.argv[1]}", device="cpu",
                        saliency=SaliencyConfig(layer=2, steps=2, batch_size=2))
widget.set_pipeline(ZeroShotPipeline(
    config, clip=load_clip(config.clip_model, "cpu"),
    sam=load_sam("vit_b", sys.argv[2], "cpu", builder=build_tiny_sam)))
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
