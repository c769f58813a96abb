"""How much of a latent's heatmap can lie inside its class at a given hook? The tables of
docs/measurements/label-resolution.md, on the shipped U-Net reference's cases.

- ``ceiling``: the in-class share of an *ideal* latent, one whose value on each feature-grid cell is the share of
  the cell inside the class, upsampled as the panel's heatmaps are
  (:func:`SegLensLogic.interpretation.label_mass.ideal_latent_mass`). Pooled over the
  test cases (mass over mass), for grids of 8 to 64 cells: what the grid alone allows any latent.
- ``store`` / ``train E`` / ``label E``: an SAE at ``down_2`` (32 x 32, 32 channels), one grid step finer than the
  shipped ``down_3`` (16 x 16, 64 channels): activations of the bundle's training and validation cases, a k 8 SAE of
  expansion E with the shipped SAE's other options (seed 0), labels by the build's labeller over the same cases,
  then :func:`SegLensLogic.interpretation.label_mass` on the 4 test cases. ``label shipped`` measures the shipped
  SAE and labels the same way.
- ``report``: writes ``results.md`` beside this script.

Usage (from the repository root; WORK holds the store, the SAEs and the measured JSON):
    python docs/measurements/label-resolution/measure.py ceiling --work WORK
    python docs/measurements/label-resolution/measure.py store --work WORK
    python docs/measurements/label-resolution/measure.py train 4 --work WORK      # and 8; one PyTorch thread each
    python docs/measurements/label-resolution/measure.py label 4 --work WORK      # and 8, shipped
    python docs/measurements/label-resolution/measure.py report --work WORK
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
BUNDLE = HERE.parents[2] / "Resources" / "adult-glioma-unet"
DATA = HERE.parents[3] / "shared" / "data"
GRIDS = (8, 16, 32, 64)
REGIONS = {"necrotic core": (1,), "edema": (2,), "enhancing tumour": (3,), "tumour core": (1, 3), "whole tumour": (1, 2, 3)}
HOOK = "down_2"


def cohorts():
    from SegLensLogic.data.cohort import Cohort, load_cohort

    training = json.loads((BUNDLE / "bundle.json").read_text())["figures"]["training"]
    cases = {c.case_id: c for name in ("brats2018", "brats-extra") for c in load_cohort(DATA / name, name=name)}
    labelling = Cohort(name="train+validation", cases=[cases[i] for i in training["cases"] + training["validation_cases"]])
    return labelling, Cohort(name="test", cases=[cases[i] for i in training["test_cases"]])


def ceiling(work: Path) -> None:
    from SegLensLogic.interpretation.label_mass import ideal_latent_mass
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.segmentation.inference import prepare_for_model

    model = load_segmenter(BUNDLE / "model")
    sums = {g: {name: np.zeros(2) for name in REGIONS} for g in GRIDS}
    _, test = cohorts()
    for case in test:
        prepared = prepare_for_model(model, case)
        slices = prepared.brain_slices()
        for name, classes in REGIONS.items():
            region = np.isin(prepared.label, classes)
            for g in GRIDS:
                sums[g][name] += ideal_latent_mass(prepared, region, slices, (g, g))
    # The encoder hook of each grid (decoder levels share the grids), read from the model.
    hooks = {name: shape[1] for name, shape in model.hook_points().items() if name.startswith("down") and shape[1] in GRIDS}
    result = {"cases": [c.case_id for c in test], "image_size": model.config.image_size, "hooks": hooks,
              "ceiling": {str(g): {name: inside / total for name, (inside, total) in regions.items()} for g, regions in sums.items()}}  # fmt: skip
    (work / "ceiling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ceiling"], indent=1))


def store(work: Path) -> None:
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae import ExtractionOptions, extract_activations

    labelling, _ = cohorts()
    extract_activations(load_segmenter(BUNDLE / "model"), labelling, work / "store", ExtractionOptions(hook=HOOK), model_dir=BUNDLE / "model",
                        overwrite=True, log=print)  # fmt: skip


def train(work: Path, expansion: int) -> None:
    from SegLensLogic.sae import ActivationStore, SAETrainingOptions
    from SegLensLogic.sae.trainer import train_sae_once

    torch.set_num_threads(1)
    shipped = json.loads((BUNDLE / "sae" / "sae_config.json").read_text())
    options = SAETrainingOptions(k=int(shipped["k"]), expansion=expansion, max_steps=20000, resample_every=None, log_every=10**9, seed=0)
    start = time.monotonic()
    _, report = train_sae_once(ActivationStore(work / "store"), options, work / f"e{expansion}", log=print)
    print(expansion, report["steps"], report["holdout"], f"{time.monotonic() - start:.0f} s")


def label(work: Path, which: str) -> None:
    from SegLensLogic.interpretation import interpret_sae, label_mass
    from SegLensLogic.interpretation.latent_labels import LatentLabels
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae import BatchTopKSAE

    model = load_segmenter(BUNDLE / "model")
    labelling, test = cohorts()
    if which == "shipped":
        sae, labels = BatchTopKSAE.load(BUNDLE / "sae"), LatentLabels(json.loads((BUNDLE / "latents.json").read_text()))
    else:
        sae = BatchTopKSAE.load(work / f"e{which}")
        document = interpret_sae(model, sae, labelling, top_k=16).document
        (work / f"e{which}-latents.json").write_text(json.dumps(document))
        labels = LatentLabels(document)
    measured = label_mass(model, sae, labels, test)
    report = json.loads((work / f"e{which}" / "training_report.json").read_text()) if which != "shipped" else None
    counts: dict[str, int] = {}
    for j in range(sae.d_sae):
        counts[labels.category(j)] = counts.get(labels.category(j), 0) + 1
    row = {"hook": sae.config.hook_point, "latents": sae.d_sae, "categories": counts, "label_mass": measured,
           "holdout": report["holdout"] if report else None}  # fmt: skip
    (work / f"label-{which}.json").write_text(json.dumps(row, indent=1))
    print(which, {k: measured[k] for k in ("fired", "mean_in_class", "mean_in_tumour", "holding")})


def report(work: Path) -> None:
    ceiling_ = json.loads((work / "ceiling.json").read_text())
    hooks = {g: h for h, g in ceiling_["hooks"].items()}
    lines = ["# Label resolution: measured tables", "",
             f"Written by `measure.py report` from its own runs. Test cases: {', '.join(ceiling_['cases'])}; U-Net input "
             f"{ceiling_['image_size']} px.", "",
             "## The grid's ceiling: an ideal latent's share of its heatmap inside the region", "",
             "| feature grid | hook | " + " | ".join(REGIONS) + " |", "|---|---|" + "---|" * len(REGIONS)]  # fmt: skip
    for g, shares in ceiling_["ceiling"].items():
        lines.append(f"| {g} x {g} | {hooks.get(int(g), '')} | " + " | ".join(f"{shares[name]:.0%}" for name in REGIONS) + " |")
    lines += ["", "## Trained SAEs: labels measured on the test cases", "",
              "| hook | latents | EV (held-out positions) | tumour-class latents (NC / ED / ET) | fired on test | mean in class | holding >= 40 % | mean in tumour | edema | enhancing tumour | necrotic core |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for which in ("shipped", "4", "8"):
        path = work / f"label-{which}.json"
        if not path.is_file():
            continue
        row = json.loads(path.read_text())
        m, c = row["label_mass"], row["categories"]
        ev = row["holdout"]["explained_variance"] if row["holdout"] else None
        by = m["by_category"]
        cell = lambda name: f"{by[name]['in_class']:.0%} ({by[name]['latents']})" if name in by else "none"  # noqa: E731
        lines.append(f"| `{row['hook']}`{' (shipped)' if which == 'shipped' else ''} | {row['latents']} | {'' if ev is None else f'{ev:.3f}'} | "
                     f"{m['tumour_latents']} ({c.get('necrotic core', 0)} / {c.get('edema', 0)} / {c.get('enhancing tumour', 0)}) | {m['fired']} | "
                     f"{m['mean_in_class']:.0%} | {m['holding']} | {m['mean_in_tumour']:.0%} | {cell('edema')} | {cell('enhancing tumour')} | {cell('necrotic core')} |")  # fmt: skip
    lines += ["", "Per class: mean share in class (latents that fired on the test cases). Chance (share of the test cases' brain): "
              + ", ".join(f"{k} {v:.1%}" for k, v in json.loads((work / "label-shipped.json").read_text())["label_mass"]["chance"].items()) + "."]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("action", choices=("ceiling", "store", "train", "label", "report"))
    parser.add_argument("which", nargs="?", help="train: the expansion; label: the expansion or 'shipped'")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.action == "train":
        train(args.work, int(args.which))
    elif args.action == "label":
        label(args.work, args.which)
    else:
        {"ceiling": ceiling, "store": store, "report": report}[args.action](args.work)


if __name__ == "__main__":
    main()
