"""``seglens bundle``: pack a model, its SAE, latent labels and alignments into a bundle, or check one."""

from __future__ import annotations

from ..bundle import add_alignments, build_bundle, load_bundle
from ..console import log
from ..errors import SegLensError


def cmd_bundle(args) -> int:
    if args.check:
        log(load_bundle(args.check).summary())
        return 0
    if args.add_to:
        if not args.alignment:
            raise SegLensError("seglens bundle --add-to BUNDLE needs one or more --alignment FILE to add")
        bundle = add_alignments(args.add_to, args.alignment, overwrite=args.overwrite)
        log(f"Added {len(args.alignment)} alignment file(s) to {bundle.root}")
        log(bundle.summary())
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--sae", args.sae), ("--out", args.out), ("--name", args.name)) if not value]
    if missing:
        raise SegLensError(f"seglens bundle needs {', '.join(missing)} (or --check BUNDLE to validate one)")
    bundle = build_bundle(args.model, args.sae, args.out, args.name, labels=args.labels, alignments=args.alignment or [],
                          cohort=args.cohort, overwrite=args.overwrite)  # fmt: skip
    log(f"Wrote {bundle.root}")
    log(bundle.summary())
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bundle", help="pack a model, its SAE, latent labels and alignments into one bundle folder")
    p.add_argument("--model", help="segmenter folder")
    p.add_argument("--sae", help="SAE folder trained on the model")
    p.add_argument("--labels", help="latent labels JSON (seglens interpret)")
    p.add_argument("--alignment", action="append", metavar="FILE", help="alignment JSON involving this SAE (repeat)")
    p.add_argument("--name", help="bundle name, e.g. the population")
    p.add_argument("--cohort", help="training cohort name (default: recorded in the model)")
    p.add_argument("--out", help="bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder (with --add-to: an alignment of the same name)")
    p.add_argument("--add-to", metavar="BUNDLE", help="add the --alignment files to this finished bundle (e.g. a cross-architecture alignment)")
    p.add_argument("--check", metavar="BUNDLE", help="validate an existing bundle and print its summary instead")
    p.set_defaults(func=cmd_bundle)
