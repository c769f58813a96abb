"""``seglens diagnose`` and ``seglens experiment failure-recovery | adaptation | population-steering | leverage | hints``.

Each command writes one folder: tables as Markdown and CSV, figures as PNG, and a README.md with every table
and the notes on how the numbers were obtained (oracle vs calibrated).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SegLensError, refuse_existing


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated latent ids, got '{text}'") from None


def _experiment(args):
    from ..console import log
    from .arguments import device_from_args
    from ..networks import load_segmenter
    from ..sae import BatchTopKSAE
    from ..experiments.runs import Experiment

    model = load_segmenter(args.model, device=device_from_args(args))
    sae = BatchTopKSAE.load(args.sae)
    return Experiment(model, sae, log=log)


def _labels(args):
    """The latent labels file of ``--labels``, checked against the SAE's hash; None without ``--labels``."""
    if not getattr(args, "labels", None):
        return None
    from ..interpretation import load_latent_labels
    from ..sae.model import sae_sha256

    labels = load_latent_labels(args.labels)
    if labels.sae_sha256 and labels.sae_sha256 != sae_sha256(args.sae):
        raise SegLensError(f"{args.labels}: these latent labels were made for another SAE than {args.sae}")
    return labels


def _runs(experiment, source, what: str):
    from ..console import log
    from ..data.cohort import load_cohort

    cohort = load_cohort(source)
    log(f"{what}: cohort '{cohort.name}' ({len(cohort)} cases)")
    return experiment.run_cohort(cohort), cohort.name


def _out_dir(args) -> Path:
    out = Path(args.out)
    refuse_existing(out / "README.md", args.overwrite)
    return out


def _finish(report, out: Path, overwrite: bool) -> int:
    from ..console import log

    for path in report.write(out, overwrite=overwrite):
        log(f"Wrote {path}")
    return 0


def cmd_diagnose(args) -> int:
    from ..experiments.diagnosis import diagnose, ranking_rows
    from ..experiments.tables import Report

    out = _out_dir(args)
    experiment = _experiment(args)
    labels = _labels(args)
    runs, name = _runs(experiment, args.cohort, "Diagnosing")
    reference, ref_name = (_runs(experiment, args.reference, "Reference") if args.reference else (runs, name))
    report = Report("diagnosis", f"Failure diagnosis: cohort '{name}'")
    report.table("ranking", "Cases ranked by mean Dice (unedited model), worst first", ranking_rows(runs))
    rows = diagnose(runs, reference, worst=args.worst, top=args.top, labels=labels)
    report.table("diagnosis", f"Top-{args.top} latents of the {args.worst} worst cases, usage z-score against '{ref_name}'", rows)
    report.notes += [
        "usage = mean activation of the latent per encoded brain position of the case; frequency = fraction of positions where it is active.",
        f"z = (usage - reference mean) / sqrt(reference std^2 + (0.1 reference mean)^2); reference: '{ref_name}' "
        "(a case is left out of its own reference). |z| >= 2 is marked amplified / suppressed.",
        "Latent labels: " + (str(args.labels) if args.labels else "none given (run seglens interpret and pass --labels)."),
    ]
    return _finish(report, out, args.overwrite)


def cmd_failure_recovery(args) -> int:
    from ..experiments.recovery import failure_recovery_report

    out = _out_dir(args)
    experiment = _experiment(args)
    labels = _labels(args)
    runs, name = _runs(experiment, args.cohort, "Evaluating")
    reference = _runs(experiment, args.reference, "Reference (class latents)")[0] if args.reference else None
    report = failure_recovery_report(
        experiment, runs, reference=reference, worst=args.worst, max_dice=args.max_dice, alphas=args.alphas,
        top=args.top, margin=args.margin, folds=args.folds, labels=labels, class_name=args.class_name,
        class_latents=args.class_latents, class_max_dice=args.class_max_dice, seed=args.seed, population=args.population or name,
    )  # fmt: skip
    return _finish(report, out, args.overwrite)


