"""Slice-wise segmenters (SegFormer, U-Net) behind one interface with named hook points."""

from .segformer import SegFormerSegmenter
from .segmenter import Segmenter, SegmenterConfig, build_segmenter, default_device, weights_sha256
from .unet import UNetSegmenter

# Every architecture a config can name (SegFormer-B0...B5, U-Net), registered by the classes above.
ARCHITECTURES = tuple(Segmenter.registry)


def load_segmenter(folder, device=None) -> Segmenter:
    """Load a segmenter folder (``config.json`` + ``model.safetensors``) in one call."""
    return Segmenter.from_pretrained(folder, device=device)


__all__ = [
    "ARCHITECTURES", "Segmenter", "SegmenterConfig", "SegFormerSegmenter", "UNetSegmenter",
    "build_segmenter", "load_segmenter", "default_device", "weights_sha256",
]  # fmt: skip
