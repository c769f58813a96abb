"""Whether another seed finds a latent again: the per-latent form of the diffing's seed floor.

Two SAEs trained from different seeds on the same activations (an SAE and its *replica*) are aligned by the diffing
rule (:func:`~.latent_alignment.align_saes`: Hungarian matchings of encoder and decoder cosines agree, both reach
tau). A latent *replicates* when it fires on the cohort's activations and its partner in the replica is shared and
fires too. A latent that does not replicate may still be real, but the SAE's training noise alone could have made
it, so a population-specific call on it says little; one that replicates is a feature of the data.

``live_shared`` (replicating latents over live latents) is the seed floor that the SAE sweep and the reference
build report; :func:`annotate_replication` writes the per-latent flags into a labels document, for the panel's
latent table. One replica is a noisy judge (two seeds share 8 to 17 % of live latents, depending on the pair), so a
labels document may be compared with several (:func:`annotate_replicas`): each latent then says how many of them
find it again.
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
    ``replicates`` (true or false) on each live latent's entry. Any earlier comparison the document carried (one
    replica or several) is replaced.

    Args:
        document: the labels document of ``measured``'s SAE.
        measured: :func:`replication`'s result.
        replica: what identifies the replica, at least its weights' ``sha256`` (and its ``seed`` where known).
    """
    out = copy.deepcopy(document)
    out.pop("replicas", None)
    out["replica"] = {**replica, "tau": measured["tau"], "live": measured["live"], "live_shared": round(float(measured["live_shared"]), 4)}
    flags = measured["replicates"]
    for entry in out["latents"]:
        entry.pop("replicates", None)
        entry.pop("found_by", None)
        j = int(entry["id"])
        if j < len(flags) and flags[j] is not None:
            entry["replicates"] = bool(flags[j])
    return out


def annotate_replicas(document: dict, measured: list[dict], replicas: list[dict]) -> dict:
    """:func:`annotate_replication` with several replicas: the first is written as the one replica is (``replica``,
    ``replicates``); with more than one, ``replicas`` at the top lists every replica's summary (as ``replica``) and
    each live latent's entry gets ``found_by``, how many of them find it again.

    Args:
        measured: :func:`replication`'s result against each replica, in order.
        replicas: what identifies each replica (:func:`replica_identity`).
    """
    if not measured or len(measured) != len(replicas):
        raise ValueError(f"{len(measured)} comparison(s) for {len(replicas)} replica(s)")
    shas = [r.get("sha256") for r in replicas]
    if len(set(shas)) != len(shas):
        raise ValueError("the same replica is listed twice")
    out = annotate_replication(document, measured[0], replicas[0])
    if len(measured) == 1:
        return out
    out["replicas"] = [{**replica, "tau": m["tau"], "live": m["live"], "live_shared": round(float(m["live_shared"]), 4)}
                       for m, replica in zip(measured, replicas)]  # fmt: skip
    for entry in out["latents"]:
        j = int(entry["id"])
        flags = [m["replicates"][j] if j < len(m["replicates"]) else None for m in measured]
        if flags[0] is not None:  # liveness is the SAE's own, the same against every replica
            entry["found_by"] = int(sum(bool(f) for f in flags))
    return out


def replica_identity(replica) -> dict:
    """``{"sha256", "seed"}`` of a loaded replica SAE: its weights' hash and its training seed (None if unrecorded)."""
    seed = (replica.config.training.get("options") or {}).get("seed")
    return {"sha256": replica.weights_sha256, "seed": seed if isinstance(seed, int) else None}


def replicate_labels(document: dict, sae, replica_folders, store) -> dict:
    """``document`` (the labels of ``sae``) annotated with :func:`replication` against each SAE folder of
    ``replica_folders`` (one folder or several) on ``store``'s :func:`comparison_vectors` (:func:`annotate_replicas`).

    Raises:
        InputFileError: a replica folder is not an SAE, reads other activations than ``sae``, is ``sae`` itself, or
            is listed twice.
    """
    from pathlib import Path

    from ..errors import InputFileError
    from ..sae import BatchTopKSAE

    folders = [replica_folders] if isinstance(replica_folders, (str, Path)) else list(replica_folders)
    vectors = comparison_vectors(store)
    measured, identities = [], []
    for folder in folders:
        replica = BatchTopKSAE.load(folder)
        if replica.config.d_in != sae.config.d_in or replica.config.hook_point != sae.config.hook_point:
            raise InputFileError(folder, f"the replica reads {replica.config.d_in} channels at '{replica.config.hook_point}', "
                                         f"the SAE {sae.config.d_in} at '{sae.config.hook_point}': not the same activations")  # fmt: skip
        if replica.weights_sha256 == getattr(sae, "weights_sha256", None):
            raise InputFileError(folder, "is the SAE itself; a replica is another seed's SAE on the same activations")
        if replica.weights_sha256 in {i["sha256"] for i in identities}:
            raise InputFileError(folder, "is the same SAE as an earlier --replica (same weights)")
        measured.append(replication(sae, replica, vectors))
        identities.append(replica_identity(replica))
    return annotate_replicas(document, measured, identities)
