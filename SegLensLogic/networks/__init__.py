"""Slice-wise segmenters (SegFormer, U-Net) behind one interface with named hook points.

The names below are imported on first use (PEP 562), so that ``from SegLensLogic.networks import ARCHITECTURES``
imports no torch and loading a SegFormer does not import MONAI.
"""

from ..lazy import lazy_exports
from .architectures import ARCHITECTURES


def load_segmenter(folder, device=None, sha256: str | None = None):
    """Load a segmenter folder (``config.json`` + ``model.safetensors``) in one call (``sha256``: the weights' hash
    when already verified, e.g. by a bundle)."""
    from .segmenter import Segmenter

    return Segmenter.from_pretrained(folder, device=device, sha256=sha256)


_EXPORTS = {
    "Segmenter": "segmenter",
    "SegmenterConfig": "segmenter",
    "build_segmenter": "segmenter",
    "default_device": "segmenter",
    "weights_sha256": "segmenter",
    "SegFormerSegmenter": "segformer",
    "UNetSegmenter": "unet",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "ARCHITECTURES", "Segmenter", "SegmenterConfig", "SegFormerSegmenter", "UNetSegmenter",
    "build_segmenter", "load_segmenter", "default_device", "weights_sha256",
]  # fmt: skip
