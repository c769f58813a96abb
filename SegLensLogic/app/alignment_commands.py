"""``seglens align`` (two SAEs -> alignment.json) and ``seglens diff`` (many cohorts -> matrix CSV + heatmap)."""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
from pathlib import Path

from ..errors import InputFileError, SegLensError, refuse_existing
from ..storage import refuse_output_folder

METHOD_CHOICES = ("auto", "cosine", "activation-correlation", "procrustes")


def _load_sae(folder: str | Path):
    from ..sae import BatchTopKSAE

    return BatchTopKSAE.load(folder)


def _cohort_cases(folder: str | Path):
    from ..data.cohort import load_cohort

    cohort = load_cohort(folder)
    if len(cohort) == 0:
        raise InputFileError(folder, "holds no cases to run both models on")
    return cohort


def align_command(args: argparse.Namespace, log=print) -> dict:
    """Align ``args.sae_a`` with ``args.sae_b`` and write the alignment file; returns the document."""
    from ..alignment import spaces
    from ..alignment.latent_alignment import DEFAULT_TAU, align_saes, tau_sweep
    from ..alignment.files import alignment_document, sae_record, write_alignment
    from ..alignment.quality import alignment_metrics, baselines_table, format_table

    out = refuse_existing(args.out, args.overwrite)
    sae_a, sae_b = _load_sae(args.sae_a), _load_sae(args.sae_b)
    relation = spaces.space_relation(sae_a, sae_b, args.model_a, args.model_b)
    method = args.method
    if method == "auto":
        method = "cosine" if relation["shared_space"] is not False else "activation-correlation"
    if method == "cosine":
        if relation["shared_space"] is False:
            raise SegLensError(
                f"cosine alignment of {args.sae_a} and {args.sae_b} is meaningless: {relation['detail']}; use "
                "--method activation-correlation or procrustes with --model-a, --model-b and --cohort (the same images through both models)"
            )
        if relation["shared_space"] is None:
            log(f"warning: {relation['detail']}")
        tau = DEFAULT_TAU if args.tau is None else args.tau
        alignment = align_saes(sae_a, sae_b, tau)
    else:
        if not (args.model_a and args.model_b and args.cohort):
            raise SegLensError(f"--method {method} needs --model-a, --model-b and --cohort (images run through both models)")
        from ..networks import load_segmenter

        from .arguments import device_from_args

        device = device_from_args(args)
        model_a, model_b = load_segmenter(args.model_a, device=device), load_segmenter(args.model_b, device=device)
        cases = _cohort_cases(args.cohort)
        for name, sae, model in (("A", sae_a, model_a), ("B", sae_b, model_b)):
            hook = sae.config.hook_point or model.config.hook_point
            if model.hook_points()[model._hook(hook)][0] != sae.config.d_in:
                raise SegLensError(f"SAE {name} takes {sae.config.d_in}-dimensional activations but its model's hook '{hook}' has another width")
        if method == "activation-correlation":
            tau = 0.5 if args.tau is None else args.tau
            codes = spaces.paired_codes(model_a, sae_a, model_b, sae_b, cases, max_slices_per_case=args.max_slices)
            alignment = spaces.correlation_alignment(sae_a, sae_b, codes, tau, encoded=True)
        else:
            tau = DEFAULT_TAU if args.tau is None else args.tau
            pairs = spaces.paired_activations(model_a, model_b, cases, sae_a.config.hook_point, sae_b.config.hook_point, max_slices_per_case=args.max_slices)
            h_a, h_b = spaces.collect_pairs(pairs, seed=args.seed)
            alignment = spaces.procrustes_alignment(sae_a, sae_b, h_a, h_b, tau)
        alignment.info["cohort"] = str(args.cohort)
    metrics = alignment_metrics(alignment, trials=args.bootstrap, seed=args.seed)
    floor = None
    if args.seed_replica:
        replica = _load_sae(args.seed_replica)
        check = spaces.space_relation(sae_a, replica)
        if check["relation"] != "same-model":
            raise SegLensError(f"{args.seed_replica}: a seed replica must be trained on SAE A's model activations ({check['detail']})")
        floor = {"shared_fraction": align_saes(sae_a, replica, alignment.tau).shared_fraction(),
                 "sae": str(args.sae_a), "replica": str(args.seed_replica)}  # fmt: skip
    record_a = sae_record(sae_a, args.sae_a, args.name_a)
    record_b = sae_record(sae_b, args.sae_b, args.name_b)
    document = alignment_document(alignment, record_a, record_b, metrics, relation, tau_sweep(alignment), floor)
    if warning := same_seed_warning(record_a, record_b):
        log(f"warning: {warning}")
        document["warnings"] = [warning]
    if args.table and set(alignment.similarities) == {"enc", "dec"}:
        rows = baselines_table(alignment, trials=args.bootstrap, seed=args.seed)
        document["baselines"] = rows
        log(format_table(rows))
    write_alignment(document, out, overwrite=args.overwrite)
    shared = len(document["shared_a"])
    floor_text = f" (seed noise floor {100 * floor['shared_fraction']:.1f}%)" if floor else ""
    log(f"{record_a['name']} <-> {record_b['name']} ({document['method']}, {relation['relation']}): {shared} shared latents, "
        f"{100 * document['shared_fraction']:.1f}%{floor_text}")  # fmt: skip
    log(f"Wrote {out}")
    return document


