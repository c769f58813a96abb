"""Deterministic labelling of a latent from its metrics: a category and a short description.

The metrics (see :mod:`.metrics`) are averaged over the latent's top-K activating slices. The category is the
first rule that holds, in this order (thresholds are the fields of :class:`LabellingRules`):

1. ``dead``: the latent never fired over the cohort (no top examples).
2. ``background``: at least ``background_mass`` (0.5) of the activation lies outside the brain mask.
3. A class (``necrotic core``, ``edema``, ``enhancing tumour``, or a healthy structure such as ``thalamus``): the
   labelled class ``c`` (not background) with the largest association ``p_c`` holds at least ``class_mass``
   (0.5) of the activation.
4. ``tumour boundary`` (tumour label schemes only): at least ``boundary_mass`` (0.3) of the activation lies in
   the band around label borders, that is at least ``boundary_enrichment`` (2) times the band's share of the
   brain, and the band is more enriched than the labelled regions themselves (mass over area): a rim, not a
   blob over the tumour that spills across its border.
5. The same class as in 3 when it holds at least ``class_mass_enriched`` (0.05) of the activation and that is
   at least ``class_enrichment`` (3) times the class's share of the brain, both on the same slices and over the
   whole cohort (the cohort's base rate, when given): small structures
   and tumours never fill half of a heatmap upsampled from a coarse feature grid (a 16x16 grid cell is 15 mm
   of a 240 mm slice), but a latent that puts three times the class's share of its mass on it is about it.
6. ``brain edge``: at least ``edge_mass`` (0.5) of the in-brain activation lies in the brain's edge band and
   that is at least ``edge_enrichment`` (1.5) times the band's share of the brain.
7. ``diffuse``: the map's extent (``exp(entropy)`` as a share of the brain) is at least ``diffuse_extent`` (0.6):
   spread almost like a uniform map.
8. ``healthy tissue``: everything else (activation in the brain, away from labelled regions and the edge).

The **confidence** of a category is the activation-weighted fraction of the top-K examples that the same rules,
applied to each example's own metrics, put in that category (1: every example agrees).

The **description** lists the category, then its spread (``localised`` when the extent is below 0.1, ``spread``
below ``diffuse_extent``, else ``diffuse``), depth (``superficial`` when depth < 0.2, ``deep`` above 0.5, else ``mid-depth``),
side (``left hemisphere`` / ``right hemisphere`` when the robust centroid is beyond +-0.2 of the brain's
half-width, else ``midline``), ``anterior`` / ``posterior`` likewise, ``ring-like`` when edge coverage is at
least 0.6 and the edge band holds at least ``edge_mass`` of the activation, and ``boundary-sensitive`` when the boundary band holds at least ``boundary_mass`` * 2/3 of the
activation at ``boundary_enrichment`` times its share (for categories other than ``tumour boundary``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .heatmap_metrics import metric_names

TUMOUR_CATEGORIES = ("necrotic core", "edema", "enhancing tumour")
GENERIC_CATEGORIES = ("tumour boundary", "healthy tissue", "brain edge", "background", "diffuse", "dead")


@dataclass(frozen=True)
class LabellingRules:
    """Thresholds of the labelling rules (module docstring)."""

    background_mass: float = 0.5
    class_mass: float = 0.5
    boundary_mass: float = 0.3
    boundary_enrichment: float = 2.0
    class_mass_enriched: float = 0.05
    class_enrichment: float = 3.0
    edge_mass: float = 0.5
    edge_enrichment: float = 1.5
    diffuse_extent: float = 0.6
    localised_extent: float = 0.1
    superficial_depth: float = 0.2
    deep_depth: float = 0.5
    side: float = 0.2
    ring_coverage: float = 0.6

    def to_dict(self) -> dict:
        return asdict(self)


def is_tumour_scheme(class_names: Sequence[str]) -> bool:
    return any(name in TUMOUR_CATEGORIES for name in class_names)


def categorise(
    metrics: dict[str, float],
    class_names: Sequence[str],
    rules: LabellingRules | None = None,
    base_rates: dict[str, float] | None = None,
) -> tuple[str, float]:
    """The category of one set of metrics (averaged over a latent's top-K, or one example's) and the score of
    the rule that decided it (the mass or entropy it tested).

    Args:
        metrics: ``name -> value`` with every name of :func:`metric_names` for ``class_names``.
        class_names: label classes, index 0 background.
        base_rates: class name -> share of the cohort's brain voxels (rule 5 needs the class enriched over it too).
    """
    rules = rules or LabellingRules()
    base_rates = base_rates or {}
    if metrics.get("p_outside_brain", 0.0) >= rules.background_mass:
        return "background", metrics["p_outside_brain"]
    classes = list(class_names[1:])
    best = max(classes, key=lambda name: metrics[f"p_{name}"]) if classes else None
    if best is not None and metrics[f"p_{best}"] >= rules.class_mass:
        return best, metrics[f"p_{best}"]
    boundary = metrics["r_boundary"]
    boundary_enrichment = boundary / max(metrics["area_boundary"], 1e-6)
    inside_enrichment = metrics["r_inside"] / max(metrics["area_inside"], 1e-6)
    if (
        is_tumour_scheme(class_names)
        and boundary >= rules.boundary_mass
        and boundary_enrichment >= rules.boundary_enrichment
        and boundary_enrichment > inside_enrichment  # on the border more than in the tumour itself
    ):
        return "tumour boundary", boundary
    if best is not None:
        mass = metrics[f"p_{best}"]
        share = max(metrics[f"area_{best}"], base_rates.get(best, 0.0))
        if mass >= rules.class_mass_enriched and mass >= rules.class_enrichment * share:
            return best, mass
    edge = metrics["edge_ratio"]
    if edge >= rules.edge_mass and edge >= rules.edge_enrichment * metrics["area_edge"]:
        return "brain edge", edge
    if metrics["extent"] >= rules.diffuse_extent:
        return "diffuse", metrics["extent"]
    return "healthy tissue", metrics["p_healthy_brain"]


def describe(category: str, metrics: dict[str, float], rules: LabellingRules | None = None) -> str:
    """A short description such as ``"edema, localised, deep, left hemisphere, boundary-sensitive"``."""
    rules = rules or LabellingRules()
    if category == "dead":
        return "dead (never active on the cohort)"
    words = [category]
    extent = metrics["extent"]
    if category != "diffuse":
        if extent < rules.localised_extent:
            words.append("localised")
        elif extent < rules.diffuse_extent:
            words.append("spread")
        else:
            words.append("diffuse")
    if category != "background":
        depth = metrics["depth"]
        words.append("superficial" if depth < rules.superficial_depth else "deep" if depth > rules.deep_depth else "mid-depth")
    lr, ap = metrics["centroid_lr"], metrics["centroid_ap"]
    words.append("left hemisphere" if lr < -rules.side else "right hemisphere" if lr > rules.side else "midline")
    if abs(ap) > rules.side:
        words.append("anterior" if ap > 0 else "posterior")
    if metrics["edge_coverage"] >= rules.ring_coverage and metrics["edge_ratio"] >= rules.edge_mass:
        words.append("ring-like")
    boundary = metrics["r_boundary"]
    if (
        category != "tumour boundary"
        and boundary >= rules.boundary_mass * 2 / 3
        and boundary >= rules.boundary_enrichment * metrics["area_boundary"]
    ):
        words.append("boundary-sensitive")
    return ", ".join(words)


def as_dict(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {name: float(v) for name, v in zip(names, values)}


@dataclass
class LatentLabel:
    """The labeller's verdict on one latent."""

    category: str
    description: str
    confidence: float
    metrics: dict[str, float]


