"""Which SAE settings give dictionaries that are alive and identifiable on a hook's activations.

For every setting of a grid (k, expansion, learning rate, initialisation, ...) two SAEs are trained from two seeds
on the same store; each is measured on held-out vectors (explained variance, L0, dead fraction) and the two are
aligned by the diffing rule (:func:`~SegLensLogic.alignment.latent_alignment.align_saes`, tau 0.8). ``seed_shared`` is
the share of the first seed's live latents that have a shared partner among the second's live latents: a latent
another seed does not find again is not a feature of the data, and cohort comparisons need this floor to be high.

:func:`choose_setting` picks a setting by stated rules (its docstring), so that the choice is reproducible.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..alignment.replication import comparison_vectors, replication
from ..sae.activations import ActivationStore
from ..sae.model import BatchTopKSAE
from ..sae.trainer import SAETrainingOptions, train_sae, train_sae_once

# Quality bars (issue goals): held-out explained variance, dead fraction, seed agreement of live latents.
EV_MIN, DEAD_MAX, AGREEMENT_MIN = 0.85, 0.10, 0.5
# Readability bar: latents the automatic interpretation labels with a tumour class or the tumour boundary.
TUMOUR_LATENTS_MIN = 24
READABLE_CATEGORIES = ("necrotic core", "edema", "enhancing tumour", "tumour boundary")


def seed_agreement(sae_a: BatchTopKSAE, sae_b: BatchTopKSAE, vectors: torch.Tensor, tau: float = 0.8) -> dict:
    """Share of ``sae_a``'s live latents that ``sae_b`` finds again (:func:`~SegLensLogic.alignment.replication.replication`)."""
    measured = replication(sae_a, sae_b, vectors, tau=tau)
    return {"seed_shared": measured["live_shared"], "seed_shared_all": measured["shared_all"], "live": measured["live"]}


def sae_sweep(
    store: ActivationStore,
    grid: Sequence[dict],
    base: SAETrainingOptions | None = None,
    seeds: tuple[int, int] = (0, 1),
    device: str | torch.device | None = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
    cache: str | Path | None = None,
    workers: int = 1,
) -> tuple[list[dict], dict]:
    """Train two seeds per setting of ``grid`` (dicts of :class:`SAETrainingOptions` fields over ``base``).

    ``cache``: a folder keeping every trained SAE (one folder per setting and seed, e.g. ``k32-expansion16-seed0``), so that a sweep cut off
    part way trains only what it had not finished when run again.

    ``workers``: with a ``cache`` and no GPU, train this many SAEs at a time, each in its own process on
    ``torch.get_num_threads() // workers`` threads (:func:`train_in_workers`). An SAE step is too small to use two
    CPU threads well: on 2 cores a sweep ran 1.8-2.2 times faster two SAEs at a time than one at a time on both
    threads (``benchmarks/sae_sweep_workers.py``).

    Returns:
        ``(rows, saes)``: one row per setting (its fields, held-out metrics of the first seed, both seeds' dead
        fractions, ``seed_shared``, steps and seconds), and when ``keep`` the trained SAEs
        ``{(row index, seed): (sae, report)}`` (else empty).
    """
    base = base or SAETrainingOptions()
    vectors = comparison_vectors(store, holdout_fraction=base.holdout_fraction)
    rows, kept = [], {}
    if workers > 1 and cache is not None and torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu":
        members = [(dataclasses.replace(base, **setting, seed=seed), _member_folder(cache, setting, seed)) for setting in grid for seed in seeds]
        train_in_workers(store.folder, members, workers, log=log)
    for index, setting in enumerate(grid):
        trained = []
        for seed in seeds:
            options = dataclasses.replace(base, **setting, seed=seed)
            if cache is None:
                sae, report = train_sae(store, options, device=device, log=lambda m: None)
            else:
                sae, report = train_sae_once(store, options, _member_folder(cache, setting, seed), device=device, log=lambda m: None)
            trained.append((sae, report))
            if keep:
                kept[(index, seed)] = (sae, report)
        agreement = seed_agreement(trained[0][0], trained[1][0], vectors)
        first = trained[0][1]
        row = {
            **setting,
            "explained_variance": first["holdout"]["explained_variance"],
            "l0": first["holdout"]["l0"],
            "dead_fraction": float(np.mean([r["holdout"]["dead_fraction"] for _, r in trained])),
            **agreement,
            "steps": int(np.mean([r["steps"] for _, r in trained])),
            "seconds": round(sum(r["seconds"] for _, r in trained), 1),
        }
        rows.append(row)
        log("  " + ", ".join(f"{k} {v}" for k, v in setting.items())
            + f": EV {row['explained_variance']:.3f}, dead {row['dead_fraction']:.3f}, L0 {row['l0']:.1f}, "
            f"seeds share {row['seed_shared']:.2f} of {row['live']} live latents ({row['steps']} steps, {row['seconds']:.0f} s)")  # fmt: skip
    return rows, kept


