"""The ``seglens`` command: segment, evaluate, train, inspect hook points, run the demo.

Every user error is printed as one line ``seglens: error: <file>: <problem>`` with exit status 2 (no traceback;
``--debug`` shows one). Outputs are never overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import SegLensError


def _log(message: str) -> None:
    print(message, flush=True)


def _progress_printer(label: str):
    """A progress callback printing ``label: done/total`` on one updating line when attached to a terminal."""
    interactive = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if interactive:
            print(f"\r{label}: {done}/{total} slices", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return progress


def _case_arg(args: argparse.Namespace):
    """The case to read: a folder, or ``--image MOD=FILE`` pairs (plus ``--seg``)."""
    from .data.cases import case_from_mapping, find_case

    if args.image:
        mapping = {}
        for item in args.image:
            modality, sep, path = item.partition("=")
            if not sep or not path:
                raise SegLensError(f"--image expects MODALITY=FILE, got '{item}'")
            mapping[modality] = path
        if getattr(args, "seg", None):
            mapping["seg"] = args.seg
        return case_from_mapping(mapping, case_id=args.case.name if args.case else None)
    if args.case is None:
        raise SegLensError("give --case FOLDER or --image MODALITY=FILE for each modality")
    return find_case(args.case)


def _device(args: argparse.Namespace):
    import torch

    from .networks import default_device

    if args.device == "auto":
        return default_device()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SegLensError("--device cuda was asked for but PyTorch sees no GPU")
    return torch.device(args.device)


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference import segment_case
    from .networks import load_segmenter

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(out)
    model = load_segmenter(args.model, device=_device(args))
    case = _case_arg(args)
    start = time.monotonic()
    prediction = segment_case(model, case, out, overwrite=args.overwrite, batch_size=args.batch_size, progress=_progress_printer(case.case_id))
    counts = {name: int((prediction.labels == index).sum()) for index, name in enumerate(model.config.class_names) if index}
    _log(f"Wrote {out} ({len(prediction.slices_run)} slices in {time.monotonic() - start:.1f} s on {next(model.parameters()).device.type})")
    _log("Voxels per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.cohort import load_cohort
    from .evaluation import evaluate_cohort, format_table, write_csv
    from .networks import load_segmenter

    if args.csv and Path(args.csv).exists() and not args.overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(args.csv)
    model = load_segmenter(args.model, device=_device(args))
    cohort = load_cohort(args.cohort)
    _log(f"Evaluating {args.model} on cohort '{cohort.name}' ({len(cohort)} cases)")
    rows = evaluate_cohort(model, cohort, batch_size=args.batch_size, log=_log)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv, overwrite=args.overwrite)
        _log(f"Wrote {args.csv}")
    return 0


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    from .data.cases import canonical_modality
    from .data.cohort import load_cohort
    from .training import TrainingOptions, train_segmenter

    if args.epochs is None and args.minutes is None:
        args.epochs = 10
    arch_options = {}
    if args.unet_features:
        arch_options["features"] = [int(v) for v in args.unet_features.split(",")]
    cohort = load_cohort(args.cohort, name=args.name)
    modalities = [canonical_modality(m) for m in args.modalities.split(",")] if args.modalities else None
    options = TrainingOptions(
        epochs=args.epochs,
        minutes=args.minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        slices_per_epoch=args.slices_per_epoch,
        val_cases=args.val_cases,
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
        log=_log,
    )
    if result.best_scores:
        _log("Best validation: " + ", ".join(f"{k} {v:.3f}" for k, v in result.best_scores.items() if k.startswith("dice_")))
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from .networks import load_segmenter

    model = load_segmenter(args.model, device="cpu")
    _log(f"{model.config.arch}: inputs {', '.join(model.config.modalities)} at {model.config.image_size}x{model.config.image_size}")
    for name, (channels, height, width) in model.hook_points().items():
        mark = "  (default)" if name == model.config.hook_point else ""
        _log(f"  {name:8s} {channels:4d} channels x {height}x{width} positions{mark}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, data=args.data, minutes=args.minutes, overwrite=args.overwrite, log=_log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seglens",
        description="SegLens: open up brain-tumour segmentation models (Med-SegLens).",
    )
    parser.add_argument("--version", action="version", version=f"seglens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_device(p):
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (auto: GPU if any)")
        p.add_argument("--batch-size", type=int, default=16, help="axial slices per forward pass (default 16)")

    p = sub.add_parser("segment", help="segment one case and write its mask on the input's voxel grid")
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--case", type=Path, help="case folder (BraTS 2023/2017-2021/2013 or FreeSurfer names)")
    p.add_argument("--image", action="append", metavar="MOD=FILE", help="explicit modality file, e.g. t1c=post.nrrd (repeat)")
    p.add_argument("--out", required=True, help="output mask (.nii.gz), BraTS 2023 labels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_device(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="Dice, BraTS regions, precision and recall per case of a cohort")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--cohort", required=True, help="folder of case folders, or a text file listing them")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    add_device(p)
    p.set_defaults(func=cmd_evaluate)

    from .networks import ARCHITECTURES

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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.set_defaults(func=cmd_train_segmenter)

    p = sub.add_parser("hooks", help="list a model's hook points and their feature-map shapes")
    p.add_argument("--model", required=True, help="model folder")
    p.set_defaults(func=cmd_hooks)

    p = sub.add_parser("demo", help="end-to-end run: cohort -> trained model -> evaluation -> mask and activations")
    p.add_argument("--out", default="seglens-demo", help="output folder (default seglens-demo)")
    p.add_argument("--data", help="a labelled cohort to use instead of synthetic phantoms")
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget (default 2)")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing output folder")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("seglens: interrupted", file=sys.stderr)
        return 130
    except (SegLensError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"seglens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
