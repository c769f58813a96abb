"""Label-free quality metrics of a latent alignment and the baselines table (Med-SegLens 5.5, appendix E.1).

A *method* matches latents in its own space and accepts some of its pairs:

=========  ==========================  ===========  ==========================================
method     matcher                     own / other  accepted pairs
=========  ==========================  ===========  ==========================================
ours       Hungarian on both spaces    dec / enc    shared latents (both agree, both >= tau)
enc-only   Hungarian                   enc / dec    every matched pair
greedy     greedy (most similar first) dec / enc    every matched pair
sinkhorn   entropic OT, rounded        dec / enc    every matched pair
nearest    row-wise best (no matching) dec / enc    every latent (collisions allowed)
=========  ==========================  ===========  ==========================================

Metrics, over a method's accepted pairs (percentages except collision):

- **agreement**: the same method run in the other space picks the same partner. For ``ours`` this holds by
  construction (100%); ``agreement_all`` is the same fraction over every latent (before the tau filter).
- **stability**: the dictionaries are resampled with replacement (bootstrap; each trial keeps the distinct
  latents drawn, about 63% of each side, same draws for every method); the method is rerun on the resampled
  similarity matrices. A pair is stable when, in every trial in which both of its latents were drawn, it is again
  accepted with the same partner. ``stability_events`` counts (pair, trial) events instead of pairs.
- **collision**: ``(assignments - distinct targets) / assignments`` over the method's *proposals* (each latent's
  own first choice before conflicts are resolved, see :mod:`.matching`): many-to-one ambiguity.
- **predictability**: ``100 * (mean similarity of accepted pairs - mean similarity of the same A latents paired
  with random distinct B latents)``, similarities averaged over the spaces, random pairings seeded.
- **coverage**: accepted pairs over A's latents (not in the paper's table; without it a method that accepts
  only its best pairs looks best on every other column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .latent_alignment import DEFAULT_TAU, LatentAlignment
from .matching import Matching, match


@dataclass(frozen=True)
class Method:
    """How a method aligns: ``matcher`` in space ``own``; ``other`` is the space agreement is checked in."""

    name: str
    matcher: str
    own: str
    other: str
    accept_shared: bool = False


METHODS = {
    "greedy": Method("greedy", "greedy", "dec", "enc"),
    "sinkhorn": Method("sinkhorn", "sinkhorn", "dec", "enc"),
    "enc-only": Method("enc-only", "hungarian", "enc", "dec"),
    "ours": Method("ours", "hungarian", "dec", "enc", accept_shared=True),
}
EXTRA_METHODS = {"nearest": Method("nearest", "nearest", "dec", "enc")}
TABLE_METHODS = ("greedy", "sinkhorn", "enc-only", "ours")


def collision_rate(assignment: np.ndarray) -> float:
    """``(assigned - distinct targets) / assigned`` of an assignment ``(n,)`` (entries ``-1`` are unassigned)."""
    assigned = np.asarray(assignment)[np.asarray(assignment) >= 0]
    return 0.0 if len(assigned) == 0 else float((len(assigned) - len(np.unique(assigned))) / len(assigned))


class _Runs:
    """Matchings of one set of similarity matrices, each computed once and shared by every method."""

    def __init__(self, similarities: dict[str, np.ndarray], prefilled: dict | None = None):
        self.similarities = similarities
        self.cache: dict[tuple[str, str], Matching] = dict(prefilled or {})

    def get(self, matcher: str, space: str) -> Matching:
        key = (matcher, space)
        if key not in self.cache:
            self.cache[key] = match(self.similarities[space], matcher)
        return self.cache[key]

    def accepted(self, method: Method, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """``(partner, accepted)``: the method's partner of every A latent and which pairs it accepts."""
        own = self.get(method.matcher, method.own)
        partner = own.partner
        accepted = partner >= 0
        if method.accept_shared:
            for space in self.similarities:
                other = self.get(method.matcher, space).partner
                accepted &= other == partner
                sims = np.full(len(partner), -np.inf)
                sims[accepted] = self.similarities[space][np.flatnonzero(accepted), partner[accepted]]
                accepted &= sims >= tau
        return partner, accepted


