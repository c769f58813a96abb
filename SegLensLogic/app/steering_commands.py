"""``seglens steer``: fix a mask from hints, replay a steering recipe, or apply one edit, and write the corrected mask
with its recipe."""

from __future__ import annotations

import argparse
import math
import time

from ..console import log
from .arguments import add_device_arguments, case_from_args, device_from_args
from ..errors import SegLensError, refuse_existing
from ..steering.modes import MODES


def _region(args: argparse.Namespace):
    """The ``--slices`` option as a :class:`Region` (the whole volume without it)."""
    from ..steering.interventions import Region

    if args.slices is None:
        return Region.volume()
    start, sep, stop = args.slices.partition(":")
    try:
        region = Region.slice(int(start)) if not sep else Region.slices(int(start), int(stop))
    except ValueError:
        raise SegLensError(f"--slices expects K or START:STOP (axial slice indices, RAS order), got '{args.slices}'") from None
    if region.start < 0 or region.start >= region.stop:
        raise SegLensError(f"--slices {args.slices}: START must be at least 0 and below STOP (stop exclusive)")
    return region


def _check_edit_options(args: argparse.Namespace, session) -> None:
    """The one edit given on the command line, checked against the opened SAE and case, naming the option."""
    if not math.isfinite(args.alpha):
        raise SegLensError(f"--alpha must be a finite number, got {args.alpha}")
    bad = [j for j in args.latent if not 0 <= j < session.d_sae]
    if bad:
        raise SegLensError(f"--latent {bad[0]} is out of range: this SAE has {session.d_sae} latents (0..{session.d_sae - 1})")
    region = _region(args)
    if region.kind != "volume" and region.stop > session.num_slices:
        raise SegLensError(f"--slices {args.slices}: the volume has {session.num_slices} axial slices (0..{session.num_slices - 1})")


def cmd_steer(args: argparse.Namespace) -> int:
    # The command's work is imported when it runs, so that --help stays light.
    from ..sae import BatchTopKSAE
    from ..steering.interventions import LatentEdit
    from ..steering.recipe import load_recipe, recipe_path_for
    from ..bundle import load_bundle
    from ..steering.session import SteeringSession

    out = refuse_existing(args.out, args.overwrite)
    refuse_existing(recipe_path_for(out), args.overwrite)
    if sum(x is not None and x is not False for x in (args.recipe, args.latent, args.suggest, args.hint)) != 1:
        raise SegLensError("give one of --hint R,A,S:+ (repeat), --recipe R.json, --latent J (with --mode and --alpha) or --suggest")
    if (args.model is None) != (args.sae is None):
        raise SegLensError("give --model and --sae together, or a --bundle (default: the shipped reference bundle)")
    recipe = load_recipe(args.recipe) if args.recipe else None
    if args.latent:
        _region(args)  # a malformed --slices is refused before any work
        if not math.isfinite(args.alpha):
            raise SegLensError(f"--alpha must be a finite number, got {args.alpha}")
    start = time.monotonic()
    case = case_from_args(args)
    if args.model is not None:
        session = SteeringSession.open(args.model, args.sae, case, labels=args.labels, device=device_from_args(args), batch_size=args.batch_size)
    else:
        if args.bundle is None:
            from ..resources import reference_bundle_path

            args.bundle = reference_bundle_path()
            log(f"Using the shipped reference bundle ({args.bundle}); --bundle or --model/--sae choose another")
        session = load_bundle(args.bundle).open_session(case, device=device_from_args(args), batch_size=args.batch_size)
    hints = None
    if args.hint:  # checked before the case is segmented: a malformed hint costs nothing
        from ..steering.hints import parse_hint

        hints = [parse_hint(text, session.class_names) for text in args.hint]
    session.segment()
    if recipe is not None:
        swap_saes = [BatchTopKSAE.load(path) for path in args.swap_sae or ()]
        session.apply_recipe(recipe, swap_saes, source=args.recipe)
    elif hints is not None:
        fix = session.fix(hints)
        if not fix.edits:
            log("The hints found no latent to edit (no latent fires where they point); the mask is the model's own")
        else:
            session.apply(fix.edits)
            log(f"Fix from {len(hints)} hint(s): " + ", ".join(f"latent {e.latents[0]} x{e.alpha:g}" for e in fix.edits)
                + f" ({fix.seconds:.1f} s to fit)")  # fmt: skip
    elif args.suggest:
        suggestion = session.suggest(population=args.population, method=args.method)
        log(f"Suggested: {suggestion.describe()}")
        for edit in suggestion.edits:
            session.apply(edit)
    else:
        _check_edit_options(args, session)
        session.apply(LatentEdit(tuple(args.latent), args.mode, args.alpha, where=args.where, region=_region(args)))
    mask, recipe_file = session.export(out, overwrite=args.overwrite)
    changed = int((session.labels != session.base_labels).sum())
    log(f"Wrote {mask} and {recipe_file} ({len(session.edits)} edit(s), {changed} voxels changed, {time.monotonic() - start:.1f} s)")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("steer", help="steer SAE latents and write the corrected mask with its recipe")
    p.add_argument("--bundle", help="bundle folder (default, without --model/--sae: the shipped reference bundle)")
    p.add_argument("--model", help="model folder (with --sae, instead of a bundle)")
    p.add_argument("--sae", help="SAE folder (trained at the model's hook point)")
    p.add_argument("--case", help="case folder")
    p.add_argument("--image", action="append", metavar="MOD=FILE", help="explicit modality file (repeat)")
    p.add_argument("--hint", action="append", metavar="R,A,S:SIGN",
                   help="a point (RAS mm, as Slicer shows it) and what it is: + tumour, +edema (a class), - not tumour, -edema "
                        "(repeat); SegLens fits the latent edit that agrees with the hints")  # fmt: skip
    p.add_argument("--recipe", help="replay this recipe (JSON); the mask is reproduced bit for bit")
    p.add_argument("--latent", type=int, action="append", metavar="J", help="latent to edit (repeat), instead of --recipe")
    p.add_argument("--suggest", action="store_true", help="apply the bundle's suggested correction for --population (no label of the case is read)")
    p.add_argument("--population", help="the case's population for --suggest (e.g. ssa, brats2013; see the bundle's suggestions)")
    p.add_argument("--method", choices=("ground-truth-free", "calibrated"), default="ground-truth-free",
                   help="--suggest: alpha by plausibility on this case (default) or the build's calibrated alpha")
    p.add_argument("--mode", choices=MODES[:-1], default="scale", help="edit: scale, add, zero or clamp (default scale)")
    p.add_argument("--alpha", type=float, default=1.0, help="factor (scale), amount (add) or value (clamp)")
    p.add_argument("--where", choices=("active", "everywhere"), default="active", help="add/clamp where the latent is active (default) or everywhere")
    p.add_argument("--slices", help="region: axial slice K or START:STOP (RAS order, stop exclusive); default the whole volume")
    p.add_argument("--labels", help="latent labels file (seglens interpret), recorded with the session")
    p.add_argument("--swap-sae", action="append", metavar="SAE", help="second SAE a recipe's swap edits take values from (repeat)")
    p.add_argument("--out", required=True, help="corrected mask (.nii.gz); its recipe is written beside it as NAME.recipe.json")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_device_arguments(p)
    p.set_defaults(func=cmd_steer)
