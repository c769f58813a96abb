"""Slice-wise segmenters (SegFormer, U-Net) behind one interface with named hook points."""

from .segformer import SEGFORMER_VARIANTS, SegFormerSegmenter
from .segmenter import Segmenter, SegmenterConfig, default_device, weights_sha256
from .unet import UNetSegmenter

ARCHITECTURES = tuple(f"segformer-{v}" for v in SEGFORMER_VARIANTS) + ("unet",)


def build_segmenter(config: SegmenterConfig) -> Segmenter:
    """A freshly initialised segmenter for ``config`` (no pretrained weights exist here: we train from scratch)."""
    if config.arch.startswith("segformer"):
        return SegFormerSegmenter(config)
    if config.arch == "unet":
        return UNetSegmenter(config)
    raise ValueError(f"unknown architecture '{config.arch}'; choose one of {', '.join(ARCHITECTURES)}")


def load_segmenter(folder, device=None) -> Segmenter:
    """Load a segmenter folder (``config.json`` + ``model.safetensors``) in one call."""
    return Segmenter.from_pretrained(folder, device=device)


__all__ = [
    "ARCHITECTURES", "Segmenter", "SegmenterConfig", "SegFormerSegmenter", "UNetSegmenter",
    "build_segmenter", "load_segmenter", "default_device", "weights_sha256",
]  # fmt: skip
