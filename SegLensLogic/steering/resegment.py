"""Fast re-segmentation after an edit: the layers before the hook point run once per case and are kept.

:class:`CachedForward` runs the segmenter's ``encode`` on every brain slice of a case once and keeps its outputs:
the hook activations and what ``decode`` reads of the earlier layers (SegFormer's first stages, which its all-MLP
head reads; the U-Net's skip connections as their terms of the decoder convolutions that read them). An edit then
costs only ``decode`` -- SegFormer's later stages and head, or the rest of the U-Net's decoder -- and only on the
slices whose activations the edit changes: the change
``W_dec^T (z' - z)`` is computed for every cached slice first (a few small products), and slices where it is
exactly zero keep the labels they had.

Labels are produced exactly as :func:`~SegLensLogic.segmentation.inference.predict_volume` produces them, in the same
batches, so with no edit (or an identity edit) the mask is the unmodified model's, bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import SegLensError
from ..segmentation.inference import PredictionCancelled, default_batch_size, labels_from_logits, prepare_for_model
from ..networks.segmenter import Segmenter
from ..sae.activations import brain_fraction_on_grid, mask_fraction_on_grid
from ..sae.model import SparseDictionary
from .interventions import LatentEdit, Region, steering_delta


# What a case's cache may hold by default (activations and what decode reads of earlier layers), in MB: a U-Net at
# 256 px would keep 12 MB a slice, 1.7 GB for a 138-slice case; within this its finest skip is recomputed instead.
DEFAULT_CACHE_MB = 600.0
# At most this many fixed batches' recomputed levels are kept besides (within the budget).
RECENT_BLOCKS = 8


class CachedForward:
    """One case's encoder outputs at a hook point, kept for re-running only the rest of the network.

    Args:
        model, case: the segmenter and the case (anything :func:`~SegLensLogic.segmentation.inference.prepare_for_model` takes).
        hook: the hook point (default: the model's).
        batch_size: slices per forward pass (default: the model's on this device).
        progress: ``progress(done, total)`` while encoding; returning False cancels.
        base_labels, base_probabilities: when given, filled as :meth:`decode_labels` fills its output (the unedited
            labels and softmax, the same bits) while the case is encoded, in the same pass.
        cache_mb: the most the cache may hold, in MB (None: no limit). When everything would not fit, the finest
            entries of the model's cache (the U-Net's full-resolution skip) are not kept but recomputed from the
            input slices whenever slices are decoded: the same bits, a little slower (:attr:`recomputed`).

    Attributes:
        prepared: the preprocessed case.
        slices: RAS axial indices of the cached (brain) slices, ``(S,)``.
        activations: hook activations ``(S, D, h, w)`` (CPU or the model's device).
        cache: the kept entries of what ``decode`` reads of the earlier layers (:meth:`Segmenter.encode`), each
            ``(S, C_i, H_i, W_i)``; the first :attr:`recomputed` entries are not among them.
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
        cache_mb: float | None = DEFAULT_CACHE_MB,
        base_labels: dict[int, np.ndarray] | None = None,
        base_probabilities: dict[int, np.ndarray] | None = None,
    ):
        self.model = model.eval()
        self.hook = model._hook(hook)
        self.prepared = prepare_for_model(model, case)
        self.device = next(model.parameters()).device
        self.batch_size = batch_size or default_batch_size(model)
        self.slices = self.prepared.brain_slices()
        self.slice_position = {int(z): i for i, z in enumerate(self.slices)}
        self.recomputed = 0
        # The recomputed levels of the last few fixed batches re-run, kept while the budget has room: a slider
        # previewing one slice again and again recomputes them once.
        self._recent: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._recent_blocks = 0
        self.activations, self.cache = torch.zeros(0), []
        n = len(self.slices)
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                batch = self.slices[start : start + self.batch_size]
                h, cache = model.encode(self.prepared.model_input(batch).to(self.device), self.hook)
                if start == 0:  # sizes known: choose what to keep, and allocate it once (no second copy to concatenate)
                    self.recomputed, self._recent_blocks = _cache_plan(h, cache, n, self.batch_size, cache_mb)
                    self.activations = h.new_empty((n, *h.shape[1:]))
                    self.cache = [level.new_empty((n, *level.shape[1:])) for level in cache[self.recomputed :]]
                self.activations[start : start + len(batch)] = h
                for kept, level in zip(self.cache, cache[self.recomputed :]):
                    kept[start : start + len(batch)] = level
                if base_labels is not None:  # decoded now, while the whole cache of this batch is at hand
                    self._labels_of(np.arange(start, start + len(batch)), self.model.decode(h, cache, self.hook), base_labels, base_probabilities)
                del h, cache
                if progress is not None and progress(start + len(batch), n) is False:
                    raise PredictionCancelled("segmentation cancelled")
        grid = tuple(self.activations.shape[2:])
        self.grid = grid
        self.brain_fraction = brain_fraction_on_grid(self.prepared, self.slices, grid).to(self.device)

    def decoder_inputs(self, index: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(activations, cache)`` of the cached slices at ``index`` (positions into :attr:`slices`), as
        ``decode`` takes them. The entries not kept are recomputed from the input slices, each in the fixed batch
        it was first computed in (a convolution's rounding depends on the batch), so they are the same bits."""
        h = self.activations.index_select(0, index)
        cache = [level.index_select(0, index) for level in self.cache]
        if self.recomputed:
            positions = index.cpu().numpy()
            parts: dict[int, list[torch.Tensor]] = {}
            for block in (int(b) for b in np.unique(positions // self.batch_size)):
                if block in self._recent:
                    self._recent.move_to_end(block)
                    parts[block] = self._recent[block]
                    continue
                batch = np.arange(block * self.batch_size, min((block + 1) * self.batch_size, len(self.slices)))
                x = self.prepared.model_input(self.slices[batch]).to(self.device)
                parts[block] = self.model.encode_cache(x, self.hook, self.recomputed)
                if self._recent_blocks:
                    self._recent[block] = parts[block]
                    while len(self._recent) > self._recent_blocks:
                        self._recent.popitem(last=False)
            finest = [torch.stack([parts[int(p) // self.batch_size][level][int(p) % self.batch_size] for p in positions])
                      for level in range(self.recomputed)]  # fmt: skip
            cache = finest + cache
        return h, cache

    def encoded(self, sae: SparseDictionary, index: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, h, w)`` float, 1 where ``sae`` encodes a position of the cached slices ``index`` (default all), else 0."""
        fraction = self.brain_fraction if index is None else self.brain_fraction.index_select(0, index)
        return (fraction >= sae.config.min_brain_fraction).float()

    @property
    def nbytes(self) -> int:
        """Memory held by the cache (activations, the kept entries, the recent recomputed ones)."""
        recent = [t for levels in self._recent.values() for t in levels]
        return int(sum(t.numel() * t.element_size() for t in [self.activations, *self.cache, *recent]))

    # -- where edits apply ------------------------------------------------------------------------------
    def region_weights(self, sae: SparseDictionary, region: Region, positions: np.ndarray | None = None) -> torch.Tensor:
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

    def deltas(self, sae: SparseDictionary, edits: Sequence[LatentEdit], positions: np.ndarray | None = None, chunk: int = 64) -> dict[int, torch.Tensor]:
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
                has in :func:`~SegLensLogic.segmentation.inference.predict_volume`, so that its labels are the same bits
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
            h, cache = self.decoder_inputs(index)
            edited = [i for i, p in enumerate(part) if int(p) in deltas]
            for i in edited:
                h[i] += deltas[int(part[i])]
            logits = self.model.decode(h, cache, self.hook)
            if edited and not torch.isfinite(logits).all():  # an edit too strong for the layers after the hook
                raise SegLensError("the edit drives the model's output beyond float32 (not finite) on slice(s) "
                                   f"{sorted(int(self.slices[part[i]]) for i in edited)[:5]}; use a smaller alpha")  # fmt: skip
            self._labels_of(part, logits, out, probabilities)
            if progress is not None and progress(number + 1, len(batches)) is False:
                raise PredictionCancelled("segmentation cancelled")
        return out

    def _labels_of(self, part: np.ndarray, logits: torch.Tensor, out: dict[int, np.ndarray], probabilities: dict[int, np.ndarray] | None) -> None:
        """Fill ``out`` (and ``probabilities``) for cached slices ``part`` from their logits ``(len(part), K, S, S)``."""
        logits = self.prepared.geometry.from_model(logits.float())
        labels = labels_from_logits(logits)
        for i, p in enumerate(part):
            out[int(p)] = labels[:, :, i]
        if probabilities is not None:
            softmax = torch.softmax(logits, dim=1).cpu().numpy().transpose(0, 2, 3, 1).astype(np.float16)
            for i, p in enumerate(part):
                probabilities[int(p)] = softmax[i]

    def relabel(self, labels_ras: np.ndarray, positions, deltas: dict[int, torch.Tensor], exact_batches: bool = True, progress=None) -> np.ndarray:
        """A copy of RAS ``labels_ras`` ``(X, Y, Z)`` with the cached slices at ``positions`` recomputed under
        ``deltas`` (see :meth:`decode_labels`); background stays background outside the brain."""
        out = labels_ras.copy()
        self.write_slices(out, positions, deltas, exact_batches, progress)
        return out

    def write_slices(self, out_ras: np.ndarray, positions, deltas: dict[int, torch.Tensor], exact_batches: bool = True, progress=None) -> None:
        """Write into RAS ``out_ras`` ``(X, Y, Z)`` (an array or a view) the labels of the cached slices at
        ``positions`` under ``deltas`` (see :meth:`decode_labels`); background stays background outside the brain."""
        positions = np.asarray(list(positions), dtype=np.int64)
        if len(positions):
            for position, labels in self.decode_labels(positions, deltas, exact_batches, progress).items():
                z = self.slices[position]
                out_ras[:, :, z] = labels * self.prepared.brain_mask[:, :, z]

    def slice_labels(self, position: int, deltas: dict[int, torch.Tensor]) -> np.ndarray:
        """Labels ``(X, Y)`` of the cached slice at ``position`` under ``deltas``, decoded alone (a preview);
        background outside the brain."""
        labels = self.decode_labels(np.array([position], dtype=np.int64), deltas, exact_batches=False)[position]
        return labels * self.prepared.brain_mask[:, :, self.slices[position]]

    def base_labels_ras(self, progress=None) -> np.ndarray:
        """The unmodified model's labels, RAS order ``(X, Y, Z)`` ``uint8``; background outside the brain."""
        empty = np.zeros(self.prepared.brain_mask.shape, dtype=np.uint8)
        return self.relabel(empty, np.arange(len(self.slices)), {}, progress=progress) if len(self.slices) else empty


def resegment(
    model: Segmenter,
    sae: SparseDictionary,
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


def _cache_plan(activations: torch.Tensor, cache: list[torch.Tensor], slices: int, batch_size: int, cache_mb: float | None) -> tuple[int, int]:
    """What a cache of ``slices`` slices keeps within ``cache_mb`` (sizes from one batch of ``(B, ...)`` tensors).

    Returns:
        ``(recomputed, recent)``: how many of the finest cache entries are not kept (all of them when nothing else
        fits), and how many fixed batches of those recomputed entries the rest of the budget holds (at most
        :data:`RECENT_BLOCKS`).
    """
    if cache_mb is None:
        return 0, 0
    per_slice = [t[0].numel() * t.element_size() for t in cache]
    budget, base = cache_mb * 1e6, activations[0].numel() * activations.element_size()
    recomputed = next((dropped for dropped in range(len(cache) + 1) if slices * (base + sum(per_slice[dropped:])) <= budget), len(cache))
    if not recomputed:
        return 0, 0
    room = budget - slices * (base + sum(per_slice[recomputed:]))
    return recomputed, int(min(RECENT_BLOCKS, max(0.0, room) // (batch_size * sum(per_slice[:recomputed]))))