def cmd_adaptation(args) -> int:
    from ..experiments.adaptation import adaptation_report

    out = _out_dir(args)
    experiment = _experiment(args)
    labels = _labels(args)
    target, target_name = _runs(experiment, args.target, "Target population")
    source = _runs(experiment, args.source, "Source population")[0] if args.source else None
    report = adaptation_report(
        experiment, target, source=source, labels=labels, class_name=args.class_name, class_latents=args.class_latents,
        additive=args.additive_alphas, multiplicative=args.multiplicative_alphas, folds=args.folds, seed=args.seed,
        source_name=args.source_name or (Path(args.source).name if args.source else "source"), target_name=args.target_name or target_name,
    )  # fmt: skip
    return _finish(report, out, args.overwrite)


def cmd_population_steering(args) -> int:
    from ..sae.model import sae_sha256
    from ..experiments.population import latent_sets_from_alignments, population_report

    out = _out_dir(args)
    if not args.cohort:
        raise SegLensError("give at least one --cohort NAME=FOLDER (the model's own cohort first)")
    experiment = _experiment(args)
    sets = latent_sets_from_alignments(args.alignment or [], sae_sha256(args.sae), experiment.sae.d_sae)
    cohorts = {}
    for item in args.cohort:
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise SegLensError(f"--cohort expects NAME=FOLDER, got '{item}'")
        cohorts[name] = _runs(experiment, folder, f"Cohort '{name}'")[0]
    report = population_report(experiment, cohorts, sets, alphas=args.alphas, n_latents=args.n_latents, seed=args.seed)
    return _finish(report, out, args.overwrite)


def cmd_leverage(args) -> int:
    from ..console import log
    from .arguments import device_from_args
    from ..data.cohort import load_cohort
    from ..networks import load_segmenter
    from ..sae import BatchTopKSAE
    from ..experiments.leverage import DEFAULT_ALPHAS, leverage_report, quick_saes

    out = _out_dir(args)
    model = load_segmenter(args.model, device=device_from_args(args))
    given = {}
    for item in args.sae or ():
        hook, sep, folder = item.partition("=")
        if not sep or hook not in model.hook_names:
            raise SegLensError(f"--sae expects HOOK=SAE_FOLDER with a hook of the model ({', '.join(model.hook_names)}), got '{item}'")
        given[hook] = BatchTopKSAE.load(folder)
    hooks = list(args.hooks.split(",")) if args.hooks else (list(given) or list(model.hook_names))
    unknown = [h for h in hooks if h not in model.hook_names]
    if unknown:
        raise SegLensError(f"unknown hook point(s) {unknown}; the model has {', '.join(model.hook_names)}")
    missing = [h for h in hooks if h not in given]
    if missing and not args.sae_cohort:
        raise SegLensError(f"no SAE for hook(s) {', '.join(missing)}: give --sae HOOK=SAE or --sae-cohort DIR to train quick ones")
    cases = list(load_cohort(args.cohort))
    if missing:
        log(f"Training quick SAEs for {', '.join(missing)} on '{args.sae_cohort}'")
        given.update(quick_saes(model, args.model, load_cohort(args.sae_cohort), missing, out / ".stores", steps=args.sae_steps, log=log))
    report, chosen, _ = leverage_report(model, {h: given[h] for h in hooks}, cases, args.alphas or DEFAULT_ALPHAS, args.latents, log=log)
    log(f"Chosen hook: {chosen}")
    return _finish(report, out, args.overwrite)


