"""Process-level helpers: the guard that keeps the heavy libraries importable inside napari,
and whether a process that left files behind (a temporary, a staging folder, a job) still runs.

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


def process_matches(pid: int, create_time: float | None = None) -> bool | None:
    """Whether ``pid`` is a running process that (when ``create_time`` is given, within a
    second) started then.

    Returns
    -------
    bool or None
        True: it runs (and is the same process); False: gone, a zombie, not a valid pid, or
        the pid now belongs to a process started at another time; None: cannot tell (no
        permission, psutil unavailable), so a caller keeps what it would have removed.
    """
    try:
        import psutil
    except ImportError:
        return None
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) <= 1.0
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except (psutil.Error, OSError):
        return None


def process_create_time(pid: int | None = None) -> float | None:
    """Start time of ``pid`` (default: this process) as psutil gives it, or None when it
    cannot be read; recorded beside a pid so a reused pid is not taken for ours."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None
