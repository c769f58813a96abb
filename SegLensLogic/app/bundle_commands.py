"""``seglens bundle``: pack a model, its SAE, latent labels and alignments into a bundle, or check one."""

from __future__ import annotations

from ..bundle import add_alignments, build_bundle, load_bundle, replace_labels
from ..console import log
from ..errors import SegLensError


def cmd_bundle(args) -> int:
    if args.check:
        log(load_bundle(args.check).summary())
        return 0
    if args.add_to:
        if not args.alignment and not args.replica:
            raise SegLensError("seglens bundle --add-to BUNDLE needs one or more --alignment FILE, or --replica SAE with --store STORE, to add")
        if args.replica:
            _add_replica(args)
        if args.alignment:
            bundle = add_alignments(args.add_to, args.alignment, overwrite=args.overwrite)
            log(f"Added {len(args.alignment)} alignment file(s) to {bundle.root}")
        log(load_bundle(args.add_to).summary())
        return 0
    if args.replica or args.store:
        raise SegLensError("--replica and --store go with --add-to BUNDLE")
    missing = [flag for flag, value in (("--model", args.model), ("--sae", args.sae), ("--out", args.out), ("--name", args.name)) if not value]
    if missing:
        raise SegLensError(f"seglens bundle needs {', '.join(missing)} (or --check BUNDLE to validate one)")
    bundle = build_bundle(args.model, args.sae, args.out, args.name, labels=args.labels, alignments=args.alignment or [],
                          cohort=args.cohort, overwrite=args.overwrite)  # fmt: skip
    log(f"Wrote {bundle.root}")
    log(bundle.summary())
    return 0


def _add_replica(args) -> None:
    """Mark which of the bundle's labelled latents an SAE of another seed finds again (the latent table's *Other
    seed* column)."""
    from ..alignment.replication import replicate_labels
    from ..sae import ActivationStore

    if not args.store:
        raise SegLensError("--replica SAE needs --store STORE: the activations both SAEs were trained on (seglens extract)")
    bundle = load_bundle(args.add_to)
    labels = bundle.load_labels()
    if labels is None:
        raise SegLensError(f"{bundle.root}: the bundle has no latent labels to mark")
    if labels.data.get("replica") and not args.overwrite:
        raise SegLensError(f"{bundle.labels_path}: already compared with a replica (sha256 {labels.data['replica'].get('sha256')}); "
                           "pass --overwrite to replace that comparison")  # fmt: skip
    document = replicate_labels(labels.data, bundle.load_sae(), args.replica, ActivationStore(args.store))
    replace_labels(bundle.root, document)
    for folder, replica in zip(args.replica, document.get("replicas") or [document["replica"]]):
        log(f"Compared {bundle.root}'s SAE with {folder}: that seed finds {replica['live_shared']:.0%} of its "
            f"{replica['live']} live latents again")  # fmt: skip
    log(f"Marked in {bundle.labels_path.name}" + (f" (how many of the {len(args.replica)} seeds find each latent)" if len(args.replica) > 1 else ""))


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
    p.add_argument("--add-to", metavar="BUNDLE", help="add the --alignment files (e.g. a cross-architecture alignment), or the --replica "
                   "comparison, to this finished bundle")
    p.add_argument("--replica", metavar="SAE", action="append", help="with --add-to: an SAE trained from another seed on the same "
                   "activations; marks which labelled latents it finds again (the panel's Other seed column); repeat for several "
                   "seeds, and each latent says how many find it")
    p.add_argument("--store", metavar="STORE", help="with --replica: the activation store both SAEs were trained on (live latents are "
                   "decided on its held-out positions)")
    p.add_argument("--check", metavar="BUNDLE", help="validate an existing bundle and print its summary instead")
    p.set_defaults(func=cmd_bundle)