def _member_folder(cache: str | Path, setting: dict, seed: int) -> Path:
    return Path(cache) / ("-".join(f"{key}{value}" for key, value in setting.items()) + f"-seed{seed}")


def _train_member(job: tuple[str, SAETrainingOptions, str, int]) -> tuple[str, int, float]:
    """One sweep member in a worker process: trained into its folder (:func:`train_sae_once`)."""
    store_folder, options, folder, threads = job
    torch.set_num_threads(threads)
    _, report = train_sae_once(ActivationStore(store_folder), options, folder, device="cpu", log=lambda m: None)
    return folder, report["steps"], report["seconds"]


def train_in_workers(store_folder: str | Path, members: Sequence[tuple[SAETrainingOptions, Path]], workers: int,
                     log: Callable[[str], None] = print) -> None:  # fmt: skip
    """Train the ``(options, folder)`` members not yet in their folders, ``workers`` at a time, each in its own
    process (spawned: no state shared with this one) on ``1/workers`` of this process's PyTorch threads. The
    results are read back from the folders (:func:`~SegLensLogic.sae.trainer.load_trained`), so a run cut off
    part way keeps every member that finished. On an error (a worker's, or this process stopped) the workers are
    terminated at once: what they were training is trained again next time."""
    import multiprocessing

    from ..sae.trainer import load_trained

    todo = [(options, Path(folder)) for options, folder in members if load_trained(folder, options) is None]
    if not todo:
        return
    threads = max(1, torch.get_num_threads() // workers)  # per worker, as asked: a lone last member keeps its share
    workers = min(workers, len(todo))
    log(f"  training {len(todo)} SAEs, {workers} at a time ({threads} thread(s) each)")
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        jobs = [(str(store_folder), options, str(folder), threads) for options, folder in todo]
        for folder, steps, seconds in pool.imap_unordered(_train_member, jobs):  # a worker's error is raised here
            log(f"    {Path(folder).name}: {steps} steps, {seconds:.0f} s")
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def readability(model, sae_pairs: Sequence[tuple], cohort, top_k: int = 16, log: Callable[[str], None] = print,
                vectors: torch.Tensor | None = None) -> list[dict]:
    """How readable each setting's dictionary is to a clinician: the automatic interpretation of both seeds' SAEs
    over ``cohort`` (labelled cases), per setting.

    Args:
        sae_pairs: per setting, ``(sae of seed 0, sae of seed 1)``.

    Returns:
        Per setting: ``tumour_latents`` (seed 0's latents labelled necrotic core, edema, enhancing tumour or tumour
        boundary), ``tumour_latents_seed1``, ``label_agreement`` (the share of seed 0's tumour latents whose
        partner in seed 1 under the diffing's matching, shared or not, has the same category) and
        ``label_stability`` (seed 0's split-half agreement of its labels); with ``vectors`` (activations on which a
        latent must fire to count as live), ``tumour_replicating``: seed 0's tumour latents that seed 1 finds again by
        the diffing rule (:func:`~SegLensLogic.alignment.replication.replication`), the latents a clinician can both
        read and trust to be features of the data.
    """
    from ..alignment.latent_alignment import align_saes
    from ..interpretation import interpret_sae

    rows = []
    for first, second in sae_pairs:
        categories = []
        stability = None
        for sae in (first, second):
            document = interpret_sae(model, sae, cohort, top_k=top_k, log=None).document
            categories.append({int(entry["id"]): entry["category"] for entry in document["latents"]})
            stability = stability if stability is not None else (document.get("stability") or {}).get("agreement")
        readable = [j for j, c in categories[0].items() if c in READABLE_CATEGORIES]
        alignment = align_saes(first, second)
        partner = alignment.partner
        same = [j for j in readable if partner[j] >= 0 and categories[1].get(int(partner[j])) == categories[0][j]]
        row = {"tumour_latents": len(readable),
               "tumour_latents_seed1": sum(c in READABLE_CATEGORIES for c in categories[1].values()),
               "label_agreement": len(same) / len(readable) if readable else 0.0,
               "label_stability": stability}  # fmt: skip
        if vectors is not None:
            flags = replication(first, second, vectors, alignment=alignment)["replicates"]
            row["tumour_replicating"] = sum(bool(flags[j]) for j in readable)
        rows.append(row)
        log(f"  k {first.config.k}, expansion {first.config.expansion}: {row['tumour_latents']} tumour latents (seed 1: {row['tumour_latents_seed1']}), "
            f"{row['label_agreement']:.0%} with the same label in the other seed"
            + (f", {row['tumour_replicating']} found again by it" if "tumour_replicating" in row else ""))
    return rows


def choose_setting(rows: Sequence[dict], prefer: dict | None = None) -> tuple[int, str]:
    """The row to use, and why.

    Rules, in order: keep settings with explained variance >= 0.85 and dead fraction <= 0.10 (else all); among
    those, keep those whose seeds share >= 0.5 of live latents (else all kept so far); when the rows were measured
    for readability (:func:`readability`: ``tumour_latents``), keep those with at least 24 tumour latents (else
    all kept so far) and take the one with the most tumour latents the other seed finds again (when measured:
    ``tumour_replicating``), then whose tumour labels the other seed repeats most, then the most tumour latents;
    without readability, take ``prefer`` (e.g. the paper's k 32, expansion 16) if it is still there, else
    the highest seed agreement.
    """
    candidates = list(range(len(rows)))
    why = []
    good = [i for i in candidates if rows[i]["explained_variance"] >= EV_MIN and rows[i]["dead_fraction"] <= DEAD_MAX]
    if good:
        candidates = good
    else:
        why.append(f"no setting reaches EV {EV_MIN} with at most {DEAD_MAX:.0%} dead latents")
    identifiable = [i for i in candidates if rows[i]["seed_shared"] >= AGREEMENT_MIN]
    if identifiable:
        candidates = identifiable
    else:
        why.append(f"no remaining setting has seeds sharing {AGREEMENT_MIN:.0%} of live latents")
    if all("tumour_latents" in rows[i] for i in candidates):
        readable = [i for i in candidates if rows[i]["tumour_latents"] >= TUMOUR_LATENTS_MIN]
        if readable:
            candidates = readable
        else:
            why.append(f"no remaining setting has {TUMOUR_LATENTS_MIN} latents labelled with a tumour class")
        if all("tumour_replicating" in rows[i] for i in candidates):
            chosen = max(candidates, key=lambda i: (rows[i]["tumour_replicating"], rows[i]["label_agreement"], rows[i]["tumour_latents"]))
            why.append("the most tumour latents another seed finds again (then the most repeatable labels) among the settings that meet the most bars")
            return chosen, "; ".join(why)
        chosen = max(candidates, key=lambda i: (rows[i]["label_agreement"], rows[i]["tumour_latents"], rows[i]["seed_shared"]))
        why.append("the most repeatable tumour labels (then the most tumour latents) among the settings that meet the most bars")
        return chosen, "; ".join(why)
    if prefer and (match := [i for i in candidates if all(rows[i].get(k) == v for k, v in prefer.items())]):
        chosen = match[0]
        why.append("the paper's setting meets every bar that any setting meets")
    else:
        chosen = max(candidates, key=lambda i: (rows[i]["seed_shared"], rows[i]["explained_variance"]))
        why.append("highest seed agreement among the settings that meet the most bars")
    return chosen, "; ".join(why)
