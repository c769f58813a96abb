"""SegFormer (Xie et al. 2021) from ``transformers``, trained from scratch on any number of MRI channels.

Hook points are the outputs of the four encoder stages (``stage1`` at 1/4 resolution ... ``stage4`` at 1/32).
The all-MLP decode head reads every stage, so :meth:`SegFormerSegmenter.encode` keeps the earlier stages'
outputs in its cache, and :meth:`SegFormerSegmenter.decode` runs the later stages and the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from .segmenter import Segmenter, SegmenterConfig

# Encoder sizes of the published variants (Xie et al. 2021, table 6); heads, strides and ratios are shared.
SEGFORMER_VARIANTS = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}


def segformer_config(config: SegmenterConfig) -> SegformerConfig:
    """The ``transformers`` config of a SegLens SegFormer: variant sizes, then ``arch_options`` overrides."""
    variant = config.arch.split("-", 1)[1] if "-" in config.arch else ""
    if variant not in SEGFORMER_VARIANTS:
        raise ValueError(f"unknown SegFormer variant '{config.arch}'; use segformer-b0 ... segformer-b5")
    fields = {**SEGFORMER_VARIANTS[variant], **config.arch_options}
    return SegformerConfig(num_channels=config.in_channels, num_labels=config.num_classes, **fields)


class SegFormerSegmenter(Segmenter):
    """SegFormer-B0...B5 behind the :class:`Segmenter` interface. Input side must be a multiple of 32."""

    hook_names = ("stage1", "stage2", "stage3", "stage4")
    default_hook = "stage2"
    architectures = tuple(f"segformer-{variant}" for variant in SEGFORMER_VARIANTS)

    def __init__(self, config: SegmenterConfig):
        self.hf_config = segformer_config(config)
        super().__init__(config)
        self.model = SegformerForSemanticSegmentation(self.hf_config)

    def encode(self, x: torch.Tensor, hook: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stop = self.hook_names.index(self._hook(hook))
        cache: list[torch.Tensor] = []
        hidden = x
        for index, stage in enumerate(self.model.segformer.stages[: stop + 1]):
            hidden = stage(hidden)
            if index < stop:
                cache.append(hidden)
        return hidden, cache

    def decode(self, activations: torch.Tensor, cache: list[torch.Tensor], hook: str | None = None) -> torch.Tensor:
        start = self.hook_names.index(self._hook(hook))
        outputs = [*cache, activations]
        hidden = activations
        for stage in self.model.segformer.stages[start + 1 :]:
            hidden = stage(hidden)
            outputs.append(hidden)
        logits = self.model.decode_head(outputs)  # (N, K, S/4, S/4)
        height, width = outputs[0].shape[-2:]
        return F.interpolate(logits, size=(4 * height, 4 * width), mode="bilinear", align_corners=False)
