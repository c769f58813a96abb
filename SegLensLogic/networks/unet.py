"""2D U-Net from MONAI (``BasicUNet``): five encoder levels, four decoder levels with skip connections.

Hook points are the encoder levels ``conv_0`` (full resolution), ``down_1`` ... ``down_4`` (1/16), and the decoder
levels ``up_4`` (1/8, after the first up-convolution and its skip) ... ``up_1`` (full resolution, before the output
convolution). The decoder reads every encoder level through its skip connections, so
:meth:`UNetSegmenter.encode` keeps in its cache the skips that the layers after the hook still read.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet

from .segmenter import Segmenter, SegmenterConfig

DEFAULT_FEATURES = (32, 32, 64, 128, 256, 32)


class UNetSegmenter(Segmenter):
    """MONAI ``BasicUNet`` (instance norm, transposed-convolution upsampling). Input side: multiple of 16."""

    hook_names = ("conv_0", "down_1", "down_2", "down_3", "down_4", "up_4", "up_3", "up_2", "up_1")
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

    # Decoder levels in order, each with the encoder level its skip connection reads.
    _decoder = (("up_4", "upcat_4", 3), ("up_3", "upcat_3", 2), ("up_2", "upcat_2", 1), ("up_1", "upcat_1", 0))
    _encoder = ("conv_0", "down_1", "down_2", "down_3", "down_4")

    def encode(self, x: torch.Tensor, hook: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hook = self._hook(hook)
        levels: list[torch.Tensor] = []
        hidden = x
        for name in self._encoder:
            hidden = getattr(self.net, name)(hidden)
            levels.append(hidden)
            if name == hook:
                return hidden, levels[:-1]
        for name, block, skip in self._decoder:
            hidden = getattr(self.net, block)(hidden, levels[skip])
            if name == hook:
                return hidden, levels[:skip]  # the skips the remaining decoder levels read
        raise AssertionError(hook)

    def decode(self, activations: torch.Tensor, cache: list[torch.Tensor], hook: str | None = None) -> torch.Tensor:
        hook = self._hook(hook)
        hidden = activations
        if hook in self._encoder:
            levels = [*cache, activations]
            for name in self._encoder[self._encoder.index(hook) + 1 :]:
                hidden = getattr(self.net, name)(hidden)
                levels.append(hidden)
            remaining = self._decoder
        else:
            levels = list(cache)
            remaining = self._decoder[[name for name, _, _ in self._decoder].index(hook) + 1 :]
        for _name, block, skip in remaining:
            hidden = getattr(self.net, block)(hidden, levels[skip])
        return self.net.final_conv(hidden)
