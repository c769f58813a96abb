"""Split-half stability of latent labels (beyond the paper).

The cohort's cases are split at random into two disjoint halves, ``splits`` times (seeded). Each half is
interpreted on its own (top-K slices, metrics, labeller: the same single pass fills them, see :mod:`.cohort`),
and a latent's category on one half is compared with its category on the other. A latent is compared in a split
when it fires in both halves (dead in either half: not compared). Its **agreement** is the fraction of its
compared splits where the two categories are equal; it is ``stable`` when the agreement is at least
``threshold``. The cohort's agreement is the fraction of all compared (latent, split) pairs that agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .labeller import LabellingRules


def split_halves(n_cases: int, splits: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``splits`` random partitions of ``range(n_cases)`` into halves ``(A, B)`` (``|A| = n // 2``)."""
    if n_cases < 2 or splits <= 0:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(splits):
        order = rng.permutation(n_cases)
        out.append((sorted(int(i) for i in order[: n_cases // 2]), sorted(int(i) for i in order[n_cases // 2 :])))
    return out


@dataclass
class Stability:
    """Split-half agreement of categories.

    Attributes:
        agreement: fraction of compared (latent, split) pairs whose two categories agree; None if none compared.
        n_compared: latents compared in at least one split.
        threshold: per-latent agreement needed to count as stable.
        splits: number of random split-halves.
        per_latent: ``(d_sae,)`` agreement of each latent, NaN where never compared.
    """

    agreement: float | None
    n_compared: int
    threshold: float
    splits: int
    per_latent: np.ndarray

    def stable(self, latent: int) -> bool | None:
        value = self.per_latent[latent]
        return None if np.isnan(value) else bool(value >= self.threshold)

    def to_dict(self) -> dict:
        return {
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "n_compared": self.n_compared,
            "threshold": self.threshold,
            "splits": self.splits,
            "n_unstable": int(np.sum(self.per_latent < self.threshold)),
        }


def category_agreement(categories_a: list[str], categories_b: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: compared (both alive) and agreeing (same category), as boolean arrays."""
    a, b = np.array(categories_a, dtype=object), np.array(categories_b, dtype=object)
    compared = (a != "dead") & (b != "dead")
    return compared, compared & (a == b)


def split_half_stability(interpretation, rules: LabellingRules | None = None, threshold: float = 0.5) -> Stability:
    """Stability of the labels of a :class:`~.cohort.CohortInterpretation` over its split halves."""
    d_sae = interpretation.d_sae
    compared = np.zeros(d_sae)
    agreed = np.zeros(d_sae)
    for half_a, half_b in interpretation.halves:
        cats_a = [label.category for label in half_a.label(interpretation.class_names, rules, interpretation.base_rates)]
        cats_b = [label.category for label in half_b.label(interpretation.class_names, rules, interpretation.base_rates)]
        seen, same = category_agreement(cats_a, cats_b)
        compared += seen
        agreed += same
    per_latent = np.divide(agreed, compared, out=np.full(d_sae, np.nan), where=compared > 0)
    total = compared.sum()
    return Stability(
        agreement=float(agreed.sum() / total) if total else None,
        n_compared=int((compared > 0).sum()),
        threshold=threshold,
        splits=len(interpretation.halves),
        per_latent=per_latent,
    )