def cmd_hints(args) -> int:
    import json

    from ..bundle import load_bundle
    from ..console import log
    from .arguments import device_from_args
    from ..data.io import atomic_write_text
    from ..sae import BatchTopKSAE
    from ..steering.guided import GuidedOptions
    from ..experiments.hint_benchmark import hint_failure_pool, run_hints

    out = _out_dir(args)
    if args.bundle is None:
        from ..resources import reference_bundle_path

        args.bundle = reference_bundle_path()
        log(f"Using the shipped reference bundle ({args.bundle}); --bundle chooses another")
    bundle = load_bundle(args.bundle)
    model = bundle.load_model(device=device_from_args(args))
    sae = bundle.load_sae(device=next(model.parameters()).device)
    if args.sae:  # another SAE of the same model, at any of its hook points (choosing the hook by aim)
        sae = BatchTopKSAE.load(args.sae, device=next(model.parameters()).device)
        model.config.hook_point = sae.check_fits(model)
    pool = hint_failure_pool(args.data, bundle, out / "cases", log=log)
    if args.cases:
        pool = [c for c in pool if any(text in c.label for text in args.cases)]
    if not pool:
        raise SegLensError(f"no case to run on: {args.data} holds none of the bundle's held-back cases, BraTS 2013 or brats-extra cases")
    log(f"Hint benchmark on {len(pool)} case(s) of {args.data} with {bundle.name} (hook {sae.config.hook_point or model.config.hook_point})")
    report, results = run_hints(model, sae, pool, max_clicks=args.clicks, options=GuidedOptions(), seed=args.seed, log=log)
    _finish(report, out, args.overwrite)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=float) + "\n", overwrite=True)
    return 0


