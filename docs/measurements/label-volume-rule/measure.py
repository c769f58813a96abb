"""Would labels hold better on new cases if the labeller named a latent by where its whole-volume mass lies on the
labelling cases, rather than by its top-K slices? The table of docs/measurements/label-volume-rule.md.

For every latent, on every case: its activation mass on the feature grid of each encoded slice, weighted by each
label class's share of the grid cell (:func:`SegLensLogic.sae.activations.mask_fraction_on_grid`), summed over the
volume. Shares pool the cases of a cohort (mass over mass), as :func:`SegLensLogic.interpretation.label_mass` does
at image resolution (the two agree to 0.002 on the shipped U-Net's labels).

Rows: the labeller's own tumour-class labels (top-K slices over the training cases); then a volume rule at each
threshold t: a latent whose largest tumour-class share over the training cases is at least t gets that class, one
with no class at t but at least half its mass in tumour would be "whole tumour". Each row's in-class share is
measured on the test cases.

Usage (from the repository root):
    python docs/measurements/label-volume-rule/measure.py NAME MODEL SAE LABELS TRAIN_COHORT TEST_COHORT [--masses FILE]
``--masses``: where the per-case masses are kept (computed when the file is absent, read when present).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from SegLensLogic.data.cohort import load_cohort
from SegLensLogic.interpretation import load_latent_labels
from SegLensLogic.networks import load_segmenter
from SegLensLogic.sae import BatchTopKSAE
from SegLensLogic.sae.activations import mask_fraction_on_grid
from SegLensLogic.sae.codes import encode_volume
from SegLensLogic.segmentation.inference import prepare_for_model

CLASSES = ("background", "necrotic core", "edema", "enhancing tumour")


def case_masses(model, sae, cohort) -> dict[str, list]:
    """``case_id -> (d_sae, 4)`` activation mass of every latent on each class over the whole volume."""
    out = {}
    for case in cohort:
        prepared = prepare_for_model(model, case)
        codes = encode_volume(model, sae, prepared)
        positions = codes.positions_of()
        mass = np.zeros((sae.d_sae, len(CLASSES)))
        for c in range(len(CLASSES)):
            share = mask_fraction_on_grid(prepared.label == c, prepared.geometry, codes.slices, codes.grid).numpy().ravel()
            mass[:, c] = np.bincount(codes.latents, weights=codes.values * share[positions], minlength=sae.d_sae)
        out[case.case_id] = mass.tolist()
    return out


def tumour_composition(cohort) -> np.ndarray:
    """Share of the cohort's tumour voxels (label > 0) in necrotic core, edema, enhancing tumour (BraTS 2023 codes)."""
    from SegLensLogic.data.cases import read_case

    counts = np.zeros(3)
    for case in cohort:
        label = read_case(case, modalities=[case.modalities[0]]).label  # mapped to SegLens classes
        counts += np.bincount(label[label > 0].astype(np.int64), minlength=4)[1:4]
    return counts / counts.sum()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("name", "model", "sae", "labels", "train", "test"):
        parser.add_argument(name)
    parser.add_argument("--masses", type=Path)
    args = parser.parse_args()
    train, test = load_cohort(args.train), load_cohort(args.test)
    if args.masses and args.masses.is_file():
        masses = json.loads(args.masses.read_text())
    else:
        model, sae = load_segmenter(args.model, device="cpu"), BatchTopKSAE.load(args.sae)
        masses = case_masses(model, sae, [*train, *test])
        if args.masses:
            args.masses.write_text(json.dumps(masses))

    def shares(cohort):
        total = sum(np.asarray(masses[c.case_id]) for c in cohort)
        return total, total / np.maximum(total.sum(axis=1, keepdims=True), 1e-12)

    m_train, s_train = shares(train)
    m_test, s_test = shares(test)
    labels = load_latent_labels(args.labels)
    fired = m_test.sum(axis=1) > 0
    print(f"### {args.name}\n")
    composition = {name: tumour_composition(cohort) for name, cohort in (("training", train), ("test", test))}
    print(f"{len(train)} training cases, {len(test)} test cases. Share of the tumour's voxels in each class: "
          + "; ".join(f"{name} cases " + ", ".join(f"{n} {v:.0%}" for n, v in zip(CLASSES[1:], shares_)) for name, shares_ in composition.items()) + ".\n")
    print("| rule | tumour-class latents (NC / ED / ET) firing on test | mean share in class on test | holding >= 40 % | 'whole tumour' latents: mean share in tumour on test |")
    print("|---|---|---|---|---|")

    def row(name, assigned, whole):
        assigned = [(j, c) for j, c in assigned if fired[j]]
        values = [s_test[j, c] for j, c in assigned]
        counts = " / ".join(str(sum(c == i for _, c in assigned)) for i in (1, 2, 3))
        whole = [j for j in whole if fired[j]]
        whole_text = f"{len(whole)}: {np.mean([s_test[j, 1:].sum() for j in whole]):.0%}" if whole else "none"
        print(f"| {name} | {len(assigned)} ({counts}) | {np.mean(values):.1%} | {sum(v >= 0.4 for v in values)} | {whole_text} |")

    row("labeller (top-K slices)", [(j, CLASSES.index(labels.category(j))) for j in range(len(m_test)) if labels.category(j) in CLASSES[1:]], [])
    for t in (0.3, 0.4, 0.5):
        assigned, whole = [], []
        for j in range(len(m_train)):
            if m_train[j].sum() <= 0:
                continue
            best = int(np.argmax(s_train[j, 1:])) + 1
            if s_train[j, best] >= t:
                assigned.append((j, best))
            elif s_train[j, 1:].sum() >= 0.5:
                whole.append(j)
        row(f"volume rule, t = {t}", assigned, whole)
    # Do the training cases predict the test cases? Per latent, train share against test share in its labelled class.
    print()
    for category in CLASSES[1:]:
        c = CLASSES.index(category)
        members = [j for j in range(len(m_test)) if labels.category(j) == category and fired[j]]
        if len(members) >= 3:
            a, b = s_train[members, c], s_test[members, c]
            where = ", ".join(f"{name} {s_test[members, i].mean():.0%}" for i, name in enumerate(CLASSES) if i)
            print(f"- {category} ({len(members)} labelled latents): mean share in class on the training cases {a.mean():.0%}, on the test cases {b.mean():.0%}; "
                  f"correlation across latents {np.corrcoef(a, b)[0, 1]:.2f}. Their test mass: {where}; any tumour {s_test[members, 1:].sum(axis=1).mean():.0%}.")
    print()


if __name__ == "__main__":
    main()
