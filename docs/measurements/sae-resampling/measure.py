"""The table of docs/measurements/sae-resampling.md: for SAEs trained on one activation store with and without dead-latent
resampling, dead latents and explained variance on 150,000 vectors of the store, the automatic interpretation's
categories (labels from ``seglens interpret`` over the training cases) and whether tumour labels hold on the test cases
(whole-volume activation mass inside the labelled class, SegLensLogic.interpretation.label_mass).

Usage (from the repository root; HOW.md has the commands that made the inputs):
    python docs/measurements/sae-resampling/measure.py MODEL STORE TEST_COHORT NAME=SAE_DIR:LABELS.json ... > results.md
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from SegLensLogic.data.cohort import load_cohort
from SegLensLogic.interpretation import label_mass, load_latent_labels
from SegLensLogic.interpretation.labeller import TUMOUR_CATEGORIES
from SegLensLogic.networks import load_segmenter
from SegLensLogic.sae import ActivationStore, BatchTopKSAE, evaluate_reconstruction
from SegLensLogic.storage import read_json

READABLE = (*TUMOUR_CATEGORIES, "tumour boundary")


def main(model_dir: str, store_dir: str, test: str, *entries: str) -> None:
    model, store, cohort = load_segmenter(model_dir, device="cpu"), ActivationStore(store_dir), load_cohort(test)
    positions = np.sort(np.random.default_rng(0).choice(len(store), min(150_000, len(store)), replace=False))
    vectors = store.vectors(positions)
    print(f"Store `{store_dir}` ({len(store):,} vectors of {store.d_in} channels); test cases: {len(cohort)}.\n")
    print("| SAE | steps | resampled (latents, per round) | EV | dead (on 150,000 vectors, or all) | tumour-labelled (NC / ED / ET / boundary) "
          "| tumour-class latents firing on test | holding >= 40 % in class | mean in class | mean in any tumour |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in entries:
        name, paths = entry.split("=", 1)
        sae_dir, labels_path = paths.split(":", 1)
        sae, report = BatchTopKSAE.load(sae_dir), read_json(f"{sae_dir}/training_report.json")
        metrics = evaluate_reconstruction(sae, vectors)
        labels = load_latent_labels(labels_path)
        counts = collections.Counter(labels.category(j) for j in range(sae.d_sae))
        mass = label_mass(model, sae, labels, cohort)
        rounds = [r["latents"] for r in report.get("resamples") or []]
        print(f"| {name} | {report['steps']} | {', '.join(map(str, rounds)) or 'none'} | {metrics['explained_variance']:.3f} "
              f"| {metrics['dead_fraction']:.1%} | {sum(counts[c] for c in READABLE)} "
              f"({' / '.join(str(counts[c]) for c in READABLE)}) | {len(mass['latents'])} | {mass['holding']} "
              f"| {mass['mean_in_class']:.1%} | {mass['mean_in_tumour']:.1%} |", flush=True)
    print("\nChance (share of the test brains): " + ", ".join(f"{k} {v:.1%}" for k, v in mass["chance"].items()) + ".")


if __name__ == "__main__":
    main(*sys.argv[1:])
