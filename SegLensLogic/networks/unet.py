"""2D U-Net from MONAI (``BasicUNet``): five encoder levels, four decoder levels with skip connections.

Hook points are the encoder levels ``conv_0`` (full resolution), ``down_1`` ... ``down_4`` (1/16). The decoder
reads every encoder level through its skip connections, so :meth:`UNetSegmenter.encode` keeps them in its cache.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet

from .segmenter import Segmenter, SegmenterConfig

DEFAULT_FEATURES = (32, 32, 64, 128, 256, 32)


class UNetSegmenter(Segmenter):
    """MONAI ``BasicUNet`` (instance norm, transposed-convolution upsampling). Input side: multiple of 16."""

    hook_names = ("conv_0", "down_1", "down_2", "down_3", "down_4")
    # down_3: 1/8 resolution, 128 channels by default -- the middle of the encoder, as in the paper.
    default_hook = "down_3"
    architectures = ("unet",)
    size_multiple = 16
    # On the CPU a batch of full-resolution U-Net feature maps runs slower per slice than one slice alone.
    cpu_batch_size = 1

    def __init__(self, config: SegmenterConfig):
        options = dict(config.arch_options)
        features = tuple(options.pop("features", DEFAULT_FEATURES))
        if len(features) != 6:
            raise ValueError(f"U-Net 'features' needs six integers, got {list(features)}")
        super().__init__(config)
        self.net = BasicUNet(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            features=features,
            **options,
        )

    def encode(self, x: torch.Tensor, hook: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stop = self.hook_names.index(self._hook(hook))
        cache: list[torch.Tensor] = []
        hidden = x
        for index, name in enumerate(self.hook_names[: stop + 1]):
            hidden = getattr(self.net, name)(hidden)
            if index < stop:
                cache.append(hidden)
        return hidden, cache

    def decode(self, activations: torch.Tensor, cache: list[torch.Tensor], hook: str | None = None) -> torch.Tensor:
        start = self.hook_names.index(self._hook(hook))
        levels = [*cache, activations]
        hidden = activations
        for name in self.hook_names[start + 1 :]:
            hidden = getattr(self.net, name)(hidden)
            levels.append(hidden)
        x0, x1, x2, x3, x4 = levels
        net = self.net
        u4 = net.upcat_4(x4, x3)
        u3 = net.upcat_3(u4, x2)
        u2 = net.upcat_2(u3, x1)
        u1 = net.upcat_1(u2, x0)
        return net.final_conv(u1)