def label_latent(
    example_metrics: np.ndarray,
    weights: np.ndarray,
    class_names: Sequence[str],
    rules: LabellingRules | None = None,
    base_rates: dict[str, float] | None = None,
) -> LatentLabel:
    """Label one latent from its top-K examples.

    Args:
        example_metrics: ``(K', M)`` metrics of its top examples (``K' <= K``; none for a dead latent).
        weights: ``(K',)`` the examples' activations (slice sums), for the confidence.
        class_names: label classes, index 0 background.
        base_rates: the cohort's class shares of the brain (see :func:`categorise`).
    """
    rules = rules or LabellingRules()
    names = metric_names(class_names)
    if len(example_metrics) == 0:
        return LatentLabel("dead", describe("dead", {}, rules), 1.0, {})
    mean = as_dict(np.mean(example_metrics, axis=0), names)
    category, _ = categorise(mean, class_names, rules, base_rates)
    per_example = [categorise(as_dict(row, names), class_names, rules, base_rates)[0] for row in example_metrics]
    w = np.asarray(weights, dtype=np.float64)
    agree = np.array([c == category for c in per_example])
    confidence = float((w * agree).sum() / w.sum()) if w.sum() > 0 else float(agree.mean())
    return LatentLabel(category, describe(category, mean, rules), confidence, mean)
