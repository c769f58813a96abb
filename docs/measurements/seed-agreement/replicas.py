"""Train each shipped bundle's seed replicas and mark, in the bundle's labels, which latents they find again.

For a bundle: its training and validation cases (from ``bundle.json``) are read from ``DATA``, their activations at
the SAE's hook are extracted with the bundle's model, an SAE is trained on them with the options recorded in the
bundle SAE's config but seed 1 (and 2, 3, ... with ``--seeds``), and ``seglens bundle --add-to BUNDLE --replica
REPLICA [--replica ...] --store STORE --overwrite`` writes the comparison into the bundle's ``latents.json`` (the
panel's *Other seed* column: yes / no for one seed, "3 of 5" for several). The replicas are kept in ``OUT`` (small);
their hashes are recorded in the labels. The shipped U-Net was compared with seeds 1 to 5, the SegFormer with seed 1:

    python docs/measurements/seed-agreement/replicas.py Resources/adult-glioma-unet --data ../shared/data \\
        --out /tmp/replicas --seeds 1 2 3 4 5
    python docs/measurements/seed-agreement/replicas.py --data ../shared/data --out /tmp/replicas \\
        Resources/adult-glioma-segformer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from SegLensLogic.app.cli import main as seglens
from SegLensLogic.bundle import load_bundle
from SegLensLogic.data.cohort import Cohort, load_cohort
from SegLensLogic.sae import ActivationStore, ExtractionOptions, SAETrainingOptions, extract_activations
from SegLensLogic.sae.trainer import train_sae_once


def replicas_for(bundle_dir: Path, data: Path, out: Path, seeds: list[int]) -> tuple[list[Path], Path]:
    bundle = load_bundle(bundle_dir)
    training = bundle.figures["training"]
    ids = list(training["cases"]) + list(training.get("validation_cases", []))
    cases = {c.case_id: c for name in ("brats2018", "brats-extra") if (data / name).is_dir() for c in load_cohort(data / name, name=name)}
    missing = [i for i in ids if i not in cases]
    if missing:
        raise SystemExit(f"{bundle_dir}: training cases {missing} are not in {data}")
    cohort = Cohort(name="train+validation", cases=[cases[i] for i in ids])
    store = out / f"{bundle.name}-{bundle.manifest['model']['arch']}-store"
    start = time.monotonic()
    extract_activations(bundle.load_model(), cohort, store, ExtractionOptions(hook=bundle.hook_point), model_dir=bundle.model_dir,
                        overwrite=True, log=lambda m: None)  # fmt: skip
    recorded = bundle.load_sae().config.training["options"]
    fields = {f.name for f in dataclasses.fields(SAETrainingOptions)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an SAE step is too small for two threads (benchmarks/sae_sweep_workers.py)
    replicas = []
    for seed in seeds:
        options = SAETrainingOptions(**{**{k: v for k, v in recorded.items() if k in fields}, "seed": seed})
        replicas.append(out / f"{bundle.name}-{bundle.manifest['model']['arch']}-seed{seed}")
        train_sae_once(ActivationStore(store), options, replicas[-1], log=lambda m: None)
    torch.set_num_threads(threads)
    print(f"{bundle_dir}: {len(ids)} cases extracted and {len(seeds)} replica(s) trained in {time.monotonic() - start:.0f} s", flush=True)
    return replicas, store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="the replicas' seeds (default 1)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for bundle_dir in args.bundles:
        replicas, store = replicas_for(bundle_dir, args.data, args.out, args.seeds)
        flags = [arg for replica in replicas for arg in ("--replica", str(replica))]
        code = seglens(["bundle", "--add-to", str(bundle_dir), *flags, "--store", str(store), "--overwrite"])
        if code:
            return code
        labels = json.loads((bundle_dir / "latents.json").read_text(encoding="utf-8"))
        print(json.dumps({"bundle": str(bundle_dir), **labels["replica"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
