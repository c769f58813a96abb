"""Aligning the latents of two SAEs (Med-SegLens section 3.6).

SAE latent indices are arbitrary, so comparing two SAEs needs a correspondence. For SAEs in one activation space
the paper compares each latent's encoder vector ``W_enc[:, j]`` and decoder vector ``W_dec[j]``::

    C^p_ij = cos(W_p^(A)_i, W_p^(B)_j),  p in {enc, dec}         (n_a, n_b)
    pi^p   = Hungarian(C^p)
    shared = { i : pi^enc(i) = pi^dec(i), C^enc_i,pi(i) >= tau, C^dec_i,pi(i) >= tau }

Every other latent is specific to its SAE's cohort. The same rule works with any set of similarity "spaces"
(:class:`LatentAlignment` is generic): one space of activation correlations for unrelated models
(:mod:`.spaces`), encoder-only for the baseline, encoder and decoder after a Procrustes map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .matching import Matching, match

DEFAULT_TAU = 0.8
# The paper's tau sweep grid.
TAU_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
COSINE_METHOD = "decoder-encoder-cosine"


def unit_rows(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows scaled to unit norm, float32 ``(n, d)``; zero rows stay zero."""
    v = torch.as_tensor(vectors).detach().float().cpu()
    return torch.nn.functional.normalize(v, dim=1).numpy()


