"""Many cohorts: every pair aligned, the fraction-shared matrix (table 7), universally shared and
population-specific latents (section 5.4), and the seed noise floor.

The **seed noise floor** (beyond the paper): two SAEs trained on the same activations with different seeds share
only part of their latents (Paulo & Belrose report 30-53% for TopK SAEs). A cross-cohort figure of "40% shared"
means little until it is set beside the fraction two seeds of one cohort share, so :func:`diff_cohorts` reports
the floor beside every pair and the ratio of each pair's fraction to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .latent_alignment import DEFAULT_TAU, LatentAlignment, align_saes


@dataclass
class CohortDiff:
    """The alignment of every pair of named SAEs.

    Attributes:
        names: cohort names in order.
        alignments: ``{(i, j): LatentAlignment}`` for ``i < j`` (A = ``names[i]``, B = ``names[j]``).
        tau: the shared-latent threshold used.
        seed_noise_floor: ``{cohort name: shared fraction between two seeds of that cohort}``.
    """

    names: list[str]
    alignments: dict[tuple[int, int], LatentAlignment]
    tau: float = DEFAULT_TAU
    seed_noise_floor: dict[str, float] = field(default_factory=dict)

    def alignment(self, i: int, j: int) -> tuple[LatentAlignment, bool]:
        """The alignment of cohorts ``i`` and ``j`` and whether it is stored the other way round (``j`` as A)."""
        return (self.alignments[(i, j)], False) if i < j else (self.alignments[(j, i)], True)

    def shared_partners(self, i: int, j: int) -> dict[int, int]:
        """``{latent of i: its shared partner in j}``."""
        alignment, flipped = self.alignment(i, j)
        a, b = alignment.shared_pairs()
        return dict(zip(b.tolist(), a.tolist())) if flipped else dict(zip(a.tolist(), b.tolist()))

    def fraction_matrix(self) -> np.ndarray:
        """``(n, n)`` fraction of shared latents per pair (table 7); the diagonal is 1."""
        n = len(self.names)
        out = np.eye(n)
        for (i, j), alignment in self.alignments.items():
            out[i, j] = out[j, i] = alignment.shared_fraction()
        return out

    def live_fraction_matrix(self, live: list[np.ndarray]) -> np.ndarray:
        """``(n, n)``: entry ``(i, j)`` is the share of cohort ``i``'s live latents (``live[i]``, bool ``(d_i,)``)
        whose shared partner in cohort ``j`` is live too (0 when ``i`` has none); the diagonal is 1. Not
        symmetric: the denominators differ."""
        n = len(self.names)
        out = np.eye(n)
        for (i, j), alignment in self.alignments.items():
            out[i, j] = alignment.live_shared_fraction(live[i], live[j], side="a") or 0.0
            out[j, i] = alignment.live_shared_fraction(live[i], live[j], side="b") or 0.0
        return out

    def noise_floor(self, i: int, j: int) -> float | None:
        """The seed noise floor for a pair: the lower of the two cohorts' floors that are known (None if neither)."""
        floors = [self.seed_noise_floor[self.names[k]] for k in (i, j) if self.names[k] in self.seed_noise_floor]
        return min(floors) if floors else None

    def pair_rows(self) -> list[dict]:
        """One row per pair: names, shared count and fraction, the seed noise floor and fraction / floor."""
        rows = []
        for (i, j), alignment in sorted(self.alignments.items()):
            fraction = alignment.shared_fraction()
            floor = self.noise_floor(i, j)
            rows.append({
                "a": self.names[i], "b": self.names[j], "shared": int(alignment.shared_mask().sum()),
                "shared_fraction": fraction, "seed_noise_floor": floor,
                "relative_to_floor": fraction / floor if floor else None,
            })  # fmt: skip
        return rows

    def universal_groups(self) -> list[dict[str, int]]:
        """Universally shared latents (section 5.4: ``S_univ = intersection of S_m,n over all pairs``).

        Latent indices differ between SAEs, so a universal latent is a *group*: one latent per cohort, every two of
        which are shared partners in their pair's alignment (a consistent clique). Returned as
        ``[{cohort name: latent}]``, sorted by the first cohort's latent.
        """
        n = len(self.names)
        if n < 2:
            return []
        groups = []
        partners = {(i, j): self.shared_partners(i, j) for i in range(n) for j in range(n) if i != j}
        for latent in sorted(partners[(0, 1)]):
            group = {0: latent}
            for j in range(1, n):
                if latent not in partners[(0, j)]:
                    break
                group[j] = partners[(0, j)][latent]
            else:
                consistent = all(partners[(i, j)].get(group[i]) == group[j] for i in range(1, n) for j in range(i + 1, n))
                if consistent:
                    groups.append({self.names[k]: int(v) for k, v in group.items()})
        return groups

    def population_specific(self) -> dict[str, list[int]]:
        """Per cohort, its latents outside every universal group (the paper's "population-specific")."""
        universal = self.universal_groups()
        out = {}
        for k, name in enumerate(self.names):
            size = self._size(k)
            taken = {g[name] for g in universal}
            out[name] = [j for j in range(size) if j not in taken]
        return out

    def exclusive(self) -> dict[str, list[int]]:
        """Per cohort, its latents shared with *no* other cohort (a stricter notion than population-specific)."""
        out = {}
        for k, name in enumerate(self.names):
            shared = set()
            for other in range(len(self.names)):
                if other != k:
                    shared |= set(self.shared_partners(k, other))
            out[name] = [j for j in range(self._size(k)) if j not in shared]
        return out

    def _size(self, k: int) -> int:
        other = 1 if k == 0 else 0
        alignment, flipped = self.alignment(k, other)
        return alignment.n_b if flipped else alignment.n_a

    def summary(self) -> dict:
        """JSON-able summary: names, tau, matrix, pair rows, universal groups, per-cohort specific counts."""
        universal = self.universal_groups()
        specific = self.population_specific()
        exclusive = self.exclusive()
        return {
            "cohorts": self.names,
            "tau": self.tau,
            "fraction_shared": self.fraction_matrix().round(6).tolist(),
            "pairs": self.pair_rows(),
            "seed_noise_floor": self.seed_noise_floor or None,
            "universally_shared": universal,
            "population_specific": {name: {"count": len(v), "latents": v} for name, v in specific.items()},
            "exclusive": {name: {"count": len(v), "latents": v} for name, v in exclusive.items()},
        }


