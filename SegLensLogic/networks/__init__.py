"""Slice-wise segmenters (SegFormer, U-Net) behind one interface with named hook points.

The names below are imported on first use (PEP 562), so that ``from SegLensLogic.networks import ARCHITECTURES``
imports no torch and loading a SegFormer does not import MONAI.
"""

from .architectures import ARCHITECTURE_MODULES, ARCHITECTURES


def load_segmenter(folder, device=None):
    """Load a segmenter folder (``config.json`` + ``model.safetensors``) in one call."""
    from .segmenter import Segmenter

    return Segmenter.from_pretrained(folder, device=device)


def __getattr__(name: str):
    if name in ("Segmenter", "SegmenterConfig", "build_segmenter", "default_device", "weights_sha256"):
        from . import segmenter as module
    elif name == "SegFormerSegmenter":
        from . import segformer as module
    elif name == "UNetSegmenter":
        from . import unet as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ARCHITECTURES", "Segmenter", "SegmenterConfig", "SegFormerSegmenter", "UNetSegmenter",
    "build_segmenter", "load_segmenter", "default_device", "weights_sha256",
]  # fmt: skip
