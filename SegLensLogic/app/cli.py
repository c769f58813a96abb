"""The ``seglens`` command: segment, evaluate, train, inspect hook points, run the demo.

Commands of the later concepts (steering, interpretation, alignment, experiments, bundles, the reference build)
are defined in one module each beside this one (``app/<concept>_commands.py``) and listed in
:data:`PACKAGE_COMMANDS`; they share :mod:`SegLensLogic.console` (:func:`log`) and :mod:`.arguments`
(:func:`device_from_args`, :func:`case_from_args`, :func:`add_device_arguments`), as this module does.

The command line starts fast: building the parser imports no package's work (no torch, transformers, MONAI or SciPy).
Each command imports what it runs inside its function, and a concept's commands module is imported only when one of
its commands is chosen (to run it or to show its help).

Every user error is printed as one line ``seglens: error: <file>: <problem>`` with exit status 2 (no traceback;
``--debug`` shows one). Outputs are never overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from pathlib import Path

from .. import __version__
from ..console import log, progress_printer
from .arguments import add_device_arguments, case_from_args, device_from_args
from ..errors import SegLensError, refuse_existing

# Commands that the concept packages add (each module's ``add_commands(subparsers)``): name -> (module, the help line
# of ``seglens --help``). The parser lists them from here and imports a module only when one of its commands is
# chosen, so that ``seglens --help`` and the commands of this module import no other package; a test checks this
# table against what the modules add.
PACKAGE_COMMANDS: dict[str, tuple[str, str]] = {
    "steer": ("SegLensLogic.app.steering_commands", "steer SAE latents and write the corrected mask with its recipe"),
    "bundle": ("SegLensLogic.app.bundle_commands", "pack a model, its SAE, latent labels and alignments into one bundle folder"),
    "phantoms": ("SegLensLogic.app.data_commands", "write a synthetic cohort (MNI152-based phantoms) of a population with planted shifts"),
    "degrade": ("SegLensLogic.app.data_commands", "apply a population's acquisition shift (noise, bias field, thick slices) to real cases"),
    "interpret": ("SegLensLogic.app.interpretation_commands", "label every SAE latent from its top-K slices over a labelled cohort"),
    "align": ("SegLensLogic.app.alignment_commands", "align the latents of two SAEs (model diffing) and write alignment.json"),
    "diff": ("SegLensLogic.app.alignment_commands", "align every pair of cohort SAEs: fraction-shared matrix (CSV, heatmap), universal latents"),
    "diagnose": ("SegLensLogic.app.experiment_commands", "rank a cohort's cases by Dice; top latents of the worst and their usage z-scores"),
    "experiment": ("SegLensLogic.app.experiment_commands", "the paper's experiments: failure-recovery, adaptation, population-steering"),
    "build-reference": ("SegLensLogic.app.reference_commands", "rebuild the shipped reference bundle from real labelled cases (resumable: rerun to continue)"),
}  # fmt: skip

# Modules that add their own subcommands, in the order of ``seglens --help``.
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(module for module, _ in PACKAGE_COMMANDS.values()))


def model_folder(given: str | None) -> Path:
    """The model folder of ``--model``: a model folder, a bundle's, a shipped bundle's by its folder name
    (``adult-glioma-segformer``, ``adult-glioma-unet``), or (none given) the shipped reference bundle's, which is
    announced."""
    from ..bundle import MANIFEST_NAME, load_bundle
    from ..resources import reference_bundle_path, resources_folder

    if given is None:
        bundle = load_bundle(reference_bundle_path())
        log(f"Using the shipped reference bundle '{bundle.name}' ({bundle.root}); --model chooses another")
        return bundle.model_dir
    shipped = resources_folder() / given
    if not Path(given).exists() and Path(given).name == given and (shipped / MANIFEST_NAME).is_file():
        return load_bundle(shipped).model_dir
    if (Path(given) / MANIFEST_NAME).is_file():
        return load_bundle(given).model_dir
    return Path(given)


def cmd_segment(args: argparse.Namespace) -> int:
    from ..segmentation.inference import segment_case
    from ..networks import load_segmenter

    out = refuse_existing(args.out, args.overwrite)
    model = load_segmenter(model_folder(args.model), device=device_from_args(args))
    case = case_from_args(args)
    start = time.monotonic()
    prediction = segment_case(model, case, out, overwrite=args.overwrite, batch_size=args.batch_size, progress=progress_printer(case.case_id))
    counts = {name: int((prediction.labels == index).sum()) for index, name in enumerate(model.config.class_names) if index}
    log(f"Wrote {out} ({len(prediction.slices_run)} slices in {time.monotonic() - start:.1f} s on {next(model.parameters()).device.type})")
    log("Voxels per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if prediction.prepared.missing_modalities:
        log(f"Note: the case has no {', '.join(prediction.prepared.missing_modalities)}: set to the brain mean (the model was trained to tolerate it)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data.cohort import load_cohort
    from ..segmentation.evaluation import evaluate_cohort, format_table, write_csv
    from ..networks import load_segmenter

    if args.csv:
        refuse_existing(args.csv, args.overwrite)
    model = load_segmenter(args.model, device=device_from_args(args))
    cohort = load_cohort(args.cohort)
    log(f"Evaluating {args.model} on cohort '{cohort.name}' ({len(cohort)} cases)")
    rows = evaluate_cohort(model, cohort, batch_size=args.batch_size, log=log)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv, overwrite=args.overwrite)
        log(f"Wrote {args.csv}")
    return 0


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    from ..data.cases import canonical_modality
    from ..data.cohort import load_cohort
    from ..segmentation.training import TrainingOptions, train_segmenter

    if args.epochs is None and args.minutes is None:
        args.epochs = 10
    arch_options = {}
    if args.unet_features:
        try:
            features = [int(v) for v in args.unet_features.split(",")]
        except ValueError:
            features = []
        if len(features) != 6 or not all(1 <= f <= 1024 for f in features):
            raise SegLensError(f"--unet-features expects six comma-separated widths from 1 to 1024, got '{args.unet_features}'")
        arch_options["features"] = features
    cohort = load_cohort(args.cohort, name=args.name)
    modalities = [canonical_modality(m) for m in args.modalities.split(",")] if args.modalities else None
    options = TrainingOptions(
        epochs=args.epochs,
        minutes=args.minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        slices_per_epoch=args.slices_per_epoch,
        val_cases=args.val_cases,
        warmup_steps=args.warmup,
        spatial_augmentation=args.spatial_augmentation,
        modality_dropout=args.modality_dropout,
        precision=args.precision,
        keep=args.keep,
        seed=args.seed,
    )
    result = train_segmenter(
        cohort,
        args.out,
        arch=args.arch,
        init=args.init,
        modalities=modalities,
        image_size=args.image_size,
        arch_options=arch_options,
        options=options,
        overwrite=args.overwrite,
        log=log,
        crop_to_brain=args.crop_to_brain,
        resumable=args.resumable,
    )
    if result.best_scores:
        log("Best validation: " + ", ".join(f"{k} {v:.3f}" for k, v in result.best_scores.items() if k.startswith("dice_")))
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from ..networks import load_segmenter

    model = load_segmenter(args.model, device="cpu")
    log(f"{model.config.arch}: inputs {', '.join(model.config.modalities)} at {model.config.image_size}x{model.config.image_size}")
    for name, (channels, height, width) in model.hook_points().items():
        mark = "  (default)" if name == model.config.hook_point else ""
        log(f"  {name:8s} {channels:4d} channels x {height}x{width} positions{mark}")
    return 0


def _ray_wanted(args: argparse.Namespace, train: bool = False) -> bool:
    """``--ray [ADDRESS]`` or ``--workers N`` (a local Ray cluster) ask for the distributed path; checked (Ray
    installed, sensible numbers) before any work."""
    if args.workers is not None and args.workers < 1:
        raise SegLensError(f"--workers must be at least 1, got {args.workers}")
    if args.cpus_per_worker < 1:
        raise SegLensError(f"--cpus-per-worker must be at least 1, got {args.cpus_per_worker}")
    if args.ray is None and args.workers is None:
        return False
    from ..sae.distributed import require_ray

    require_ray(train=train)
    return True


def cmd_extract(args: argparse.Namespace) -> int:
    from ..data.cohort import load_cohort
    from ..networks import load_segmenter
    from ..sae import ExtractionOptions, extract_activations

    _check_numbers(args, (("--subsample", "subsample", 1e-9, 1.0),))
    if args.tumour_repeat < 1:
        raise SegLensError(f"--tumour-repeat must be 1 or more, got {args.tumour_repeat}")
    options = ExtractionOptions(
        hook=args.layer,
        brain_only=not args.all_positions,
        subsample=args.subsample,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        tumour_repeat=args.tumour_repeat,
    )
    if _ray_wanted(args):
        from ..sae.distributed import extract_activations_ray

        cohort = load_cohort(args.cohort)
        extract_activations_ray(args.model, cohort, args.out, options, overwrite=args.overwrite, address=args.ray, workers=args.workers,
                                device=args.device, cpus_per_worker=args.cpus_per_worker, log=log)  # fmt: skip
        return 0
    model = load_segmenter(args.model, device=device_from_args(args))
    cohort = load_cohort(args.cohort)
    log(f"Extracting '{options.hook or model.config.hook_point}' activations of {len(cohort)} case(s)")
    extract_activations(model, cohort, args.out, options, model_dir=args.model, overwrite=args.overwrite, log=log)
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    from ..sae import ActivationStore, SAETrainingOptions, train_sae
    from ..sae.model import SAE_CONFIG_NAME, SAE_WEIGHTS_NAME
    from ..sae.trainer import save_training_report
    from ..storage import MAX_LATENTS, refuse_output_folder

    refuse_output_folder(args.out, args.overwrite, (SAE_CONFIG_NAME, SAE_WEIGHTS_NAME))
    _check_numbers(args, (("--k", "k", 1, 1 << 12), ("--expansion", "expansion", 1, 1 << 10), ("--batch-size", "batch_size", 1, 1 << 24),
                          ("--epochs", "epochs", 1e-9, 1e9), ("--max-steps", "max_steps", 1, 1 << 40), ("--lr", "lr", 1e-12, 10.0),
                          ("--patience", "patience", 0, 1 << 20), ("--resample-every", "resample_every", 0, 1 << 40)))  # fmt: skip
    store = ActivationStore(args.activations)
    if store.d_in * args.expansion > MAX_LATENTS:
        raise SegLensError(f"--expansion {args.expansion}: {store.d_in} channels x {args.expansion} = {store.d_in * args.expansion} latents, "
                           f"more than SegLens loads ({MAX_LATENTS:,})")  # fmt: skip
    if args.k > store.d_in * args.expansion:
        raise SegLensError(f"--k {args.k} is larger than the dictionary ({store.d_in * args.expansion} latents)")
    options = SAETrainingOptions(
        k=args.k,
        expansion=args.expansion,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        patience=args.patience or None,
        init=args.init,
        resample_every=args.resample_every or None,
        seed=args.seed,
    )
    if args.workers and args.batch_size % args.workers:
        raise SegLensError(f"--batch-size {args.batch_size} is not a multiple of --workers {args.workers} (each worker takes an equal share of a step)")
    if _ray_wanted(args, train=True):
        from ..sae.distributed import train_sae_ray

        storage = args.ray_storage
        if storage is None:  # beside --out: on a cluster, where the output lives is where every node can write
            Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
            storage = Path(args.out).resolve().parent / f".{Path(args.out).name}.ray-checkpoints"
        try:
            sae, report = train_sae_ray(store, options, address=args.ray, workers=args.workers, device=args.device,
                                        cpus_per_worker=args.cpus_per_worker, storage=storage, log=log)  # fmt: skip
        finally:
            if args.ray_storage is None:
                import shutil

                shutil.rmtree(storage, ignore_errors=True)
    else:
        sae, report = train_sae(store, options, device=device_from_args(args), log=log, stream=args.stream)
    sae.save(args.out, overwrite=args.overwrite)
    save_training_report(report, args.out)
    log(f"Wrote {args.out}")
    return 0


def _check_numbers(args: argparse.Namespace, bounds) -> None:
    """Refuse a numeric option outside ``[low, high]`` (or not finite), naming the option, before any work."""
    import math

    for flag, name, low, high in bounds:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise SegLensError(f"{flag} must be from {low:g} to {high:g}, got {value:g}")


def cmd_evaluate_sae(args: argparse.Namespace) -> int:
    from ..data.cohort import load_cohort
    from ..networks import load_segmenter
    from ..sae import ActivationStore, BatchTopKSAE, evaluate_reconstruction
    from ..steering.dice_recovered import dice_recovered

    import numpy as np

    sae = BatchTopKSAE.load(args.sae)
    if args.activations:
        store = ActivationStore(args.activations)
        if store.d_in != sae.config.d_in:
            raise SegLensError(f"{args.activations}: vectors have {store.d_in} channels but the SAE takes {sae.config.d_in}")
        if args.sample is not None:
            _check_numbers(args, (("--sample", "sample", 1, 1 << 40),))
            positions = np.sort(np.random.default_rng(0).choice(len(store), min(args.sample, len(store)), replace=False))
        else:
            positions = store.split(0.05, seed=0)[1][:65536]
        metrics = evaluate_reconstruction(sae, store.vectors(positions))
        log(f"Reconstruction on {len(positions):,} vectors: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.cohort:
        if not args.model:
            raise SegLensError("--cohort needs --model to measure Dice recovered")
        model = load_segmenter(args.model, device=device_from_args(args))
        result = dice_recovered(model, sae, load_cohort(args.cohort), log=log)
        log("Dice recovered: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if not args.activations and not args.cohort:
        raise SegLensError("give --activations (reconstruction metrics) and/or --model with --cohort (Dice recovered)")
    return 0


def cmd_latents(args: argparse.Namespace) -> int:
    from ..networks import load_segmenter
    from ..sae import BatchTopKSAE
    from ..sae.codes import encode_volume, save_heatmap
    from ..storage import refuse_output_folder

    if args.top < 0:
        raise SegLensError(f"--top must be 0 or more, got {args.top}")
    model = load_segmenter(args.model, device=device_from_args(args))
    sae = BatchTopKSAE.load(args.sae)
    sae.check_fits(model)
    sae.inference_threshold()  # an SAE without an inference threshold cannot encode: one line naming it, before any work
    bad = [j for j in args.heatmap or [] if not 0 <= j < sae.d_sae]
    if bad:
        raise SegLensError(f"--heatmap {bad[0]} is out of range: this SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})")
    case = case_from_args(args)
    heatmaps = [Path(args.out_dir or ".") / f"{case.case_id}-latent{latent:05d}.nii.gz" for latent in args.heatmap or []]
    if heatmaps:
        refuse_output_folder(heatmaps[0].parent, args.overwrite, [path.name for path in heatmaps])  # before encoding
    codes = encode_volume(model, sae, case, batch_size=args.batch_size)
    log(
        f"{case.case_id}: {codes.num_positions} positions, mean {codes.mean_l0():.1f} active latents, "
        f"codes {codes.nbytes / 1e6:.1f} MB sparse ({codes.dense_nbytes / 1e6:.0f} MB dense)"
    )
    for latent, total in codes.top_latents(args.top):
        log(f"  latent {latent:5d}  total activation {total:.1f}")
    for latent, path in zip(args.heatmap or [], heatmaps):
        save_heatmap(codes, latent, path, overwrite=args.overwrite)
        log(f"Wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, data=args.data, quick=args.quick, overwrite=args.overwrite, threads=args.threads, log=log, hook=args.hook)
    return 0


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]``, ``--workers N`` and ``--cpus-per-worker`` (needs the optional extra: pip install -e ".[ray]")."""
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help=f"run on a Ray cluster: {what}; ADDRESS as for ray.init (default: the cluster this machine belongs to, or $RAY_ADDRESS); needs pip install -e \".[ray]\"")
    p.add_argument("--workers", type=int, help="Ray workers (default with --ray: one per GPU of the cluster, else per --cpus-per-worker CPUs); without --ray, starts a local Ray cluster with N workers (or uses $RAY_ADDRESS's)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (PyTorch threads) per Ray worker (default 1)")