def _common(p: argparse.ArgumentParser, cohort: bool = True) -> None:
    from .arguments import add_device_arguments

    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sae", required=True, help="SAE folder (trained at the model's hook point)")
    if cohort:
        p.add_argument("--cohort", required=True, help="labelled cohort: folder of case folders or a text file of them")
    p.add_argument("--labels", help="latent labels file (seglens interpret) for latent names and class latents")
    p.add_argument("--out", required=True, help="output folder (tables .md/.csv, figures .png, README.md)")
    p.add_argument("--folds", type=int, default=2, help="cross-fitting folds for calibrated results (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment and random latent sets")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    add_device_arguments(p)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("diagnose", help="rank a cohort's cases by Dice; top latents of the worst and their usage z-scores")
    _common(p)
    p.add_argument("--reference", help="cohort defining typical latent usage (default: the cohort itself, leave-one-out)")
    p.add_argument("--worst", type=int, default=5, help="cases to diagnose (default 5)")
    p.add_argument("--top", type=int, default=5, help="latents listed per case (default 5)")
    p.set_defaults(func=cmd_diagnose)

    p = subparsers.add_parser("experiment", help="the paper's experiments: failure-recovery, adaptation, population-steering")
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)

    q = sub.add_parser("failure-recovery", help="alpha sweeps on failure cases, class-specific steering per error mode, baselines (tables 3-4, figures 6-7)")
    _common(q)
    q.add_argument("--reference", help="cohort whose ground truth may pick class latents when no --labels (e.g. the training cohort)")
    q.add_argument("--population", help="name of the population, for titles")
    q.add_argument("--worst", type=int, default=6, help="failure cases: the N lowest mean Dice (default 6)")
    q.add_argument("--max-dice", type=float, help="failure cases: mean Dice below this")
    q.add_argument("--alphas", type=_floats, default=(0.25, 0.5, 1.0, 2.0, 5.0), help="scale grid (default 0.25,0.5,1,2,5)")
    q.add_argument("--top", type=int, default=1, help="most active latents scaled per case (default 1)")
    q.add_argument("--margin", type=float, default=0.01, help="Dice gain that counts as recovered (default 0.01)")
    q.add_argument("--class-name", default="edema", help="class for class-specific steering (default edema)")
    q.add_argument("--class-latents", type=_ints, help="explicit class latents, comma-separated")
    q.add_argument("--class-max-dice", type=float, default=0.5, help="class failures: class Dice below this (default 0.5)")
    q.set_defaults(func=cmd_failure_recovery)

    q = sub.add_parser("leverage", help="how far latent edits at each hook point move the mask (table and plot); the hook to steer at")
    q.add_argument("--model", required=True, help="model folder")
    q.add_argument("--cohort", required=True, help="labelled cases to measure on")
    q.add_argument("--sae", action="append", metavar="HOOK=SAE", help="an SAE trained at a hook point (repeat)")
    q.add_argument("--hooks", help="comma-separated hook points to measure (default: those of --sae, else every hook)")
    q.add_argument("--sae-cohort", help="cases to train a quick SAE on for every hook without --sae")
    q.add_argument("--sae-steps", type=int, default=3000, help="training steps of each quick SAE (default 3000)")
    q.add_argument("--alphas", type=_floats, help="scale grid (default 0,0.5,2,4,8)")
    q.add_argument("--latents", type=int, default=5, help="top tumour latents scaled per case (default 5)")
    q.add_argument("--out", required=True, help="output folder (tables, plots, README.md)")
    q.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    from .arguments import add_device_arguments

    add_device_arguments(q)
    q.set_defaults(func=cmd_leverage)

    q = sub.add_parser("hints", help="fixing real failures by pointing at them: latent fix vs random latents, logit bias and spheres on the same simulated clicks")
    q.add_argument("--data", required=True, help="the real cases (e.g. ../shared/data: brats2018/, brats2013/, brats-extra/)")
    q.add_argument("--bundle", help="bundle folder (default: the shipped reference bundle)")
    q.add_argument("--sae", help="another SAE of the bundle's model (any hook point) to fix with instead of the bundle's")
    q.add_argument("--clicks", type=int, default=5, help="simulated clicks per case (default 5; tables at 1, 3, 5)")
    q.add_argument("--cases", action="append", metavar="TEXT", help="only the cases whose name holds TEXT (repeat)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random-latent control")
    q.add_argument("--out", required=True, help="output folder (tables, a plot, README.md, results.json)")
    q.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    add_device_arguments(q)
    q.set_defaults(func=cmd_hints)

    q = sub.add_parser("adaptation", help="model of population A on population B: additive/multiplicative class-latent steering (table 5, figure 8)")
    _common(q, cohort=False)
    q.add_argument("--target", required=True, help="labelled cohort of the other population (B)")
    q.add_argument("--source", help="the model's own population (A): finds class latents from ground truth when no --labels")
    q.add_argument("--source-name", help="name of population A")
    q.add_argument("--target-name", help="name of population B")
    q.add_argument("--class-name", default="edema", help="class whose latents are steered (default edema)")
    q.add_argument("--class-latents", type=_ints, help="explicit class latents, comma-separated")
    q.add_argument("--additive-alphas", type=_floats, default=(-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0),
                   help="ALS offsets in units of each latent's mean active value (default -4..4)")  # fmt: skip
    q.add_argument("--multiplicative-alphas", type=_floats, default=(-1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
                   help="MLS scales (default -1,0,0.5,1,2,4,8)")  # fmt: skip
    q.set_defaults(func=cmd_adaptation)

    q = sub.add_parser("population-steering", help="steer population-specific, universal and random latents; Dice vs alpha per cohort (figure 5)")
    _common(q, cohort=False)
    q.add_argument("--cohort", action="append", metavar="NAME=FOLDER", help="cohort to evaluate on (repeat; the model's own first)")
    q.add_argument("--alignment", action="append", metavar="FILE", help="alignment file of this SAE with another population's SAE (repeat)")
    q.add_argument("--alphas", type=_floats, default=(0.0, 0.25, 0.5, 1.0, 2.0, 5.0), help="scale grid (default 0,0.25,0.5,1,2,5)")
    q.add_argument("--n-latents", type=int, default=8, help="latents steered per set (default 8)")
    q.set_defaults(func=cmd_population_steering)
