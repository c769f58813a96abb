"""Automatic interpretation of an SAE's latents over a cohort, end to end (Med-SegLens section 3.5).

``interpret_sae`` = one pass over the cohort (:func:`~.cohort.interpret_cohort`: top-K slices, metrics,
frequencies, split halves) -> the labeller on every latent (:mod:`.labeller`) -> split-half stability
(:mod:`.stability`) -> the labels document (:mod:`.labels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.cohort import Cohort
from .top_slices import CohortInterpretation, Log, interpret_cohort
from .labeller import LabellingRules, LatentLabel
from .latent_labels import build_labels_document
from .heatmap_metrics import MetricOptions
from .stability import Stability, split_half_stability


@dataclass
class Interpretation:
    """Everything ``seglens interpret`` computes.

    Attributes:
        cohort: the pass over the cohort (top-K examples with metrics and feature-grid maps).
        labels: one :class:`LatentLabel` per latent.
        stability: split-half agreement, or None for a cohort of one case.
        document: the labels file's JSON document.
    """

    cohort: CohortInterpretation
    labels: list[LatentLabel]
    stability: Stability | None
    document: dict

    def category_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label in self.labels:
            counts[label.category] = counts.get(label.category, 0) + 1
        return counts


def interpret_sae(
    model,
    sae,
    cohort: Cohort,
    *,
    top_k: int = 16,
    splits: int = 3,
    seed: int = 0,
    stability_threshold: float = 0.5,
    rules: LabellingRules | None = None,
    options: MetricOptions | None = None,
    model_dir: str | Path | None = None,
    sae_dir: str | Path | None = None,
    batch_size: int | None = None,
    score: str = "max",
    log: Log | None = None,
) -> Interpretation:
    """Label every latent of ``sae`` from its top-K slices over ``cohort``.

    Args:
        model, sae: a segmenter and the SAE trained on its hook point.
        cohort: labelled cases (tumour or ``aseg`` labels).
        top_k: examples per latent.
        splits: random split-halves for stability (0: none).
        stability_threshold: per-latent split agreement needed for ``stable``.
        model_dir, sae_dir: recorded (with weight hashes) in the labels document.
        score: how slices rank for a latent: summed (``sum``) or peak (``max``) activation on the slice.
    """
    rules = rules or LabellingRules()
    result = interpret_cohort(model, sae, cohort, top_k=top_k, splits=splits, seed=seed, batch_size=batch_size, options=options, score=score, log=log)
    labels = result.full.label(result.class_names, rules, result.base_rates)
    stability = split_half_stability(result, rules, stability_threshold) if result.halves else None
    document = build_labels_document(result, labels, stability, model_dir=model_dir, sae_dir=sae_dir, cohort_name=cohort.name, rules=rules)
    document["slice_score"] = score
    return Interpretation(result, labels, stability, document)
