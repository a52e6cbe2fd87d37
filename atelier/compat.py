"""Process-wide fixes for the dependency stack, applied once before heavy imports.

Why each one exists:
- PyPI's torchvision 0.28 is a CUDA build. On CPU-only torch its ``_C`` extension cannot load, and
  ``torchvision._meta_registrations`` then fails with ``operator torchvision::nms does not exist``,
  which breaks transformers, diffusers, open_clip and basicsr. We define the two op schemas it needs
  (``nms``, ``qnms``) with a pure-torch CPU implementation. On a machine where the native ops load
  (a CUDA box) nothing is changed.
- basicsr (realesrgan, gfpgan) imports ``torchvision.transforms.functional_tensor``, which newer
  torchvision renamed to ``_functional_tensor``: alias it.
- Random-weight test models produce denormal floats that make CPU kernels ~100x slower.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any


def _nms_cpu(dets: Any, scores: Any, iou_threshold: float):
    """Greedy non-maximum suppression; boxes (N, 4) as x1, y1, x2, y2. Returns kept indices (K,)."""
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=dets.device)


def _torchvision_native_ops_load() -> bool:
    """True when torchvision's compiled extension loads in this process (without importing torchvision)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    import glob
    import os

    location = spec.submodule_search_locations[0]
    candidates = glob.glob(os.path.join(location, "_C*.so")) + glob.glob(os.path.join(location, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
        return True
    except (OSError, RuntimeError):
        return False


def _define_torchvision_ops() -> None:
    import torch

    if "torchvision" in sys.modules:
        return  # already imported (successfully or not); too late to help
    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined already (by torchvision or an earlier apply())
        return
    except (AttributeError, RuntimeError):
        pass
    if _torchvision_native_ops_load():
        return
    from atelier.models import process_cache

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms_cpu, "CPU")
    lib.impl("qnms", _nms_cpu, "CPU")
    process_cache().hold(lib)  # a Library's registrations last as long as the object


def _alias_functional_tensor() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        import torchvision.transforms._functional_tensor as ft
    except ImportError:
        return
    sys.modules[name] = ft


def apply() -> None:
    """Apply every fix (each is idempotent). Call before importing torchvision / diffusers / basicsr."""
    import torch

    torch.set_flush_denormal(True)
    _define_torchvision_ops()
    _alias_functional_tensor()
