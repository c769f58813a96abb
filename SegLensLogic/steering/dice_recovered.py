"""Evaluating an SAE: reconstruction quality on held-out vectors and "Dice recovered" on whole cases.

Dice recovered: the segmentation is decoded twice from one pass of the encoder, once unmodified and once with the
SAE's reconstruction replacing the real activations at the hook point (no error term); both are scored against
the ground truth. A faithful SAE keeps the Dice of the unmodified model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.cases import read_case
from ..data.cohort import Cohort
from ..errors import SegLensError
from ..segmentation.scores import segmentation_scores
from ..networks.segmenter import Segmenter
from ..sae.activations import feature_map_to_vectors, vectors_to_feature_map
from ..sae.model import BatchTopKSAE


def reconstruction_edit(sae: BatchTopKSAE) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
    """An ``activation_edit`` for :func:`~SegLensLogic.segmentation.inference.predict_volume` that substitutes ``sae(h)`` for ``h``."""

    def edit(activations: torch.Tensor, _slices: np.ndarray) -> torch.Tensor:
        n, _, *spatial = activations.shape
        vectors = sae(feature_map_to_vectors(activations), use_threshold=True)
        return vectors_to_feature_map(vectors, n, tuple(spatial)).to(activations.dtype)

    return edit


@torch.no_grad()
def substituted_labels(encoded, sae: BatchTopKSAE, chunk: int = 64) -> np.ndarray:
    """Labels (input grid) of an :class:`~SegLensLogic.steering.encoded.EncodedCase` with the SAE's reconstruction
    in place of the activations at the hook (no error term), from its cached encoder outputs."""
    forward = encoded.forward
    edit = reconstruction_edit(sae.to(forward.device))
    deltas = {}
    for start in range(0, len(forward.slices), chunk):
        h = forward.activations[start : start + chunk]
        for offset, delta in enumerate(edit(h, forward.slices[start : start + chunk]) - h):
            deltas[start + offset] = delta
    empty = np.zeros(forward.prepared.brain_mask.shape, dtype=np.uint8)
    return forward.prepared.to_input_grid(forward.relabel(empty, np.arange(len(forward.slices)), deltas))


def recovered_scores(encoded, sae: BatchTopKSAE, truth: np.ndarray, class_names) -> tuple[float, float, float]:
    """``(Dice of the model, Dice with the SAE substituted, tumour mask agreement)`` for one encoded case."""
    substituted = substituted_labels(encoded, sae)
    a = segmentation_scores(encoded.labels, truth, class_names)["dice_mean"]
    b = segmentation_scores(substituted, truth, class_names)["dice_mean"]
    fg_a, fg_b = encoded.labels > 0, substituted > 0
    denominator = fg_a.sum() + fg_b.sum()
    agreement = 1.0 if denominator == 0 else float(2 * (fg_a & fg_b).sum() / denominator)
    return a, b, agreement


def dice_recovered(model: Segmenter, sae: BatchTopKSAE, cohort: Cohort, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Mean Dice of the unmodified model and with SAE reconstructions at the hook, over labelled cases (each case
    runs through the encoder once: :func:`~SegLensLogic.steering.encoded.encode_case`).

    Returns:
        ``dice_model``, ``dice_sae`` (mean class Dice against ground truth), ``dice_recovered`` (their ratio),
        ``mask_agreement`` (Dice-style overlap of tumour voxels between the two predictions) and ``cases``.
    """
    from .encoded import encode_case

    sae.check_fits(model)  # before any case is read
    config = model.config
    rows = []
    for case in cohort:
        if case.label is None:
            continue
        images = read_case(case, modalities=config.modalities, allow_missing=config.accepts_missing_modalities)
        a, b, agreement = recovered_scores(encode_case(model, sae, images), sae, images.label, config.class_names)
        rows.append((a, b, agreement))
        if log:
            log(f"  {case.case_id}: Dice model {a:.3f}, with SAE {b:.3f}, mask agreement {agreement:.3f}")
    if not rows:
        raise SegLensError(f"cohort '{cohort.name}' has no labelled case to measure Dice recovered on")
    dice_model, dice_sae, agreement = (float(np.mean(v)) for v in zip(*rows))
    return {
        "dice_model": dice_model,
        "dice_sae": dice_sae,
        "dice_recovered": dice_sae / dice_model if dice_model > 0 else float("nan"),
        "mask_agreement": agreement,
        "cases": len(rows),
    }
