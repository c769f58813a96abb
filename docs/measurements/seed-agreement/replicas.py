"""Train each shipped bundle's seed replica and mark, in the bundle's labels, which latents it finds again.

For a bundle: its training and validation cases (from ``bundle.json``) are read from ``DATA``, their activations at
the SAE's hook are extracted with the bundle's model, an SAE is trained on them with the options recorded in the
bundle SAE's config but seed 1, and ``seglens bundle --add-to BUNDLE --replica REPLICA --store STORE --overwrite``
writes the comparison into the bundle's ``latents.json`` (the panel's *Other seed* column). The replicas are kept
in ``OUT`` (small); their hashes are recorded in the labels.

    python docs/measurements/seed-agreement/replicas.py --data ../shared/data --out /tmp/replicas \\
        Resources/adult-glioma-unet Resources/adult-glioma-segformer
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


def replica_for(bundle_dir: Path, data: Path, out: Path) -> tuple[Path, Path]:
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
    options = SAETrainingOptions(**{**{k: v for k, v in recorded.items() if k in fields}, "seed": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an SAE step is too small for two threads (benchmarks/sae_sweep_workers.py)
    replica = out / f"{bundle.name}-{bundle.manifest['model']['arch']}-seed1"
    train_sae_once(ActivationStore(store), options, replica, log=lambda m: None)
    torch.set_num_threads(threads)
    print(f"{bundle_dir}: {len(ids)} cases extracted and replica trained in {time.monotonic() - start:.0f} s", flush=True)
    return replica, store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for bundle_dir in args.bundles:
        replica, store = replica_for(bundle_dir, args.data, args.out)
        code = seglens(["bundle", "--add-to", str(bundle_dir), "--replica", str(replica), "--store", str(store), "--overwrite"])
        if code:
            return code
        labels = json.loads((bundle_dir / "latents.json").read_text(encoding="utf-8"))
        print(json.dumps({"bundle": str(bundle_dir), **labels["replica"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