def same_seed_warning(record_a: dict, record_b: dict) -> str | None:
    """A warning when two SAEs of one size were trained with the same seed: they start from the same
    dictionary, and short training leaves much of it in place (on the test pipeline, 77% of a trained SAE's
    latents stay shared with its own initialisation), so shared latents may reflect the seed, not the data."""
    if record_a.get("seed") is not None and record_a.get("seed") == record_b.get("seed") and record_a["d_sae"] == record_b["d_sae"] \
            and record_a.get("d_in") == record_b.get("d_in") and record_a.get("sha256") != record_b.get("sha256"):
        return (f"both SAEs were trained with seed {record_a['seed']}, so they started from the same dictionary: shared latents "
                "may reflect the common initialisation; compare with SAEs of different seeds and the seed noise floor")
    return None


def cmd_align(args: argparse.Namespace) -> int:
    from ..console import log

    align_command(args, log)
    return 0


def _unique_names(records: list[dict], folders: list[str], given: list[str] | None) -> list[str]:
    if given:
        if len(given) != len(folders):
            raise SegLensError(f"--names gives {len(given)} names for {len(folders)} SAEs")
        names = given
    else:
        names = [r["name"] for r in records]
        if len(set(names)) < len(names):  # two SAEs of one cohort: tell them apart by folder
            names = [f"{n} ({Path(f).name})" for n, f in zip(names, folders)]
    if len(set(names)) < len(names):
        raise SegLensError(f"cohort names must differ, got {names}")
    return names


def _matrix_csv(names: list[str], matrix) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cohort", *names])
    for name, row in zip(names, matrix):
        writer.writerow([name, *(f"{v:.6f}" for v in row)])
    return buffer.getvalue()


