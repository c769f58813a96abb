"""Evaluating an SAE: reconstruction quality on held-out vectors and "Dice recovered" on whole cases.

Dice recovered: the segmentation is run twice, once unmodified and once with the SAE's reconstruction replacing
the real activations at the hook point (no error term); both are scored against the ground truth. A faithful
SAE keeps the Dice of the unmodified model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.cases import read_case
from ..data.cohort import Cohort
from ..errors import SegLensError
from ..inference import predict_volume
from ..metrics import segmentation_scores
from ..networks.segmenter import Segmenter
from .activations import feature_map_to_vectors, vectors_to_feature_map
from .model import BatchTopKSAE


def reconstruction_edit(sae: BatchTopKSAE) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
    """An ``activation_edit`` for :func:`~SegLensLogic.inference.predict_volume` that substitutes ``sae(h)`` for ``h``."""

    def edit(activations: torch.Tensor, _slices: np.ndarray) -> torch.Tensor:
        n, _, *spatial = activations.shape
        vectors = sae(feature_map_to_vectors(activations), use_threshold=True)
        return vectors_to_feature_map(vectors, n, tuple(spatial)).to(activations.dtype)

    return edit


@torch.no_grad()
def dice_recovered(model: Segmenter, sae: BatchTopKSAE, cohort: Cohort, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Mean Dice of the unmodified model and with SAE reconstructions at the hook, over labelled cases.

    Returns:
        ``dice_model``, ``dice_sae`` (mean class Dice against ground truth), ``dice_recovered`` (their ratio),
        ``mask_agreement`` (Dice-style overlap of tumour voxels between the two predictions) and ``cases``.
    """
    if sae.config.hook_point and sae.config.hook_point != model.config.hook_point:
        raise SegLensError(f"the SAE was trained at hook '{sae.config.hook_point}', the model's hook is '{model.config.hook_point}'")
    sae = sae.to(next(model.parameters()).device)
    edit = reconstruction_edit(sae)
    rows = []
    for case in cohort:
        if case.label is None:
            continue
        images = read_case(case, modalities=model.config.modalities)
        plain = predict_volume(model, images)
        substituted = predict_volume(model, plain.prepared, activation_edit=edit)
        a = segmentation_scores(plain.labels, images.label, model.config.class_names)["dice_mean"]
        b = segmentation_scores(substituted.labels, images.label, model.config.class_names)["dice_mean"]
        fg_a, fg_b = plain.labels > 0, substituted.labels > 0
        denominator = fg_a.sum() + fg_b.sum()
        agreement = 1.0 if denominator == 0 else float(2 * (fg_a & fg_b).sum() / denominator)
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