class _Commands(argparse._SubParsersAction):
    """Subcommands, some of them deferred: a deferred command is listed (name and help line) without importing the
    module that defines it; choosing it imports the module, whose ``add_commands`` then adds its commands for real
    (in the same places of the list)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deferred: dict[str, str] = {}  # command name -> module

    def add_deferred(self, name: str, module: str, help: str) -> None:
        self.add_parser(name, help=help)
        self.deferred[name] = module

    def load(self, module: str) -> None:
        """Import ``module`` and let it add its commands in place of their placeholders."""
        names = {name for name, owner in self.deferred.items() if owner == module}
        order = list(self._name_parser_map)
        helps = list(self._choices_actions)
        position = next((i for i, action in enumerate(helps) if action.dest in names), len(helps))
        for name in names:
            del self.deferred[name], self._name_parser_map[name]
        self._choices_actions[:] = [action for action in helps if action.dest not in names]
        importlib.import_module(module).add_commands(self)
        added = self._choices_actions[len(helps) - len(names):]
        kept = self._choices_actions[: len(helps) - len(names)]
        self._choices_actions[:] = kept[:position] + added + kept[position:]
        parsers = dict(self._name_parser_map)  # the same dict is the action's choices: reorder it in place
        self._name_parser_map.clear()
        self._name_parser_map.update({name: parsers.pop(name) for name in order if name in parsers})
        self._name_parser_map.update(parsers)

    def load_all(self) -> None:
        for module in dict.fromkeys(self.deferred.values()):
            self.load(module)

    def __call__(self, parser, namespace, values, option_string=None):
        module = self.deferred.get(values[0]) if values else None
        if module is not None:
            self.load(module)
        super().__call__(parser, namespace, values, option_string)


def build_parser(load_all: bool = False) -> argparse.ArgumentParser:
    """The ``seglens`` parser. The commands of :data:`PACKAGE_COMMANDS` are built when chosen (their modules are
    imported then); ``load_all`` builds every one now (imports every package)."""
    parser = argparse.ArgumentParser(
        prog="seglens",
        description="SegLens: open up brain-tumour segmentation models (Med-SegLens).",
    )
    parser.add_argument("--version", action="version", version=f"seglens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_Commands)

    _add_segmentation_commands(sub)
    _add_sae_commands(sub)
    _add_demo_command(sub)

    # Commands of later concepts live beside them; each module defines ``add_commands(subparsers)``.
    for name, (module, help_line) in PACKAGE_COMMANDS.items():
        sub.add_deferred(name, module, help_line)
    if load_all:
        sub.load_all()
    return parser


def _add_segmentation_commands(sub) -> None:
    """``segment``, ``evaluate``, ``train-segmenter``, ``hooks``."""
    from ..networks.architectures import ARCHITECTURES

    p = sub.add_parser("segment", help="segment one case and write its mask on the input's voxel grid")
    p.add_argument("--model", help="model folder (config.json + model.safetensors), bundle folder, or a shipped bundle's name "
                   "(e.g. adult-glioma-segformer; default: the shipped reference bundle)")
    p.add_argument("--case", type=Path, help="case folder (BraTS 2023/2017-2021/2013 or FreeSurfer names)")
    p.add_argument("--image", action="append", metavar="MOD=FILE", help="explicit modality file, e.g. t1c=post.nrrd (repeat)")
    p.add_argument("--out", required=True, help="output mask (.nii.gz), BraTS 2023 labels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_device_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="Dice, BraTS regions, precision and recall per case of a cohort")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--cohort", required=True, help="folder of case folders, or a text file listing them")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    add_device_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train-segmenter", help="train a segmenter on a cohort, or fine-tune one (--init)")
    p.add_argument("--cohort", required=True, help="folder of labelled case folders, or a text file listing them")
    p.add_argument("--name", help="cohort name recorded in the model (default: folder or file name)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="unet", help="architecture when training from scratch")
    p.add_argument("--init", help="base model folder to fine-tune from (cohort models must share one)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--epochs", type=int, help="number of epochs (default 10 unless --minutes)")
    p.add_argument("--minutes", type=float, help="time budget; stops after the batch that exceeds it")
    p.add_argument("--modalities", help="comma-separated inputs, e.g. t1c,t2f (default: all the cohort shares)")
    p.add_argument("--image-size", type=int, default=256, help="model input side in pixels (default 256)")
    p.add_argument("--unet-features", help="six comma-separated U-Net widths (default 32,32,64,128,256,32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--slices-per-epoch", type=int, help="slices drawn per epoch (default: all brain slices)")
    p.add_argument("--val-cases", type=int, help="held-out cases for validation (default 20%%)")
    p.add_argument("--warmup", type=int, default=0, help="learning-rate warm-up steps (default 0)")
    p.add_argument("--crop-to-brain", action="store_true", help="the model sees each slice's brain bounding box, not the whole slice")
    p.add_argument("--spatial-augmentation", action="store_true", help="random rotation (15 degrees) and scaling (0.85-1.15)")
    p.add_argument("--modality-dropout", type=float, default=0.0, help="share of slices that lose random sequences (the model then accepts missing ones)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32", help="autocast precision of the forward pass")
    p.add_argument("--keep", choices=("best", "last"), default="best", help="weights saved: best validation epoch (default) or the last")
    p.add_argument("--resumable", action="store_true", help="checkpoint every epoch in OUT/checkpoint and continue from it when rerun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.set_defaults(func=cmd_train_segmenter)

    p = sub.add_parser("hooks", help="list a model's hook points and their feature-map shapes")
    p.add_argument("--model", required=True, help="model folder")
    p.set_defaults(func=cmd_hooks)


def _add_sae_commands(sub) -> None:
    """``extract``, ``train-sae``, ``evaluate-sae``, ``latents``."""
    from ..sae.options import SAETrainingOptions

    p = sub.add_parser("extract", help="store a hook point's activation vectors over a cohort (for SAE training)")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--layer", help="hook point (default: the model's mid-encoder hook; see seglens hooks)")
    p.add_argument("--cohort", required=True, help="folder of case folders, or a text file listing them")
    p.add_argument("--out", required=True, help="activation store folder to create")
    p.add_argument("--all-positions", action="store_true", help="keep positions outside the brain too")
    p.add_argument("--subsample", type=float, default=1.0, help="keep each position with this probability")
    p.add_argument("--tumour-repeat", type=int, default=1, metavar="N", help="write positions touching the ground-truth tumour N times "
                   "(labelled cases): an SAE then learns more tumour latents (docs/measurements/seed-agreement.md)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    add_device_arguments(p)
    add_ray_arguments(p, "cases run by Ray actors, one per GPU (or per --cpus-per-worker CPUs); the same store")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train-sae", help="train a BatchTopK sparse autoencoder on an activation store")
    p.add_argument("--activations", required=True, help="activation store folder (seglens extract)")
    p.add_argument("--out", required=True, help="SAE folder to write")
    p.add_argument("--k", type=int, default=32, help="mean active latents per vector (default 32)")
    p.add_argument("--expansion", type=int, default=16, help="latents per activation channel (default 16)")
    p.add_argument("--epochs", type=float, default=SAETrainingOptions.epochs, help="step budget in passes over the vectors (default %(default)s; the stopping rule usually ends training earlier)")
    p.add_argument("--max-steps", type=int, default=SAETrainingOptions.max_steps, help="step budget cap (default %(default)s)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4 / sqrt(latents / 16384))")
    p.add_argument("--patience", type=int, default=SAETrainingOptions.patience, help="held-out evaluations without improvement before the final decay (default %(default)s; 0 disables the stopping rule)")
    p.add_argument("--init", choices=("data", "random"), default=SAETrainingOptions.init, help="decoder initialisation (default %(default)s: rows from training vectors)")
    p.add_argument("--resample-every", type=int, default=0, metavar="STEPS", help="re-initialise dead latents at poorly reconstructed vectors every STEPS steps, in the first half of training (default: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=SAETrainingOptions.batch_size, help="vectors per step (default %(default)s)")
    p.add_argument("--stream", action="store_true", help="read the store shard by shard (memory bounded by a few shards; split and shuffle made shard by shard) instead of one global shuffle; --ray always streams")
    add_ray_arguments(p, "Ray Train data-parallel (DDP) workers, each streaming its own shards; the same SAE folder")
    p.add_argument("--ray-storage", metavar="PATH", help="where Ray Train keeps checkpoints: a folder every node sees, or s3://... (default: a hidden folder beside --out, removed afterwards)")
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser("evaluate-sae", help="explained variance, L0, dead latents; Dice recovered on a cohort")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("--activations", help="activation store for reconstruction metrics")
    p.add_argument("--model", help="model folder (for Dice recovered)")
    p.add_argument("--cohort", help="labelled cohort (for Dice recovered)")
    p.add_argument("--sample", type=int, metavar="N", help="measure on N vectors drawn from the whole store, training vectors included "
                   "(default: the 5 %% held-out split, at most 65,536): a latent that fires on one position in 10,000, as a tumour "
                   "pattern may, looks dead on a few thousand vectors")
    add_device_arguments(p)
    p.set_defaults(func=cmd_evaluate_sae)

    p = sub.add_parser("latents", help="encode a case with an SAE: top latents, heatmaps on the input grid")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("--case", type=Path, help="case folder")
    p.add_argument("--image", action="append", metavar="MOD=FILE", help="explicit modality file (repeat)")
    p.add_argument("--top", type=int, default=10, help="list this many most active latents (default 10)")
    p.add_argument("--heatmap", type=int, action="append", metavar="LATENT", help="write this latent's heatmap (repeat)")
    p.add_argument("--out-dir", help="folder for heatmaps (default: current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing heatmap files")
    add_device_arguments(p)
    p.set_defaults(func=cmd_latents)


def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the whole method in one resumable run: cohorts, models, SAEs, labels, diffing, steering, bundles, report")
    p.add_argument("--out", default="seglens-demo", help="output folder (default seglens-demo); rerun to continue an interrupted run")
    p.add_argument("--data", nargs="+", metavar="DIR", help="labelled cohort folders to use instead of synthetic phantoms (the first is the reference)")
    p.add_argument("--quick", action="store_true", help="reduced sizes: about two minutes on two CPU cores")
    p.add_argument("--overwrite", action="store_true", help="start the demo in --out over instead of continuing it")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default 1 without a GPU: tiny models run faster on one)")
    p.add_argument("--hook", help="the U-Net hook point SAEs read and steering edits (default down_2; a decoder level such as up_3 "
                   "is behind the skip connections, so edits there reach the mask)")
    p.set_defaults(func=cmd_demo)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that half-written outputs are removed as after Ctrl-C."""


def _terminate(_signum, _frame) -> None:
    raise Terminated()


def _one_line(text: object) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends in one line on stderr (``--debug`` shows the traceback): exit 2 for
    errors, 130 after Ctrl-C, 143 after SIGTERM; interrupted outputs are cleaned up either way."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except Terminated:
        print("seglens: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("seglens: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("seglens: error: out of memory: an input (an image, a store, a size in a config) is larger than this machine can hold", file=sys.stderr)
        return 2
    except (SegLensError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"seglens: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an input we do not check yet: still one line, the traceback on --debug
        if args.debug:
            raise
        print(f"seglens: error: unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
