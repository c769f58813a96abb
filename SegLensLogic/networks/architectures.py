"""The architecture names a :class:`~SegLensLogic.networks.segmenter.SegmenterConfig` can give, and the module
whose segmenter class builds each (no torch here: the command line lists them without importing a network)."""

from __future__ import annotations

# arch -> module of SegLensLogic.networks that defines (and registers) its Segmenter subclass. A module is imported
# the first time one of its architectures is built, so that loading a SegFormer does not import MONAI.
ARCHITECTURE_MODULES: dict[str, str] = {
    **{f"segformer-b{index}": "segformer" for index in range(6)},
    "unet": "unet",
}

# Every architecture a config can name (SegFormer-B0...B5, U-Net).
ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURE_MODULES)