def cosine_matrix(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine similarity of every row of ``a`` ``(n_a, d)`` with every row of ``b`` ``(n_b, d)``: ``(n_a, n_b)``."""
    a, b = unit_rows(a), unit_rows(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cannot compare {a.shape[1]}-dimensional with {b.shape[1]}-dimensional vectors")
    return a @ b.T


def dictionary_vectors(sae) -> dict[str, np.ndarray]:
    """An SAE's latent vectors in activation space: ``{"enc": W_enc.T, "dec": W_dec}``, each ``(d_sae, d_in)``."""
    return {space: vectors.float().cpu().numpy() for space, vectors in sae.latent_directions().items()}


@dataclass
class LatentAlignment:
    """The correspondence between the latents of SAE A (rows) and SAE B (columns), in memory.

    Attributes:
        similarities: one ``(n_a, n_b)`` matrix per space, e.g. ``{"enc": C_enc, "dec": C_dec}``.
        matchings: one matching per space (same keys).
        tau: similarity every space must reach for a latent to be shared.
        primary: the space whose partners are reported for specific latents (the decoder: dictionary directions).
        method: name recorded in the alignment file.
    """

    similarities: dict[str, np.ndarray]
    matchings: dict[str, Matching]
    tau: float = DEFAULT_TAU
    primary: str = "dec"
    method: str = COSINE_METHOD
    info: dict = field(default_factory=dict)

    @property
    def n_a(self) -> int:
        return next(iter(self.similarities.values())).shape[0]

    @property
    def n_b(self) -> int:
        return next(iter(self.similarities.values())).shape[1]

    @property
    def partner(self) -> np.ndarray:
        """``(n_a,)`` partner of every A latent in the primary space (``-1``: unmatched)."""
        return self.matchings[self.primary].partner

    def agree(self) -> np.ndarray:
        """``(n_a,)`` bool: every space's matching picks the same (existing) partner."""
        partner = self.partner
        ok = partner >= 0
        for m in self.matchings.values():
            ok &= m.partner == partner
        return ok

    def pair_similarity(self, space: str, partner: np.ndarray | None = None) -> np.ndarray:
        """``(n_a,)`` similarity in ``space`` between each A latent and its partner (NaN when unmatched)."""
        partner = self.partner if partner is None else partner
        out = np.full(self.n_a, np.nan, dtype=np.float64)
        ok = partner >= 0
        out[ok] = self.similarities[space][np.flatnonzero(ok), partner[ok]]
        return out

    def shared_mask(self, tau: float | None = None) -> np.ndarray:
        """``(n_a,)`` bool: shared latents of A (all matchings agree, every similarity ``>= tau``)."""
        tau = self.tau if tau is None else tau
        ok = self.agree()
        for space in self.similarities:
            with np.errstate(invalid="ignore"):
                ok &= self.pair_similarity(space) >= tau
        return ok

    def shared_pairs(self, tau: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(shared_a, shared_b)``: index arrays of shared latents, pairwise partners."""
        a = np.flatnonzero(self.shared_mask(tau))
        return a, self.partner[a]

    def live_shared_fraction(self, live_a: np.ndarray, live_b: np.ndarray, side: str = "a", tau: float | None = None) -> float | None:
        """Share of one side's *live* latents whose shared partner is live too.

        A dead latent (one that never fires on the cohort's activations) matches something by chance, so shared
        fractions over whole dictionaries say little when many latents are dead; this counts live ones only.

        Args:
            live_a, live_b: ``(n_a,)`` and ``(n_b,)`` bool, the latents that fire on each SAE's cohort.
            side: ``"a"`` or ``"b"``, whose live latents are the denominator.

        Returns:
            The share, or None when that side has no live latent.
        """
        a, b = self.shared_pairs(tau)
        both = int((np.asarray(live_a, dtype=bool)[a] & np.asarray(live_b, dtype=bool)[b]).sum())
        n_live = int(np.count_nonzero(live_a if side == "a" else live_b))
        return both / n_live if n_live else None

    def shared_fraction(self, tau: float | None = None) -> float:
        """Shared latents over the larger dictionary (both sides' fraction when sizes agree)."""
        return float(self.shared_mask(tau).sum() / max(self.n_a, self.n_b))

    def pairs(self) -> list[dict]:
        """Every matched pair of the primary matching, with each space's similarity and the shared flag."""
        shared = self.shared_mask()
        sims = {space: self.pair_similarity(space) for space in self.similarities}
        out = []
        for a in np.flatnonzero(self.partner >= 0):
            pair = {"a": int(a), "b": int(self.partner[a])}
            pair.update({space: round(float(sims[space][a]), 6) for space in self.similarities})
            pair["shared"] = bool(shared[a])
            for space, m in self.matchings.items():
                if space != self.primary and m.partner[a] != self.partner[a]:
                    pair[f"b_{space}"] = int(m.partner[a])  # where the other space's matching disagrees
            out.append(pair)
        return out


def align_vectors(
    vectors_a: dict[str, np.ndarray],
    vectors_b: dict[str, np.ndarray],
    tau: float = DEFAULT_TAU,
    matcher: str = "hungarian",
    method: str = COSINE_METHOD,
    primary: str = "dec",
) -> LatentAlignment:
    """Align two dictionaries given as latent vectors per space (``{"enc": (n_a, d), "dec": (n_a, d)}``).

    Cosine matrices are computed per space and matched with ``matcher`` (Hungarian by default).
    """
    if set(vectors_a) != set(vectors_b):
        raise ValueError(f"the two dictionaries have different spaces: {sorted(vectors_a)} and {sorted(vectors_b)}")
    sims = {space: cosine_matrix(vectors_a[space], vectors_b[space]) for space in vectors_a}
    return align_similarities(sims, tau, matcher, method, primary if primary in sims else next(iter(sims)))


def align_similarities(
    similarities: dict[str, np.ndarray],
    tau: float = DEFAULT_TAU,
    matcher: str = "hungarian",
    method: str = COSINE_METHOD,
    primary: str = "dec",
) -> LatentAlignment:
    """Match each similarity matrix and combine them with the shared-latent rule."""
    matchings = {space: match(s, matcher) for space, s in similarities.items()}
    return LatentAlignment(similarities, matchings, tau, primary if primary in similarities else next(iter(similarities)), method)


def align_saes(sae_a, sae_b, tau: float = DEFAULT_TAU, matcher: str = "hungarian") -> LatentAlignment:
    """Align two SAEs of one activation space by encoder and decoder cosines (the paper's method).

    Raises:
        ValueError: the SAEs take activations of different dimensions (cosines are meaningless; align them by
            activations with :mod:`SegLensLogic.alignment.spaces` instead).
    """
    if sae_a.config.d_in != sae_b.config.d_in:
        raise ValueError(
            f"the SAEs take {sae_a.config.d_in}- and {sae_b.config.d_in}-dimensional activations: their dictionaries "
            "live in different spaces, so cosine alignment is meaningless; use the activation-correlation or "
            "Procrustes method on paired images"
        )
    return align_vectors(dictionary_vectors(sae_a), dictionary_vectors(sae_b), tau, matcher)


def tau_sweep(alignment: LatentAlignment, taus=TAU_GRID) -> list[dict]:
    """Shared latents at each threshold: ``[{"tau", "shared", "shared_fraction"}]`` (matchings do not depend on tau)."""
    return [
        {"tau": float(t), "shared": int(alignment.shared_mask(t).sum()), "shared_fraction": alignment.shared_fraction(t)}
        for t in taus
    ]
