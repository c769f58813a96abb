"""Fast re-segmentation after an edit: the layers before the hook point run once per case and are kept.

:class:`CachedForward` runs the segmenter's ``encode`` on every brain slice of a case once and keeps its outputs:
the hook activations and the earlier feature maps that ``decode`` reads again (SegFormer's first stages, which
its all-MLP head reads; the U-Net's skip connections). An edit then costs only ``decode`` -- SegFormer's later
stages and head, or the U-Net's decoder -- and only on the slices whose activations the edit changes: the change
``W_dec^T (z' - z)`` is computed for every cached slice first (a few small products), and slices where it is
exactly zero keep the labels they had.

Labels are produced exactly as :func:`~SegLensLogic.inference.predict_volume` produces them, in the same
batches, so with no edit (or an identity edit) the mask is the unmodified model's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import SegLensError
from ..inference import PredictionCancelled, default_batch_size, labels_from_logits, prepare_for_model
from ..networks.segmenter import Segmenter
from ..sae.activations import brain_fraction_on_grid, mask_fraction_on_grid
from ..sae.model import BatchTopKSAE
from .interventions import LatentEdit, Region, steering_delta


class CachedForward:
    """One case's encoder outputs at a hook point, kept for re-running only the rest of the network.

    Attributes:
        prepared: the preprocessed case.
        slices: RAS axial indices of the cached (brain) slices, ``(S,)``.
        activations: hook activations ``(S, D, h, w)`` (CPU or the model's device).
        cache: the earlier feature maps ``decode`` reads, each ``(S, C_i, H_i, W_i)``.
        brain_fraction: ``(S, h, w)`` share of each feature-map position's patch that is brain; an SAE encodes the
            positions at or above its own ``config.min_brain_fraction`` (:meth:`encoded`).
    """

    def __init__(
        self,
        model: Segmenter,
        case,
        hook: str | None = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], bool | None] | None = None,
    ):
        self.model = model.eval()
        self.hook = model._hook(hook)
        self.prepared = prepare_for_model(model, case)
        self.device = next(model.parameters()).device
        self.batch_size = batch_size or default_batch_size(model)
        self.slices = self.prepared.brain_slices()
        self.slice_position = {int(z): i for i, z in enumerate(self.slices)}
        activations, caches = [], []
        with torch.no_grad():
            for start in range(0, len(self.slices), self.batch_size):
                batch = self.slices[start : start + self.batch_size]
                h, cache = model.encode(self.prepared.model_input(batch).to(self.device), self.hook)
                activations.append(h)
                caches.append(cache)
                if progress is not None and progress(start + len(batch), len(self.slices)) is False:
                    raise PredictionCancelled("segmentation cancelled")
        self.activations = torch.cat(activations) if activations else torch.zeros(0)
        self.cache = [torch.cat(level) for level in zip(*caches)] if caches else []
        grid = tuple(self.activations.shape[2:])
        self.grid = grid
        self.brain_fraction = brain_fraction_on_grid(self.prepared, self.slices, grid).to(self.device)

    def encoded(self, sae: BatchTopKSAE, index: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, h, w)`` float, 1 where ``sae`` encodes a position of the cached slices ``index`` (default all), else 0."""
        fraction = self.brain_fraction if index is None else self.brain_fraction.index_select(0, index)
        return (fraction >= sae.config.min_brain_fraction).float()

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return int(sum(t.numel() * t.element_size() for t in [self.activations, *self.cache]))

    # -- where edits apply ------------------------------------------------------------------------------
    def region_weights(self, sae: BatchTopKSAE, region: Region, positions: np.ndarray | None = None) -> torch.Tensor:
        """How much an edit in ``region`` applies at each position ``sae`` encodes: ``(N, h, w)`` in [0, 1] for the
        cached slices at ``positions`` (indices into :attr:`slices`; default all)."""
        positions = np.arange(len(self.slices)) if positions is None else np.asarray(positions)
        slices = self.slices[positions]
        weights = self.encoded(sae, torch.as_tensor(positions, dtype=torch.long, device=self.device))
        per_slice = region.slice_weights(slices)
        if per_slice is not None:
            weights *= torch.as_tensor(per_slice, device=self.device)[:, None, None]
        if region.kind == "mask":
            ras = self.prepared.orientation.apply(region.mask)
            weights *= mask_fraction_on_grid(ras, self.prepared.geometry, slices, self.grid).to(self.device)
        return weights

    def deltas(self, sae: BatchTopKSAE, edits: Sequence[LatentEdit], positions: np.ndarray | None = None, chunk: int = 64) -> dict[int, torch.Tensor]:
        """The activation change of ``edits`` on each cached slice where it is not exactly zero.

        Returns:
            ``{position: (D, h, w) delta}`` keyed by index into :attr:`slices`.
        """
        positions = np.arange(len(self.slices)) if positions is None else np.asarray(positions)
        out: dict[int, torch.Tensor] = {}
        if not edits:
            return out
        for start in range(0, len(positions), chunk):
            part = positions[start : start + chunk]
            index = torch.as_tensor(part, dtype=torch.long, device=self.device)
            weights = [self.region_weights(sae, edit.region, part) for edit in edits]
            h = self.activations.index_select(0, index)
            delta = steering_delta(sae, h, edits, weights)
            if not torch.isfinite(h + delta).all():
                described = "; ".join(f"{e.mode} latent(s) {list(e.latents)[:5]} by {e.alpha:g}" for e in edits)
                raise SegLensError(f"the edit ({described}) drives the activations beyond float32 (not finite); use a smaller alpha")
            changed = delta.flatten(1).ne(0).any(dim=1).cpu().numpy()
            for i in np.flatnonzero(changed):
                out[int(part[i])] = delta[i]
        return out

    # -- the rest of the network ------------------------------------------------------------------------
    @torch.no_grad()
    def decode_labels(
        self,
        positions: np.ndarray,
        deltas: dict[int, torch.Tensor] | None = None,
        exact_batches: bool = True,
        progress=None,
        probabilities: dict[int, np.ndarray] | None = None,
    ) -> dict[int, np.ndarray]:
        """Labels of cached slices after adding ``deltas`` at the hook.

        Args:
            positions: indices into :attr:`slices`.
            deltas: ``{position: (D, h, w)}`` activation changes (absent: unchanged).
            exact_batches: decode every slice inside its fixed batch (position ``// batch_size``), the batch it
                has in :func:`~SegLensLogic.inference.predict_volume`, so that its labels are the same bits
                whatever else is being re-run; other slices of those batches are returned too. False decodes just
                ``positions`` (a live preview of one slice).
            probabilities: when given, filled with ``{position: float16 (X, Y, K)}`` softmax of the same logits.

        Returns:
            ``{position: uint8 (X, Y)}`` in RAS in-plane order.
        """
        deltas = deltas or {}
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        if exact_batches:
            blocks = np.unique(positions // self.batch_size)
            batches = [np.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(self.slices))) for b in blocks]
        else:
            batches = [positions[i : i + self.batch_size] for i in range(0, len(positions), self.batch_size)]
        out: dict[int, np.ndarray] = {}
        for number, part in enumerate(batches):
            index = torch.as_tensor(part, dtype=torch.long, device=self.device)
            h = self.activations.index_select(0, index)
            edited = [i for i, p in enumerate(part) if int(p) in deltas]
            for i in edited:
                h[i] += deltas[int(part[i])]
            cache = [level.index_select(0, index) for level in self.cache]
            logits = self.model.decode(h, cache, self.hook)
            if edited and not torch.isfinite(logits).all():  # an edit too strong for the layers after the hook
                raise SegLensError("the edit drives the model's output beyond float32 (not finite) on slice(s) "
                                   f"{sorted(int(self.slices[part[i]]) for i in edited)[:5]}; use a smaller alpha")  # fmt: skip
            logits = self.prepared.geometry.from_model(logits.float())
            labels = labels_from_logits(logits)
            for i, p in enumerate(part):
                out[int(p)] = labels[:, :, i]
            if probabilities is not None:
                softmax = torch.softmax(logits, dim=1).cpu().numpy().transpose(0, 2, 3, 1).astype(np.float16)
                for i, p in enumerate(part):
                    probabilities[int(p)] = softmax[i]
            if progress is not None and progress(number + 1, len(batches)) is False:
                raise PredictionCancelled("segmentation cancelled")
        return out

    def relabel(self, labels_ras: np.ndarray, positions, deltas: dict[int, torch.Tensor], exact_batches: bool = True, progress=None) -> np.ndarray:
        """A copy of RAS ``labels_ras`` ``(X, Y, Z)`` with the cached slices at ``positions`` recomputed under
        ``deltas`` (see :meth:`decode_labels`); background stays background outside the brain."""
        out = labels_ras.copy()
        positions = np.asarray(list(positions), dtype=np.int64)
        if len(positions):
            for position, labels in self.decode_labels(positions, deltas, exact_batches, progress).items():
                z = self.slices[position]
                out[:, :, z] = labels * self.prepared.brain_mask[:, :, z]
        return out

    def base_labels_ras(self, progress=None) -> np.ndarray:
        """The unmodified model's labels, RAS order ``(X, Y, Z)`` ``uint8``; background outside the brain."""
        empty = np.zeros(self.prepared.brain_mask.shape, dtype=np.uint8)
        return self.relabel(empty, np.arange(len(self.slices)), {}, progress=progress) if len(self.slices) else empty


def resegment(
    model: Segmenter,
    sae: BatchTopKSAE,
    case,
    edits: Sequence[LatentEdit],
    batch_size: int | None = None,
) -> np.ndarray:
    """Segment ``case`` once with ``edits`` applied at the hook point (encoder once, every brain slice decoded
    once with its change); no faster than a full forward. Repeated edits of one case belong in a
    :class:`~SegLensLogic.steering.SteeringSession`, which keeps the unedited labels and re-runs changed slices only.

    Returns:
        ``uint8`` labels on the input's voxel grid (file order).
    """
    for edit in edits:
        edit.check(sae)
    forward = CachedForward(model, case, hook=sae.config.hook_point, batch_size=batch_size)
    for edit in edits:
        edit.region.check(forward.prepared.num_slices, forward.prepared.source.shape)
    deltas = forward.deltas(sae.to(forward.device), edits)
    empty = np.zeros(forward.prepared.brain_mask.shape, dtype=np.uint8)
    return forward.prepared.to_input_grid(forward.relabel(empty, np.arange(len(forward.slices)), deltas))
