"""Process-level guards that keep the heavy libraries importable inside napari.

:func:`avoid_triton_llvm_clash` must run before ``torchvision``, ``open_clip`` or nnU-Net's
predictor is first imported in a process that renders with Mesa's LLVM (napari with
llvmpipe, the software OpenGL of remote desktops, VMs and many Linux laptops, or radeonsi).
Every napari entry point of this package and every model loader calls it; it is cheap
(one read of ``/proc/self/maps``) and does nothing elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path


def avoid_triton_llvm_clash() -> bool:
    """Hide ``triton`` from this process when Mesa's ``libLLVM`` is loaded; True if hidden.

    ``torchvision`` (and so ``open_clip``) and nnU-Net's predictor import ``torch._dynamo``,
    which imports ``triton`` when it is installed (CUDA builds of torch on Linux ship it).
    Triton's own statically linked LLVM crashes the process with a segmentation fault when
    Mesa's ``libLLVM`` is already loaded, which napari with llvmpipe or radeonsi does as soon
    as a viewer exists; everything the user did is then lost. Triton is only used by
    ``torch.compile``, which this package never calls; with ``sys.modules['triton'] = None``
    torch sees no triton and works as on a machine without it.

    Returns False (and changes nothing) when triton is already imported, off Linux, or when
    no Mesa LLVM is loaded (the command line, a headless server).
    """
    if not sys.platform.startswith("linux") or "triton" in sys.modules:
        return sys.modules.get("triton", 0) is None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None
    return True