def diff_cohorts(
    saes: dict[str, object],
    tau: float = DEFAULT_TAU,
    seed_replicas: dict[str, object] | None = None,
    align: Callable[[object, object, float], LatentAlignment] | None = None,
) -> CohortDiff:
    """Align every pair of named SAEs (same activation space) and, when given, each cohort with a seed replica.

    Args:
        saes: ``{cohort name: SAE}`` (:class:`~SegLensLogic.sae.model.SparseDictionary`), at least two.
        tau: shared-latent threshold.
        seed_replicas: ``{cohort name: an SAE trained on the same activations with another seed}``.
        align: ``align(sae_a, sae_b, tau) -> LatentAlignment`` (default: encoder+decoder cosines).
    """
    if len(saes) < 2:
        raise ValueError("model diffing needs at least two SAEs")
    align = align or (lambda a, b, t: align_saes(a, b, tau=t))
    names = list(saes)
    models = list(saes.values())
    alignments = {(i, j): align(models[i], models[j], tau) for i, j in itertools.combinations(range(len(names)), 2)}
    floors = {}
    for name, replica in (seed_replicas or {}).items():
        if name not in saes:
            raise ValueError(f"seed replica given for unknown cohort '{name}' (cohorts: {', '.join(names)})")
        floors[name] = align(saes[name], replica, tau).shared_fraction()
    return CohortDiff(names, alignments, tau, floors)


# -- floors: how much one cohort's SAE shares with its own replicas ------------------------------------------------------
REPLICA_KINDS = {
    "seed": "another seed on the same activations (seed floor)",
    "resampled": "the same seed on a random share of the activations (resampling floor)",
}


def replica_names(name: str) -> dict[str, str]:
    """The names of a cohort SAE's replicas for the floors, by kind (:data:`REPLICA_KINDS`)."""
    return {kind: f"{name}-{kind}" for kind in REPLICA_KINDS}


def replica_floors(
    name: str,
    replicas: dict[str, str],
    align: Callable[[str, str], LatentAlignment],
    live: dict[str, np.ndarray],
) -> dict[str, tuple[LatentAlignment, float | None]]:
    """A cohort's floors: its SAE aligned with each of its replicas, and the share of its live latents found again.

    Args:
        name: the cohort's SAE.
        replicas: ``{kind: replica name}`` (:func:`replica_names`).
        align: ``align(name_a, name_b) -> LatentAlignment`` by whichever method the caller diffs with.
        live: ``{name: (d_sae,) bool}`` live latents of every named SAE.

    Returns:
        ``{kind: (alignment, live shared fraction or None when the cohort's SAE has no live latent)}``.
    """
    out = {}
    for kind, replica in replicas.items():
        alignment = align(name, replica)
        out[kind] = (alignment, alignment.live_shared_fraction(live[name], live[replica]))
    return out
