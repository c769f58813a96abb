"""SegFormer (Xie et al. 2021) from ``transformers``, trained from scratch on any number of MRI channels.

Hook points are the outputs of the four encoder stages (``stage1`` at 1/4 resolution ... ``stage4`` at 1/32).
The all-MLP decode head reads every stage, so :meth:`SegFormerSegmenter.encode` keeps the earlier stages'
outputs in its cache, and :meth:`SegFormerSegmenter.decode` runs the later stages and the head.
"""

from __future__ import annotations

import functools

import torch
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


@functools.lru_cache(maxsize=32)
def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D linear interpolation as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes it when upsampling."""
    matrix = torch.zeros(n_out, n_in)
    scale = n_in / n_out
    for out in range(n_out):
        source = max((out + 0.5) * scale - 0.5, 0.0)
        low = min(int(source), n_in - 1)
        high = min(low + 1, n_in - 1)
        frac = source - low
        matrix[out, low] += 1 - frac
        matrix[out, high] += frac
    return matrix


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(N, C, h, w)`` to ``size`` as two small matrix products (rows, then columns).

    The same values as ``F.interpolate(..., mode="bilinear", align_corners=False)`` up to float rounding (~1e-7),
    several times faster on the CPU for the many-channel maps of SegFormer's head.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    rows = _bilinear_matrix(h, size[0]).to(device=x.device, dtype=x.dtype)
    cols = _bilinear_matrix(w, size[1]).to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class SegFormerSegmenter(Segmenter):
    """SegFormer-B0...B5 behind the :class:`Segmenter` interface. Input side must be a multiple of 32."""

    hook_names = ("stage1", "stage2", "stage3", "stage4")
    default_hook = "stage2"
    architectures = tuple(f"segformer-{variant}" for variant in SEGFORMER_VARIANTS)

    def __init__(self, config: SegmenterConfig):
        self.hf_config = segformer_config(config)
        super().__init__(config)
        self.model = SegformerForSemanticSegmentation(self.hf_config)

    def encode(self, x: torch.Tensor, hook: str | None = None, with_cache: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stop = self.hook_names.index(self._hook(hook))
        cache: list[torch.Tensor] = []
        hidden = x
        for index, stage in enumerate(self.model.segformer.stages[: stop + 1]):
            hidden = stage(hidden)
            if index < stop and with_cache:
                cache.append(hidden)
        return hidden, cache

    def encode_cache(self, x: torch.Tensor, hook: str | None = None, count: int | None = None) -> list[torch.Tensor]:
        stop = self.hook_names.index(self._hook(hook))
        count = stop if count is None else min(count, stop)
        cache, hidden = [], x
        for stage in self.model.segformer.stages[:count]:
            hidden = stage(hidden)
            cache.append(hidden)
        return cache

    def decode(self, activations: torch.Tensor, cache: list[torch.Tensor], hook: str | None = None) -> torch.Tensor:
        start = self.hook_names.index(self._hook(hook))
        outputs = [*cache, activations]
        hidden = activations
        for stage in self.model.segformer.stages[start + 1 :]:
            hidden = stage(hidden)
            outputs.append(hidden)
        logits = self.head(outputs)  # (N, K, S/4, S/4)
        height, width = outputs[0].shape[-2:]
        return upsample_bilinear(logits, (4 * height, 4 * width))

    def head(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """SegFormer's all-MLP decode head, computed in its fused form: the same function, ~15x fewer operations.

        The head projects each stage ``x_i`` to ``D`` channels (``P_i x + b_i``), upsamples it to the first stage's
        grid, concatenates and fuses the four with a bias-free 1x1 convolution ``W = [W_4 W_3 W_2 W_1]`` before its
        batch norm. Every step up to the fusion is linear and bilinear upsampling keeps constants, so the fused map
        is ``sum_i up(W_i P_i x_i + W_i b_i)``: each stage is mapped by one ``D x C_i`` matrix at its own resolution
        and only ``D`` channels are upsampled, instead of fusing ``4D`` channels at the finest grid.

        Args:
            stages: the four stages' outputs ``(N, C_i, H_i, W_i)``, finest first.

        Returns:
            Logits ``(N, K, H_1, W_1)``.
        """
        head = self.model.decode_head
        width = head.config.decoder_hidden_size
        fuse = head.linear_fuse.weight[:, :, 0, 0]  # (D, n*D); the concatenation puts the last stage first
        size = stages[0].shape[-2:]
        fused = None
        for index, (x, projection) in enumerate(zip(stages, head.linear_projections)):
            block = fuse[:, (len(stages) - 1 - index) * width : (len(stages) - index) * width]
            n, _, h, w = x.shape
            y = torch.matmul(block @ projection.proj.weight, x.flatten(2)) + (block @ projection.proj.bias)[:, None]
            y = upsample_bilinear(y.reshape(n, width, h, w), tuple(size))
            fused = y if fused is None else fused + y
        hidden = head.dropout(head.activation(head.batch_norm(fused)))
        return head.classifier(hidden)
