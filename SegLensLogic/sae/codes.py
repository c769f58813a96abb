"""Latent codes of a whole volume, kept sparse, and latent heatmaps on the input's voxel grid.

A case is encoded once: every position of every brain slice's feature map goes through the SAE with its
inference threshold, and only the active latents are kept, in compressed-sparse-row form (about ``k`` index/value
pairs per position instead of ``d_sae`` floats). The heatmap of any latent is built on demand: scatter its
values into the feature grid, upsample bilinearly to the model size, undo the slice resizing and padding, and
reorient to the input file's voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preprocessing import PreparedCase
from ..segmentation.inference import default_batch_size, prepare_for_model
from ..networks.segmenter import Segmenter
from .activations import brain_fraction_on_grid, feature_map_to_vectors, mask_fraction_on_grid
from .model import BatchTopKSAE


@dataclass
class VolumeCodes:
    """Sparse SAE codes of one volume at one hook point.

    Positions are numbered ``p = (s * h + r) * w + c`` for encoded slice number ``s`` (``slices[s]`` in RAS
    order), feature-map row ``r`` and column ``c``.

    Attributes:
        offsets: ``(P + 1,)`` int64; position ``p``'s latents are ``latents[offsets[p]:offsets[p+1]]``.
        latents: ``(nnz,)`` int32 latent ids.
        values: ``(nnz,)`` float32 activations.
        slices: ``(S,)`` RAS axial slice indices that were encoded (the brain slices).
        grid: feature-map ``(h, w)``.
        d_sae: dictionary size.
        prepared: the preprocessed case, for mapping back to the input grid.
    """

    offsets: np.ndarray
    latents: np.ndarray
    values: np.ndarray
    slices: np.ndarray
    grid: tuple[int, int]
    d_sae: int
    prepared: PreparedCase = field(repr=False)

    @property
    def num_positions(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """Memory held by the sparse codes."""
        return int(self.offsets.nbytes + self.latents.nbytes + self.values.nbytes)

    @property
    def dense_nbytes(self) -> int:
        """Memory the same codes would take dense in float32."""
        return int(self.num_positions * self.d_sae * 4)

    def mean_l0(self) -> float:
        return float(len(self.latents) / max(self.num_positions, 1))

    def positions_of(self) -> np.ndarray:
        """Position number of every stored (latent, value) pair, ``(nnz,)``."""
        return np.repeat(np.arange(self.num_positions), np.diff(self.offsets))

    def latent_map(self, latent: int) -> np.ndarray:
        """Activation of ``latent`` on the feature grid of each encoded slice: ``(S, h, w)`` float32."""
        if not 0 <= latent < self.d_sae:
            raise ValueError(f"latent {latent} is out of range for an SAE with {self.d_sae} latents")
        out = np.zeros(self.num_positions, dtype=np.float32)
        hits = np.flatnonzero(self.latents == latent)
        out[self.positions_of_pairs(hits)] = self.values[hits]
        return out.reshape(len(self.slices), *self.grid)

    def positions_of_pairs(self, pairs: np.ndarray) -> np.ndarray:
        """Position numbers of the stored pairs ``pairs`` (indices into ``latents``)."""
        return np.searchsorted(self.offsets, pairs, side="right") - 1

    def heatmap(self, latent: int) -> np.ndarray:
        """Heatmap of ``latent`` on the input's voxel grid (file order), float32, 0 outside encoded slices.

        The feature map is upsampled bilinearly to the model size, then mapped through the slice geometry's
        inverse (resize, un-pad) and the reorientation, exactly like the segmentation.
        """
        prepared = self.prepared
        maps = upsample_to_slices(torch.from_numpy(self.latent_map(latent)), prepared.geometry).numpy()  # (S, X, Y)
        volume = np.zeros(prepared.brain_mask.shape, dtype=np.float32)
        volume[:, :, self.slices] = maps.transpose(1, 2, 0)
        return prepared.to_input_grid(volume)

    def heatmap_mass(self, regions: np.ndarray, num_regions: int, chunk: int = 32) -> np.ndarray:
        """Every latent's heatmap mass on each region of a label map: ``(d_sae, num_regions + 1)`` float64, column
        ``r`` the sum of :meth:`heatmap` over voxels labelled ``r``, the last column the heatmap's whole sum.

        Exact and without drawing any heatmap: a heatmap is linear in the feature-grid values (bilinear upsampling,
        slice resizing, un-padding, reorientation), so a region's mass is each position's value times the region's
        weight for that position, the adjoint of the upsampling applied to the region's indicator.

        Args:
            regions: ``(X, Y, Z)`` integer labels in RAS order (the prepared case's grid, e.g. ``prepared.label``).
            num_regions: labels ``0 .. num_regions - 1`` are counted; others only in the whole sum.
        """
        prepared = self.prepared
        if regions.shape != prepared.brain_mask.shape:
            raise ValueError(f"regions of shape {regions.shape} are not on the case's RAS grid {prepared.brain_mask.shape}")
        per_slice = self.grid[0] * self.grid[1]
        weights = np.zeros((num_regions + 1, self.num_positions))
        for start in range(0, len(self.slices), chunk):
            part = self.slices[start : start + chunk]
            grid = torch.zeros(len(part), *self.grid, requires_grad=True)
            with torch.enable_grad():
                maps = upsample_to_slices(grid, prepared.geometry)  # (s, X, Y)
                labels = torch.from_numpy(np.ascontiguousarray(regions[:, :, part].transpose(2, 0, 1)))
                targets = [maps[labels == r].sum() for r in range(num_regions)] + [maps.sum()]
                for r, target in enumerate(targets):
                    (weight,) = torch.autograd.grad(target, grid, retain_graph=r < num_regions)
                    weights[r, start * per_slice : (start + len(part)) * per_slice] = weight.reshape(-1).numpy()
        at = self.positions_of()
        return np.stack([np.bincount(self.latents, weights=self.values * w[at], minlength=self.d_sae) for w in weights], axis=1)

    def region_weights(self, region: np.ndarray | None = None, slice_range: tuple[int, int] | None = None) -> np.ndarray:
        """Weight in [0, 1] of every position for a region: ``(P,)``.

        Args:
            region: boolean mask on the input grid (file order); a position's weight is the fraction of its patch
                inside the mask.
            slice_range: ``[start, stop)`` of axial slices in RAS order; positions of those slices weigh 1.
        """
        weights = np.ones((len(self.slices), *self.grid), dtype=np.float32)
        if slice_range is not None:
            inside = (self.slices >= slice_range[0]) & (self.slices < slice_range[1])
            weights[~inside] = 0
        if region is not None:
            ras = self.prepared.orientation.apply(np.asarray(region, dtype=bool))
            if ras.shape != self.prepared.brain_mask.shape:
                raise ValueError(f"region of shape {region.shape} is not on the case's grid {self.prepared.source.shape}")
            weights *= mask_fraction_on_grid(ras, self.prepared.geometry, self.slices, self.grid).numpy()
        return weights.reshape(-1)

    def top_latents(self, k: int = 10, region: np.ndarray | None = None, slice_range: tuple[int, int] | None = None) -> list[tuple[int, float]]:
        """The ``k`` latents with the largest summed activation over a region: ``[(latent, total), ...]``."""
        weights = self.region_weights(region, slice_range)
        totals = np.bincount(self.latents, weights=self.values * weights[self.positions_of()], minlength=self.d_sae)
        order = np.argsort(-totals)[:k]
        return [(int(j), float(totals[j])) for j in order if totals[j] > 0]

    def latent_frequency(self) -> np.ndarray:
        """Fraction of positions where each latent is active, ``(d_sae,)``."""
        return np.bincount(self.latents, minlength=self.d_sae) / max(self.num_positions, 1)

    def dense(self, slice_number: int) -> np.ndarray:
        """Dense codes of one encoded slice ``(h*w, d_sae)`` (for tests and small edits)."""
        per_slice = self.grid[0] * self.grid[1]
        start, stop = slice_number * per_slice, (slice_number + 1) * per_slice
        out = np.zeros((per_slice, self.d_sae), dtype=np.float32)
        lo, hi = self.offsets[start], self.offsets[stop]
        rows = self.positions_of()[lo:hi] - start
        out[rows, self.latents[lo:hi]] = self.values[lo:hi]
        return out


def upsample_to_slices(maps: torch.Tensor, geometry) -> torch.Tensor:
    """Feature-grid maps ``(N, h, w)`` -> ``(N, X, Y)`` on their slices (RAS), as every heatmap is drawn: bilinear
    to the model size, then the slice geometry's inverse (resize, un-pad). Linear in ``maps``."""
    maps = F.interpolate(maps[:, None], size=(geometry.size, geometry.size), mode="bilinear", align_corners=False)
    return geometry.from_model(maps)[:, 0]


@torch.no_grad()
def encode_volume(
    model: Segmenter,
    sae: BatchTopKSAE,
    case,
    hook: str | None = None,
    batch_size: int | None = None,
    brain_only: bool = True,
    min_brain_fraction: float | None = None,
) -> VolumeCodes:
    """Encode every brain slice of ``case`` with ``sae`` at ``hook`` (default: the SAE's hook point).

    Args:
        model: the segmenter the SAE was trained on.
        sae: a trained SAE with an inference threshold.
        case: a case folder, :class:`Case`, :class:`CaseImages` or :class:`PreparedCase`.
        brain_only: leave positions whose patch is less than ``min_brain_fraction`` brain without codes, as
            extraction does by default: the SAE and its threshold never saw background vectors, on which many
            latents fire spuriously.
        min_brain_fraction: default the SAE's own (``sae.config.min_brain_fraction``).
    """
    hook = sae.check_fits(model, hook)
    _, height, width = model.hook_points()[hook]
    sae.inference_threshold()  # an SAE without an inference threshold cannot encode: say so before reading the case
    prepared = prepare_for_model(model, case)
    device = next(model.parameters()).device
    model.eval()
    batch_size = batch_size or default_batch_size(model)
    slices = prepared.brain_slices()
    encoder = SparseEncoder(sae.to(device), prepared, (height, width), brain_only, min_brain_fraction)
    for start in range(0, len(slices), batch_size):
        batch = slices[start : start + batch_size]
        # Only the encoder up to the hook: the rest of the network is not needed for codes.
        activations, _ = model.encode(prepared.model_input(batch).to(device), hook, with_cache=False)
        encoder.add(activations, batch)
    return encoder.finish()


class SparseEncoder:
    """Accumulates the sparse codes of a volume's slices, batch by batch, into :class:`VolumeCodes`.

    Used by :func:`encode_volume` and by the steering session, which encodes activations it has cached anyway.
    """

    def __init__(self, sae: BatchTopKSAE, prepared: PreparedCase, grid: tuple[int, int], brain_only: bool = True,
                 min_brain_fraction: float | None = None):
        self.sae, self.prepared, self.grid = sae, prepared, grid
        self.brain_only = brain_only
        self.min_brain_fraction = sae.config.min_brain_fraction if min_brain_fraction is None else min_brain_fraction
        sae.inference_threshold()  # an SAE without one cannot encode: say so before any slice is read
        self.counts: list[np.ndarray] = []
        self.latents: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.slices: list[np.ndarray] = []

    @torch.no_grad()
    def add(self, activations: torch.Tensor, slices: np.ndarray) -> None:
        """Encode the hook activations ``(N, D, h, w)`` of RAS axial ``slices`` ``(N,)``, in slice order."""
        pre = self.sae.pre_activations(feature_map_to_vectors(activations).to(self.sae.W_enc.device))
        active = self.sae.active(pre)
        if self.brain_only:
            inside = brain_fraction_on_grid(self.prepared, slices, self.grid).flatten().to(pre.device) >= self.min_brain_fraction
            active &= inside[:, None]
        rows, cols = torch.nonzero(active, as_tuple=True)  # row-major: grouped by position
        self.counts.append(active.sum(dim=1).cpu().numpy())
        self.latents.append(cols.to(torch.int32).cpu().numpy())
        self.values.append(pre[rows, cols].float().cpu().numpy())
        self.slices.append(np.asarray(slices))

    def finish(self) -> VolumeCodes:
        count = np.concatenate(self.counts) if self.counts else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(count) + 1, dtype=np.int64)
        np.cumsum(count, out=offsets[1:])
        return VolumeCodes(
            offsets=offsets,
            latents=np.concatenate(self.latents) if self.latents else np.zeros(0, dtype=np.int32),
            values=np.concatenate(self.values) if self.values else np.zeros(0, dtype=np.float32),
            slices=np.concatenate(self.slices) if self.slices else np.zeros(0, dtype=np.int64),
            grid=self.grid,
            d_sae=self.sae.d_sae,
            prepared=self.prepared,
        )


def save_heatmap(codes: VolumeCodes, latent: int, path: str | Path, overwrite: bool = False) -> Path:
    """Write the heatmap of ``latent`` as NIfTI on the case's exact voxel grid."""
    from ..data.io import write_image

    return write_image(codes.heatmap(latent), codes.prepared.source.reference, path, overwrite=overwrite, dtype=np.float32)
