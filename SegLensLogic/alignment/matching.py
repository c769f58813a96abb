"""One-to-one matchings between the latents of two SAEs, from a similarity matrix.

Every function takes a similarity matrix ``S`` of shape ``(n_a, n_b)`` (larger is more alike; cosines or
correlations) and returns a :class:`Matching`: ``partner[i]`` is the latent of SAE B matched to latent ``i`` of
SAE A, or ``-1`` when ``i`` is left unmatched (only when ``n_a > n_b``). Rectangular matrices are allowed.

- :func:`hungarian`: the maximum-weight one-to-one matching (``scipy.optimize.linear_sum_assignment``), as in
  Med-SegLens section 3.6.
- :func:`greedy`: repeatedly take the most similar pair whose latents are both free (a 1/2-approximation).
- :func:`sinkhorn`: entropic optimal transport with uniform marginals, its plan rounded greedily to a matching.
- :func:`nearest`: every latent of A takes its most similar latent of B; **not** one-to-one (collisions).

Each :class:`Matching` also keeps ``proposal``, the partner each latent of A would pick on its own before the
method resolves conflicts (the row-wise best of ``S``, or of the transport plan for Sinkhorn). Collisions are
counted on proposals (appendix E.1: greedy and soft assignments "allow overlap"); the final ``partner`` of
every method but :func:`nearest` is a valid matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

UNMATCHED = -1


@dataclass(frozen=True)
class Matching:
    """A (partial) assignment of A's latents to B's.

    Attributes:
        partner: ``(n_a,)`` int64, B latent per A latent or ``-1``.
        proposal: ``(n_a,)`` int64, each A latent's own first choice before conflicts were resolved.
        n_b: number of B latents.
        method: name of the method that made it.
    """

    partner: np.ndarray
    proposal: np.ndarray
    n_b: int
    method: str

    @property
    def n_a(self) -> int:
        return len(self.partner)

    @property
    def matched(self) -> np.ndarray:
        """A latents that have a partner, ``(m,)``."""
        return np.flatnonzero(self.partner >= 0)

    def is_one_to_one(self) -> bool:
        """True when no two A latents share a B latent and every partner is a valid B index."""
        return is_valid_matching(self.partner, self.n_b)

    def inverse(self) -> np.ndarray:
        """``(n_b,)``: the A latent matched to each B latent, or ``-1`` (requires a one-to-one matching)."""
        if not self.is_one_to_one():
            raise ValueError(f"the {self.method} assignment is not one-to-one; it has no inverse")
        inverse = np.full(self.n_b, UNMATCHED, dtype=np.int64)
        matched = self.matched
        inverse[self.partner[matched]] = matched
        return inverse


def is_valid_matching(partner: np.ndarray, n_b: int) -> bool:
    """Every entry is ``-1`` or in ``[0, n_b)`` and no B latent is used twice."""
    partner = np.asarray(partner)
    used = partner[partner >= 0]
    return bool(((partner >= -1) & (partner < n_b)).all() and len(np.unique(used)) == len(used))


def _check(similarity: np.ndarray) -> np.ndarray:
    similarity = np.asarray(similarity)
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(f"a similarity matrix must be 2-D and non-empty, got shape {similarity.shape}")
    if not np.isfinite(similarity).all():
        raise ValueError("the similarity matrix holds NaN or Inf (a zero-norm dictionary vector?)")
    return similarity


def _row_best(similarity: np.ndarray) -> np.ndarray:
    return np.asarray(similarity.argmax(axis=1), dtype=np.int64)


def hungarian(similarity: np.ndarray) -> Matching:
    """Maximum total similarity one-to-one matching (the Hungarian / Jonker-Volgenant solver of SciPy)."""
    similarity = _check(similarity)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    partner = np.full(similarity.shape[0], UNMATCHED, dtype=np.int64)
    partner[rows] = cols
    return Matching(partner, partner.copy(), similarity.shape[1], "hungarian")


def greedy_assign(weights: np.ndarray) -> np.ndarray:
    """Global greedy one-to-one matching on ``weights`` ``(n_a, n_b)``: partner per row, ``-1`` if none.

    Equivalent to visiting all pairs in decreasing weight and keeping a pair when both latents are free, but
    computed by rounds of *mutually best* pairs (the heaviest free pair is always mutually best), so that no
    ``n_a * n_b`` sort is needed: each round recomputes the best free column only for rows that lost theirs.
    Ties are broken by the lowest index.
    """
    n_a, n_b = weights.shape
    work = np.array(weights, dtype=np.float64, copy=True)
    partner = np.full(n_a, UNMATCHED, dtype=np.int64)
    free_rows = np.arange(n_a)
    free_cols = np.ones(n_b, dtype=bool)
    best = work.argmax(axis=1)
    while len(free_rows) and free_cols.any():
        cand = best[free_rows]
        values = work[free_rows, cand]
        # For each candidate column, the free row that wants it most (lowest row index on ties).
        order = np.lexsort((free_rows, -values))
        cand_sorted = cand[order]
        first = np.unique(cand_sorted, return_index=True)[1]
        winners_pos = order[first]
        winner_cols = cand[winners_pos]
        # A (row, col) pair is final only if no free row *not proposing col* values it more: check the column.
        sub = work[np.ix_(free_rows, winner_cols)]
        col_best = sub.max(axis=0)
        final = values[winners_pos] >= col_best
        rows_done = free_rows[winners_pos[final]]
        cols_done = winner_cols[final]
        if len(rows_done) == 0:  # cannot happen: the heaviest free pair is always final
            rows_done, cols_done = free_rows[winners_pos[:1]], winner_cols[:1]
        partner[rows_done] = cols_done
        free_cols[cols_done] = False
        work[:, cols_done] = -np.inf
        keep = np.ones(len(free_rows), dtype=bool)
        keep[np.searchsorted(free_rows, rows_done)] = False
        free_rows = free_rows[keep]
        if not free_cols.any():
            break
        stale = free_rows[~free_cols[best[free_rows]]]
        if len(stale):
            best[stale] = work[stale].argmax(axis=1)
    return partner


def greedy(similarity: np.ndarray) -> Matching:
    """Greedy matching: the most similar free pair first, until one side runs out."""
    similarity = _check(similarity)
    return Matching(greedy_assign(similarity), _row_best(similarity), similarity.shape[1], "greedy")


def nearest(similarity: np.ndarray) -> Matching:
    """Each A latent takes its most similar B latent; several may take the same one (not a matching)."""
    similarity = _check(similarity)
    best = _row_best(similarity)
    return Matching(best, best.copy(), similarity.shape[1], "nearest")


def sinkhorn_plan(similarity: np.ndarray, epsilon: float = 0.05, iterations: int = 100, tolerance: float = 5e-3) -> np.ndarray:
    """Entropic optimal transport plan between uniform marginals for the cost ``1 - S``: ``(n_a, n_b)``.

    Sinkhorn's scaling iterations ``u = a / K v``, ``v = b / K^T u`` with ``K = exp((S - max S) / epsilon)``:
    two float32 matrix-vector products per iteration (torch: about twice numpy's speed on 2 cores; a log-domain
    version costs several full-matrix exponentials per iteration, ~100x slower at n = 2048). Entries of ``K``
    below float32's range flush to 0, harmless since each row keeps its best entries.

    The plan is only rounded to a matching, and the rounding settles long before the marginals do: on SAE-like
    2,048 x 2,048 cosines every latent's heaviest plan entry is final after 10-20 iterations, and the rounded
    matching then agrees with a 300-iteration plan's on 99.3-99.8% of latents (the rest drift among near-ties),
    while the row sums are still 1-3% off. So iterations stop when every row's heaviest entry is unchanged over
    10 iterations, when the row sums are within ``tolerance`` (relative) of uniform, or after ``iterations``.
    """
    if epsilon <= 0:
        raise ValueError(f"Sinkhorn epsilon must be positive, got {epsilon}")
    s = torch.as_tensor(np.asarray(similarity, dtype=np.float32))
    n_a, n_b = s.shape
    kernel = torch.exp((s - s.max()) / epsilon)
    kernel_t = kernel.t().contiguous()
    u, v = torch.ones(n_a), torch.ones(n_b)
    heaviest = None
    for step in range(iterations):
        row_mass = kernel @ v
        if float((u * row_mass * n_a - 1).abs().max()) < tolerance:
            break
        u = (1.0 / n_a) / row_mass.clamp_min(1e-30)
        v = (1.0 / n_b) / (kernel_t @ u).clamp_min(1e-30)
        if step % 10 == 9:
            now = (kernel * v[None, :]).argmax(dim=1)  # u_i scales a whole row: it cannot move the row's argmax
            if heaviest is not None and bool((now == heaviest).all()):
                break
            heaviest = now
    return (u[:, None] * kernel * v[None, :]).numpy()


def sinkhorn(similarity: np.ndarray, epsilon: float = 0.05, iterations: int = 100) -> Matching:
    """Sinkhorn alignment: the entropic transport plan rounded greedily to a one-to-one matching.

    ``proposal`` is each A latent's heaviest plan entry (the soft assignment before rounding).
    """
    similarity = _check(similarity)
    plan = sinkhorn_plan(similarity, epsilon, iterations)
    return Matching(greedy_assign(plan), _row_best(plan), similarity.shape[1], "sinkhorn")


MATCHERS = {"hungarian": hungarian, "greedy": greedy, "sinkhorn": sinkhorn, "nearest": nearest}


def match(similarity: np.ndarray, method: str = "hungarian") -> Matching:
    """Run the named matcher (``hungarian``, ``greedy``, ``sinkhorn`` or ``nearest``)."""
    try:
        matcher = MATCHERS[method]
    except KeyError:
        raise ValueError(f"unknown matching method '{method}'; choose one of {', '.join(MATCHERS)}") from None
    return matcher(similarity)
