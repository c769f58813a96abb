"""2D U-Net from MONAI (``BasicUNet``): five encoder levels, four decoder levels with skip connections.

Hook points are the encoder levels ``conv_0`` (full resolution), ``down_1`` ... ``down_4`` (1/16), and the decoder
levels ``up_4`` (1/8, after the first up-convolution and its skip) ... ``up_1`` (full resolution, before the output
convolution). The decoder reads every encoder level through its skip connections, so
:meth:`UNetSegmenter.encode` keeps in its cache what the layers after the hook still read of those skips.

Each decoder level's first convolution reads the concatenation ``[skip, up(x)]``. A convolution is linear in its
input channels, so it is computed as two: ``conv_skip(skip) + conv_up(up(x))``. The skip's term does not depend on
anything after the hook, so the cache keeps it instead of the skip (same size): re-running the decoder after an
edit skips about a third of its operations. ``forward`` computes the same two terms, so the cached and the full
paths give the same bits; against MONAI's ``BasicUNet.forward`` the logits differ by float rounding (~1e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def encode(self, x: torch.Tensor, hook: str | None = None, with_cache: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder (and, for a decoder hook, the decoder levels before it) up to ``hook``.

        Returns:
            ``(activations, cache)``: the cache holds, for each encoder level that a decoder level after the hook
            reads as its skip, that skip's term of the decoder level's first convolution (:meth:`_skip_term`),
            finest first; empty with ``with_cache=False``.
        """
        hook = self._hook(hook)
        levels: list[torch.Tensor] = []
        hidden = x
        for name in self._encoder:
            hidden = getattr(self.net, name)(hidden)
            if name == hook:
                return hidden, (self._skip_terms(levels) if with_cache else [])
            levels.append(hidden)
        terms = self._skip_terms(levels[:-1])  # the deepest level is upsampled, not a skip
        for name, _block, skip in self._decoder:
            hidden = self._up(skip, hidden, terms[skip])
            if name == hook:
                return hidden, (terms[:skip] if with_cache else [])  # the skips the remaining decoder levels read
        raise AssertionError(hook)

    def decode(self, activations: torch.Tensor, cache: list[torch.Tensor], hook: str | None = None) -> torch.Tensor:
        hook = self._hook(hook)
        hidden = activations
        terms = list(cache)
        if hook in self._encoder:
            levels = [activations]
            for name in self._encoder[self._encoder.index(hook) + 1 :]:
                hidden = getattr(self.net, name)(hidden)
                levels.append(hidden)
            terms += self._skip_terms(levels[:-1], first=len(terms))  # the deepest level is upsampled, not a skip
            remaining = self._decoder
        else:
            remaining = self._decoder[[name for name, _, _ in self._decoder].index(hook) + 1 :]
        for _name, block, skip in remaining:
            hidden = self._up(skip, hidden, terms[skip])
        return self.net.final_conv(hidden)

    def encode_cache(self, x: torch.Tensor, hook: str | None = None, count: int | None = None) -> list[torch.Tensor]:
        # Every hook's cache starts with the skip terms of encoder levels 0, 1, ...: only those levels run.
        hook = self._hook(hook)
        # an encoder hook's cache holds the levels before it; a decoder hook's, the skips still to be read
        full = self._encoder.index(hook) if hook in self._encoder else dict((n, skip) for n, _, skip in self._decoder)[hook]
        count = full if count is None else min(count, full)
        levels, hidden = [], x
        for name in self._encoder[:count]:
            hidden = getattr(self.net, name)(hidden)
            levels.append(hidden)
        return self._skip_terms(levels)

    # -- a decoder level's first convolution, split between its skip and its upsampled input ---------------
    def _first_conv(self, level: int):
        """The first convolution (and its norm and activation) of the decoder level that reads encoder ``level``."""
        block = getattr(self.net, f"upcat_{level + 1}")
        first = block.convs.conv_0
        conv = first.conv
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"U-Net upcat_{level + 1}: a grouped or non-zero-padded convolution cannot be split")
        return block, conv, first.adn

    def _skip_term(self, level: int, skip: torch.Tensor) -> torch.Tensor:
        """``(N, C_out, H, W)``: encoder ``level``'s share of its decoder level's first convolution, with the bias."""
        _block, conv, _adn = self._first_conv(level)
        weight = conv.weight[:, : skip.shape[1]]
        return F.conv2d(skip, weight, conv.bias, conv.stride, conv.padding, conv.dilation)

    def _skip_terms(self, skips: list[torch.Tensor], first: int = 0) -> list[torch.Tensor]:
        return [self._skip_term(first + i, skip) for i, skip in enumerate(skips)]

    def _up(self, level: int, hidden: torch.Tensor, skip_term: torch.Tensor) -> torch.Tensor:
        """The decoder level (MONAI ``UpCat``) that reads encoder ``level``, from the level below and the skip's term."""
        block, conv, adn = self._first_conv(level)
        up = _upsample(block.upsample, hidden)
        if block.is_pad and up.shape[-2:] != skip_term.shape[-2:]:
            # as UpCat: pad by one on the far side where 2x max-pooling of an odd side lost a row or column
            up = F.pad(up, [0, int(skip_term.shape[-1] != up.shape[-1]), 0, int(skip_term.shape[-2] != up.shape[-2])], "replicate")
        weight = conv.weight[:, conv.in_channels - up.shape[1] :]
        hidden = skip_term + F.conv2d(up, weight, None, conv.stride, conv.padding, conv.dilation)
        return block.convs.conv_1(adn(hidden))


def _upsample(upsample: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``upsample(hidden)``, contiguous. On the CPU the transposed convolution reads a channels-last copy of its
    input: PyTorch's kernel for that layout gives the same bits about ten times faster at full resolution (13 ms
    against 1.5 ms for 32 channels at 256 x 256 on 2 cores), the layout change and the copy back included."""
    if hidden.device.type == "cpu":
        return upsample(hidden.contiguous(memory_format=torch.channels_last)).contiguous()
    return upsample(hidden)
