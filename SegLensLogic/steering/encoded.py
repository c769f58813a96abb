"""A case encoded once: everything steering, experiments, Dice recovered and interpretation read from a case.

:func:`encode_case` runs the segmenter's layers before the hook point once over the case's brain slices
(:class:`~SegLensLogic.steering.resegment.CachedForward`), encodes the cached hook activations with the SAE
(sparse codes, :class:`~SegLensLogic.sae.codes.VolumeCodes`) and decodes every slice once for the unedited labels
(and softmax probabilities when asked). The :class:`EncodedCase` it returns is passed on: nothing encodes the same
case twice. Its labels are bit for bit those of :func:`~SegLensLogic.segmentation.inference.predict_volume`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..networks.segmenter import Segmenter
from ..sae.activations import feature_map_to_vectors
from ..sae.codes import SparseEncoder, VolumeCodes
from ..sae.model import SparseDictionary
from .interventions import LatentEdit
from ..segmentation.inference import PredictionCancelled
from .resegment import DEFAULT_CACHE_MB, CachedForward

# Slices encoded per SAE call (bounds the dense pre-activations: 64 x h x w x d_sae floats).
_ENCODE_CHUNK = 64


@dataclass
class EncodedCase:
    """One case after one pass of the encoder: cached activations, sparse codes, unedited labels.

    Attributes:
        forward: the cached encoder outputs (``forward.prepared`` is the preprocessed case).
        codes: sparse SAE codes of every encoded position.
        labels_ras: the unedited labels ``uint8 (X, Y, Z)`` in RAS order, background outside the brain.
        probabilities: softmax ``float16 (K, I, J, K')`` on the input grid when requested, else None.
    """

    forward: CachedForward = field(repr=False)
    codes: VolumeCodes = field(repr=False)
    labels_ras: np.ndarray = field(repr=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)

    @property
    def prepared(self):
        return self.forward.prepared

    @property
    def case_id(self) -> str:
        return self.prepared.source.case_id

    @property
    def labels(self) -> np.ndarray:
        """The unedited labels on the input's voxel grid (file order)."""
        return self.prepared.to_input_grid(self.labels_ras)

    def activation_vectors(self, sae: SparseDictionary) -> torch.Tensor:
        """``(P, d_in)`` float32 hook activations at the positions ``sae`` encodes (its minimum brain fraction),
        slice by slice in row-major order: the vectors an activation store of this case holds, without a second
        pass of the encoder."""
        keep = self.forward.encoded(sae).flatten() > 0
        return feature_map_to_vectors(self.forward.activations)[keep.to(self.forward.activations.device)].float().cpu()

    def steer_ras(self, sae: SparseDictionary, edits: Sequence[LatentEdit], base_ras: np.ndarray | None = None,
                  progress: Callable[[int, int], bool | None] | None = None) -> np.ndarray:  # fmt: skip
        """RAS labels with ``edits`` applied (from ``base_ras``, default the unedited labels): only the slices
        whose activations change are decoded again (``progress(batches_done, batches_total)``; False cancels)."""
        deltas = self.forward.deltas(sae, list(edits))
        base = self.labels_ras if base_ras is None else base_ras
        return self.forward.relabel(base, list(deltas), deltas, progress=progress)

    def steer(self, sae: SparseDictionary, edits: Sequence[LatentEdit]) -> np.ndarray:
        """Labels with ``edits`` applied, on the input's voxel grid."""
        return self.prepared.to_input_grid(self.steer_ras(sae, edits))


@torch.no_grad()
def encode_case(
    model: Segmenter,
    sae: SparseDictionary,
    case,
    probabilities: bool = False,
    batch_size: int | None = None,
    progress: Callable[[int, int], bool | None] | None = None,
    cache_mb: float | None = DEFAULT_CACHE_MB,
) -> EncodedCase:
    """Run ``case`` once through the layers before the SAE's hook point, encode it, and decode it unedited.

    Args:
        model: the segmenter; sae: the SAE at one of its hook points (with an inference threshold).
        case: a case folder, :class:`~SegLensLogic.data.Case`, ``CaseImages`` or ``PreparedCase``.
        probabilities: also keep the softmax on the input grid (for uncertainty filtering).
        progress: ``progress(done, total)`` over both halves (the model over the slices, then the latent codes); False cancels.
        cache_mb: the most the kept encoder outputs may hold (:class:`~SegLensLogic.steering.resegment.CachedForward`).
    """
    hook = sae.check_fits(model)
    sae.inference_threshold()  # an SAE without an inference threshold cannot encode: say so before reading the case
    # One pass: each batch is encoded, decoded unedited and kept (the unedited labels need the whole cache, which a
    # cache budget may not keep).
    base: dict[int, np.ndarray] = {}
    softmax: dict[int, np.ndarray] | None = {} if probabilities else None
    report = None
    if progress is not None:
        report = lambda done, total: progress(done, 2 * total)  # noqa: E731  (the model: first half)
    forward = CachedForward(model, case, hook=hook, batch_size=batch_size, progress=report, cache_mb=cache_mb,
                            base_labels=base, base_probabilities=softmax)  # fmt: skip
    sae = sae.to(forward.device)
    encoder = SparseEncoder(sae, forward.prepared, forward.grid)
    total = len(forward.slices)
    for start in range(0, total, _ENCODE_CHUNK):
        encoder.add(forward.activations[start : start + _ENCODE_CHUNK], forward.slices[start : start + _ENCODE_CHUNK])
        if progress is not None and progress(total + min(start + _ENCODE_CHUNK, total), 2 * total) is False:  # the codes: second half
            raise PredictionCancelled("segmentation cancelled")
    prepared = forward.prepared
    labels_ras = np.zeros(prepared.brain_mask.shape, dtype=np.uint8)
    for position, labels in base.items():
        z = forward.slices[position]
        labels_ras[:, :, z] = labels * prepared.brain_mask[:, :, z]
    volume = None
    if softmax is not None:
        classes = model.config.num_classes
        ras = np.zeros((*prepared.brain_mask.shape, classes), dtype=np.float16)
        ras[..., 0] = 1.0
        for position, values in softmax.items():
            ras[:, :, forward.slices[position], :] = values
        ras[~prepared.brain_mask] = np.eye(classes, dtype=np.float16)[0]
        volume = np.moveaxis(prepared.to_input_grid(ras), 3, 0)
    return EncodedCase(forward=forward, codes=encoder.finish(), labels_ras=labels_ras, probabilities=volume)
