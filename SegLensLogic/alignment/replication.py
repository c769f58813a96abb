"""Whether another seed finds a latent again: the per-latent form of the diffing's seed floor.

Two SAEs trained from different seeds on the same activations (an SAE and its *replica*) are aligned by the diffing
rule (:func:`~.latent_alignment.align_saes`: Hungarian matchings of encoder and decoder cosines agree, both reach
tau). A latent *replicates* when it fires on the cohort's activations and its partner in the replica is shared and
fires too. A latent that does not replicate may still be real, but the SAE's training noise alone could have made
it, so a population-specific call on it says little; one that replicates is a feature of the data.

``live_shared`` (replicating latents over live latents) is the seed floor that the SAE sweep and the reference
build report; :func:`annotate_replication` writes the per-latent flags into a labels document, for the panel's
latent table.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .latent_alignment import DEFAULT_TAU, align_saes


def comparison_vectors(store, n: int = 32768, holdout_fraction: float = 0.05) -> torch.Tensor:
    """Up to ``n`` held-out vectors of an activation store (a fixed split, whatever seed the SAEs had): the
    positions on which the sweep, the build and :func:`replication` decide which latents are live."""
    return store.vectors(store.split(holdout_fraction, seed=12345)[1][:n])


@torch.no_grad()
def live_latents(sae, vectors: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """Boolean ``(d_sae,)``: latents that fire (inference threshold) on at least one of ``vectors`` ``(n, d_in)``,
    raw activation units."""
    fired, device = torch.zeros(sae.d_sae, dtype=torch.bool), sae.device
    for start in range(0, len(vectors), chunk):
        fired |= (sae.encode(vectors[start : start + chunk].to(device)) > 0).any(dim=0).cpu()
    return fired.numpy()


def replication(sae, replica, vectors: torch.Tensor, tau: float = DEFAULT_TAU, alignment=None) -> dict:
    """Which latents of ``sae`` its ``replica`` (another seed, same activations) finds again.

    Args:
        sae, replica: SAEs on the same hook point (same ``d_in``).
        vectors: activations ``(n, d_in)`` (raw units) on which a latent must fire to count as live, e.g. held-out
            positions of the training store.
        tau: the diffing's similarity bar.
        alignment: ``align_saes(sae, replica)`` when the caller has it already (it is not made again).

    Returns:
        ``{"tau", "live", "live_shared", "shared_all", "replicates"}``: the number of live latents of ``sae``, the
        share of them that replicate (0 when none is live), the share of all its latents shared (dead or not), and
        ``replicates``, a ``(d_sae,)`` array holding True/False for live
        latents and None for dead ones.
    """
    if sae.config.d_in != replica.config.d_in:
        raise ValueError(f"the replica reads {replica.config.d_in}-dimensional activations, the SAE {sae.config.d_in}")
    live, live_replica = live_latents(sae, vectors), live_latents(replica, vectors)
    alignment = alignment if alignment is not None else align_saes(sae, replica, tau=tau)
    partner = alignment.partner
    shared = alignment.shared_mask(tau)  # a shared latent has a partner
    found = shared & live
    found[found] &= live_replica[partner[found]]
    replicates = np.array([bool(f) if alive else None for f, alive in zip(found, live)], dtype=object)
    n_live = int(live.sum())
    return {"tau": float(tau), "live": n_live, "live_shared": float(found.sum() / n_live) if n_live else 0.0,
            "shared_all": float(shared.mean()), "replicates": replicates}  # fmt: skip


def annotate_replication(document: dict, measured: dict, replica: dict) -> dict:
    """A copy of a labels document (``latents.json``) carrying :func:`replication`'s result: at the top
    ``replica`` (``{"sha256", "seed", "tau", "live", "live_shared"}``: which SAE was compared and the floor), and
    ``replicates`` (true or false) on each live latent's entry.

    Args:
        document: the labels document of ``measured``'s SAE.
        measured: :func:`replication`'s result.
        replica: what identifies the replica, at least its weights' ``sha256`` (and its ``seed`` where known).
    """
    out = copy.deepcopy(document)
    out["replica"] = {**replica, "tau": measured["tau"], "live": measured["live"], "live_shared": round(float(measured["live_shared"]), 4)}
    flags = measured["replicates"]
    for entry in out["latents"]:
        entry.pop("replicates", None)
        j = int(entry["id"])
        if j < len(flags) and flags[j] is not None:
            entry["replicates"] = bool(flags[j])
    return out


def replica_identity(replica) -> dict:
    """``{"sha256", "seed"}`` of a loaded replica SAE: its weights' hash and its training seed (None if unrecorded)."""
    seed = (replica.config.training.get("options") or {}).get("seed")
    return {"sha256": replica.weights_sha256, "seed": seed if isinstance(seed, int) else None}


def replicate_labels(document: dict, sae, replica_folder, store) -> dict:
    """``document`` (the labels of ``sae``) annotated with :func:`replication` against the SAE folder
    ``replica_folder`` on ``store``'s :func:`comparison_vectors`.

    Raises:
        InputFileError: the replica folder is not an SAE, or reads other activations than ``sae``.
    """
    from ..errors import InputFileError
    from ..sae import BatchTopKSAE

    replica = BatchTopKSAE.load(replica_folder)
    if replica.config.d_in != sae.config.d_in or replica.config.hook_point != sae.config.hook_point:
        raise InputFileError(replica_folder, f"the replica reads {replica.config.d_in} channels at '{replica.config.hook_point}', "
                                             f"the SAE {sae.config.d_in} at '{sae.config.hook_point}': not the same activations")  # fmt: skip
    if replica.weights_sha256 == getattr(sae, "weights_sha256", None):
        raise InputFileError(replica_folder, "is the SAE itself; a replica is another seed's SAE on the same activations")
    return annotate_replication(document, replication(sae, replica, comparison_vectors(store)), replica_identity(replica))