def _rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def save_heatmap(names: list[str], matrix, path: Path, floors: dict | None = None, overwrite: bool = False) -> Path:
    """The fraction-shared matrix as a PNG heatmap (percent in each cell; seed noise floors in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..storage import atomic_write_bytes

    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(100 * matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, j in itertools.product(range(len(names)), repeat=2):
        value = 100 * matrix[i, j]
        ax.text(j, i, f"{value:.1f}%", ha="center", va="center", color="white" if value < 60 else "black", fontsize=9)
    title = "Shared SAE latents"
    if floors:
        title += "\nseed noise floor: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in floors.items())
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="% shared")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def diff_command(args: argparse.Namespace, log=print) -> dict:
    """Align every pair of SAEs and write the matrix (CSV, PNG), the pairs table, a summary and each alignment."""
    from ..alignment import spaces
    from ..alignment.latent_alignment import tau_sweep
    from ..alignment.cohorts import diff_cohorts
    from ..alignment.files import alignment_document, sae_record, write_alignment
    from ..alignment.quality import alignment_metrics

    out = Path(args.out)
    outputs = [out / "fraction_shared.csv", out / "fraction_shared.png", out / "pairs.csv", out / "diff.json"]
    refuse_output_folder(out, args.overwrite, [path.name for path in outputs])
    if len(args.saes) < 2:
        raise SegLensError("seglens diff needs at least two SAE folders")
    saes = [_load_sae(f) for f in args.saes]
    records = [sae_record(s, f) for s, f in zip(saes, args.saes)]
    names = _unique_names(records, args.saes, args.names.split(",") if args.names else None)
    for (i, a), (j, b) in itertools.combinations(enumerate(saes), 2):
        relation = spaces.space_relation(a, b)
        if relation["shared_space"] is False:
            raise SegLensError(f"cannot compare {args.saes[i]} and {args.saes[j]} by cosines: {relation['detail']} (use seglens align --method activation-correlation)")
        if relation["shared_space"] is None:
            log(f"warning: {names[i]} / {names[j]}: {relation['detail']}")
    replicas = {}
    for item in args.seed_replica or []:
        name, sep, folder = item.rpartition("=")
        replica = _load_sae(folder)
        if not sep:  # match by the model and cohort the replica was trained on
            matches = [n for n, s in zip(names, saes) if s.config.model_sha256 == replica.config.model_sha256
                       and (s.config.training or {}).get("cohort") == (replica.config.training or {}).get("cohort")]  # fmt: skip
            if len(matches) != 1:
                raise SegLensError(f"{folder}: cannot tell which cohort this seed replica belongs to ({len(matches)} candidates); write NAME={folder}")
            name = matches[0]
        replicas[name] = replica
    for (i, ra), (j, rb) in itertools.combinations(enumerate(records), 2):
        if warning := same_seed_warning(ra, rb):
            log(f"warning: {names[i]} / {names[j]}: {warning}")
    diff = diff_cohorts(dict(zip(names, saes)), tau=args.tau, seed_replicas=replicas)
    out.mkdir(parents=True, exist_ok=True)
    from ..storage import atomic_write_text

    matrix = diff.fraction_matrix()
    atomic_write_text(outputs[0], _matrix_csv(names, matrix), overwrite=args.overwrite)
    save_heatmap(names, matrix, outputs[1], diff.seed_noise_floor, overwrite=args.overwrite)
    atomic_write_text(outputs[2], _rows_csv(diff.pair_rows()), overwrite=args.overwrite)
    summary = diff.summary()
    summary["saes"] = {n: r for n, r in zip(names, records)}
    summary["alignments"] = {}
    for (i, j), alignment in diff.alignments.items():
        path = out / "alignments" / f"{_slug(names[i])}__{_slug(names[j])}.json"
        floor = diff.noise_floor(i, j)
        document = alignment_document(
            alignment, {**records[i], "name": names[i]}, {**records[j], "name": names[j]},
            alignment_metrics(alignment, trials=args.bootstrap, seed=args.seed), spaces.space_relation(saes[i], saes[j]),
            tau_sweep(alignment), {"shared_fraction": floor} if floor is not None else None,
        )  # fmt: skip
        write_alignment(document, path, overwrite=args.overwrite)
        summary["alignments"][f"{names[i]}|{names[j]}"] = str(path.relative_to(out))
    atomic_write_text(outputs[3], json.dumps(summary, indent=1) + "\n", overwrite=args.overwrite)
    for row in diff.pair_rows():
        floor = f"  (seed floor {100 * row['seed_noise_floor']:.1f}%)" if row["seed_noise_floor"] is not None else ""
        log(f"  {row['a']} <-> {row['b']}: {row['shared']} shared, {100 * row['shared_fraction']:.1f}%{floor}")
    log(f"Universally shared latents: {len(summary['universally_shared'])}")
    log(f"Wrote {', '.join(str(p) for p in outputs)} and {len(diff.alignments)} alignment file(s)")
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "sae"


def cmd_diff(args: argparse.Namespace) -> int:
    from ..console import log

    diff_command(args, log)
    return 0


def add_commands(sub) -> None:
    """Register ``align`` and ``diff`` on the ``seglens`` subparsers."""
    p = sub.add_parser("align", help="align the latents of two SAEs (model diffing) and write alignment.json")
    p.add_argument("sae_a", help="SAE folder A")
    p.add_argument("sae_b", help="SAE folder B")
    p.add_argument("--out", required=True, help="alignment file to write (.json)")
    p.add_argument("--tau", type=float, help="similarity both matches must reach (default 0.8; 0.5 for activation correlation)")
    p.add_argument("--method", choices=METHOD_CHOICES, default="auto",
                   help="cosine (same activation space), activation-correlation or procrustes (different models, "
                        "need --model-a/--model-b/--cohort); auto picks cosine when the space is shared")  # fmt: skip
    p.add_argument("--name-a", help="cohort name of SAE A (default: the cohort it was trained on)")
    p.add_argument("--name-b", help="cohort name of SAE B")
    p.add_argument("--model-a", help="model folder of SAE A (checks provenance; needed by activation methods)")
    p.add_argument("--model-b", help="model folder of SAE B")
    p.add_argument("--cohort", help="cases run through both models (activation methods)")
    p.add_argument("--max-slices", type=int, default=40, help="brain slices per case for activation methods (default 40)")
    p.add_argument("--seed-replica", help="SAE trained on A's activations with another seed: records the seed noise floor")
    p.add_argument("--bootstrap", type=int, default=5, help="bootstrap trials for stability (default 5)")
    p.add_argument("--table", action="store_true", help="also compute the baselines table (greedy, Sinkhorn, encoder-only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and shuffles")
    p.add_argument("--overwrite", action="store_true", help="replace an existing alignment file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("diff", help="align every pair of cohort SAEs: fraction-shared matrix (CSV, heatmap), universal latents")
    p.add_argument("saes", nargs="+", metavar="SAE_DIR", help="SAE folders, one per cohort (same activation space)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--names", help="comma-separated cohort names (default: the cohorts the SAEs were trained on)")
    p.add_argument("--tau", type=float, default=0.8, help="shared-latent threshold (default 0.8)")
    p.add_argument("--seed-replica", action="append", metavar="[NAME=]SAE_DIR",
                   help="an SAE trained on a cohort's activations with another seed (repeat): the seed noise floor")
    p.add_argument("--bootstrap", type=int, default=5, help="bootstrap trials for stability (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_diff)