def _mean_similarity(similarities: dict[str, np.ndarray], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.mean([s[rows, cols] for s in similarities.values()], axis=0)


def bootstrap_draws(n_a: int, n_b: int, trials: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``trials`` bootstrap resamples of both dictionaries: sorted distinct latent ids ``(idx_a, idx_b)``."""
    rng = np.random.default_rng(seed)
    return [(np.unique(rng.integers(0, n_a, n_a)), np.unique(rng.integers(0, n_b, n_b))) for _ in range(trials)]


def evaluate_methods(
    similarities: dict[str, np.ndarray],
    methods=TABLE_METHODS,
    tau: float = DEFAULT_TAU,
    trials: int = 5,
    shuffles: int = 10,
    seed: int = 0,
    prefilled: dict | None = None,
) -> list[dict]:
    """The metrics of each named method on encoder and decoder similarity matrices ``{"enc", "dec"}``.

    Args:
        similarities: ``{"enc": (n_a, n_b), "dec": (n_a, n_b)}``.
        methods: names from :data:`METHODS` / :data:`EXTRA_METHODS`.
        tau: threshold of ``ours``.
        trials: bootstrap trials for stability (0 skips it).
        shuffles: random pairings for the predictability baseline.
        seed: seeds the bootstrap and the shuffles (same seed, same numbers).
        prefilled: matchings already computed, ``{(matcher, space): Matching}``.

    Returns:
        One dict per method: ``method, coverage, accepted, agreement, stability, stability_events, collision,
        predictability, matched_similarity, shuffled_similarity`` (plus ``agreement_all`` for ``ours``).
    """
    known = {**METHODS, **EXTRA_METHODS}
    if missing := [m for m in methods if m not in known]:
        raise ValueError(f"unknown alignment method(s) {missing}; choose from {', '.join(known)}")
    if set(similarities) != {"enc", "dec"}:
        raise ValueError("the baselines need encoder and decoder similarity matrices ('enc' and 'dec')")
    n_a, n_b = similarities["dec"].shape
    full = _Runs(similarities, prefilled)
    draws = bootstrap_draws(n_a, n_b, trials, seed)
    trial_runs = [_Runs({k: s[np.ix_(ia, ib)] for k, s in similarities.items()}) for ia, ib in draws]
    rng = np.random.default_rng(seed + 1)
    rows = []
    for name in methods:
        method = known[name]
        partner, accepted = full.accepted(method, tau)
        a = np.flatnonzero(accepted)
        b = partner[a]
        other = full.get(method.matcher, method.other).partner
        row = {"method": name, "accepted": int(len(a)), "coverage": 100.0 * len(a) / n_a}
        row["agreement"] = 100.0 * float(np.mean(other[a] == b)) if len(a) else float("nan")
        if method.accept_shared:
            matched = np.flatnonzero(partner >= 0)
            row["agreement_all"] = 100.0 * float(np.mean(other[matched] == partner[matched]))
        # Stability: rerun on each bootstrap resample.
        stable = np.ones(n_a, dtype=bool)
        seen = np.zeros(n_a, dtype=int)
        events = hits = 0
        for (ia, ib), runs in zip(draws, trial_runs):
            sub_partner, sub_accepted = runs.accepted(method, tau)
            pos_a = np.searchsorted(ia, a)
            pos_b = np.searchsorted(ib, b)
            present = (pos_a < len(ia)) & (ia[np.minimum(pos_a, len(ia) - 1)] == a)
            present &= (pos_b < len(ib)) & (ib[np.minimum(pos_b, len(ib) - 1)] == b)
            pa, pb = pos_a[present], pos_b[present]
            same = sub_accepted[pa] & (sub_partner[pa] == pb)
            stable[a[present][~same]] = False
            seen[a[present]] += 1
            events += int(present.sum())
            hits += int(same.sum())
        considered = seen[a] > 0
        row["stability"] = 100.0 * float(stable[a][considered].mean()) if trials and considered.any() else float("nan")
        row["stability_events"] = 100.0 * hits / events if events else float("nan")
        row["collision"] = collision_rate(full.get(method.matcher, method.own).proposal)
        if len(a):
            matched_sim = float(_mean_similarity(similarities, a, b).mean())
            # Random pairing: each accepted A latent with a random distinct B latent (not a shuffle of the
            # accepted partners among themselves: with few accepted pairs that keeps many true pairs).
            shuffled = [float(_mean_similarity(similarities, a, rng.permutation(n_b)[: len(a)]).mean()) for _ in range(shuffles)]
            shuffled_sim = float(np.mean(shuffled))
        else:
            matched_sim = shuffled_sim = float("nan")
        row.update(matched_similarity=matched_sim, shuffled_similarity=shuffled_sim, predictability=100.0 * (matched_sim - shuffled_sim))
        rows.append(row)
    return rows


def alignment_metrics(alignment: LatentAlignment, trials: int = 5, shuffles: int = 10, seed: int = 0) -> dict:
    """The metrics of an alignment made by the paper's method (its own row of the baselines table), as a dict."""
    if set(alignment.similarities) != {"enc", "dec"}:
        return single_space_metrics(alignment, trials, shuffles, seed)
    prefilled = {("hungarian", space): m for space, m in alignment.matchings.items() if m.method == "hungarian"}
    row = evaluate_methods(alignment.similarities, ("ours",), alignment.tau, trials, shuffles, seed, prefilled)[0]
    row.pop("method")
    return {**row, "bootstrap_trials": trials, "seed": seed}


def single_space_metrics(alignment: LatentAlignment, trials: int = 5, shuffles: int = 10, seed: int = 0) -> dict:
    """Stability, collision and predictability of a one-space alignment (e.g. activation correlations)."""
    (space, sims), = alignment.similarities.items()
    doubled = {"enc": sims, "dec": sims}  # the same matrix in both slots: "ours" reduces to Hungarian + tau
    prefilled = {("hungarian", "enc"): alignment.matchings[space], ("hungarian", "dec"): alignment.matchings[space]}
    row = evaluate_methods(doubled, ("ours",), alignment.tau, trials, shuffles, seed, prefilled)[0]
    for key in ("method", "agreement", "agreement_all"):
        row.pop(key, None)
    return {**row, "bootstrap_trials": trials, "seed": seed}


def baselines_table(alignment: LatentAlignment, methods=TABLE_METHODS, trials: int = 5, shuffles: int = 10, seed: int = 0) -> list[dict]:
    """Table 2 of the paper for one alignment: every method's metrics on its encoder and decoder cosines."""
    prefilled = {("hungarian", space): m for space, m in alignment.matchings.items() if m.method == "hungarian"}
    return evaluate_methods(alignment.similarities, methods, alignment.tau, trials, shuffles, seed, prefilled)


TABLE_COLUMNS = ("method", "coverage", "agreement", "stability", "collision", "predictability")


def format_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    """The baselines table as aligned text (percentages with one decimal, collision with three)."""
    def cell(key, value):
        if isinstance(value, str):
            return value
        return f"{value:.3f}" if key == "collision" else f"{value:.1f}"

    table = [list(columns)] + [[cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))) for line in table)
