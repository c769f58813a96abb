"""``seglens interpret``: label every latent of an SAE over a cohort; galleries and a category chart."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import SegLensError, refuse_existing
from ..storage import refuse_output_folder


def cmd_interpret(args: argparse.Namespace) -> int:
    from ..console import log
    from .arguments import device_from_args
    from ..data.cohort import load_cohort
    from ..networks import load_segmenter
    from ..sae import BatchTopKSAE
    from ..interpretation.interpret import interpret_sae
    from ..interpretation.latent_labels import write_latent_labels

    if args.top_k < 1:
        raise SegLensError(f"--top-k must be at least 1, got {args.top_k}")
    if args.splits < 0:
        raise SegLensError(f"--splits must be 0 or more, got {args.splits}")
    if (args.gallery_latents is not None or args.gallery_max is not None) and not args.figures:
        raise SegLensError("--gallery-latents and --gallery-max need --figures DIR")
    refuse_existing(args.out, args.overwrite)
    chart = Path(args.figures) / "categories.png" if args.figures else None
    if chart is not None:
        refuse_output_folder(args.figures, args.overwrite, (chart.name,))
    model = load_segmenter(args.model, device=device_from_args(args))
    sae = BatchTopKSAE.load(args.sae)
    cohort = load_cohort(args.cohort)
    held_out = load_cohort(args.held_out) if args.held_out else None
    if held_out is not None:
        both = sorted({c.case_id for c in cohort} & {c.case_id for c in held_out})
        if both:
            raise SegLensError(f"--held-out {args.held_out}: {len(both)} case(s) are also in the labelling cohort "
                               f"({', '.join(both[:3])}{', ...' if len(both) > 3 else ''}); held-out cases must be new to the labeller")  # fmt: skip
    if sae.config.model_sha256 and sae.config.model_sha256 != _model_hash(args.model):
        log(f"Warning: {args.sae} was trained on another model's activations (weights hash differs)")
    log(f"Interpreting {sae.d_sae} latents of {args.sae} on cohort '{cohort.name}' ({len(cohort)} cases, top {args.top_k} slices)")
    start = time.monotonic()
    result = interpret_sae(
        model, sae, cohort, top_k=args.top_k, splits=args.splits, seed=args.seed, stability_threshold=args.stability_threshold,
        model_dir=args.model, sae_dir=args.sae, batch_size=args.batch_size, score=args.score, log=log,
    )  # fmt: skip
    document = result.document
    if held_out is not None:
        document = _measure_held_out(model, sae, document, held_out, args, log)
    write_latent_labels(document, args.out, overwrite=args.overwrite)
    log(f"Wrote {args.out} ({time.monotonic() - start:.1f} s)")
    counts = result.category_counts()
    log("Latents per category: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    stability = result.stability
    if stability is None or stability.agreement is None:
        log("Split-half stability: not available (needs at least 2 cases and latents active in both halves)")
    else:
        log(
            f"Split-half stability: categories agree for {stability.agreement:.1%} of latent comparisons "
            f"({stability.n_compared} latents compared over {stability.splits} random splits; "
            f"{stability.to_dict()['n_unstable']} flagged unstable below {stability.threshold:.2f})"
        )
    if args.figures:
        from ..interpretation.figures import render_category_chart, write_galleries

        latents = None
        if args.gallery_latents is not None:
            latents = _parse_latents(args.gallery_latents)
        elif args.gallery_max is not None:
            latents = gallery_choice(result.document, args.gallery_max)
        render_category_chart(result.document, chart, overwrite=args.overwrite)
        log(f"Wrote {chart}")
        written = write_galleries(
            result.cohort, result.document, args.figures, model.config.modalities, model.config.image_size,
            latents=latents, examples=args.gallery_examples, overwrite=args.overwrite, log=log,
        )  # fmt: skip
        log(f"Wrote {len(written)} latent galleries to {args.figures}")
    return 0


def _measure_held_out(model, sae, document: dict, held_out, args, log) -> dict:
    """The labels document with each tumour label's hold on ``held_out`` (:func:`label_mass`), for the panel's
    *Holds %* column; the summary goes to the log."""
    from ..interpretation.label_mass import annotate_labels, label_mass
    from ..interpretation.latent_labels import LatentLabels

    log(f"Measuring the tumour labels on {len(held_out)} held-out case(s) ({args.held_out})")
    measured = label_mass(model, sae, LatentLabels(document, args.out), held_out, batch_size=args.batch_size)
    if measured["latents"]:
        log(f"Held out: tumour-labelled latents put {measured['mean_in_class']:.0%} of their heatmap inside their class on "
            f"average ({measured['holding']} of {measured['fired']} at least {measured['holds_at']:.0%}); "
            + "; ".join(f"{c} {v['in_class']:.0%} over {v['latents']}" for c, v in measured["by_category"].items()))  # fmt: skip
    else:
        log("Held out: no tumour-labelled latent fired on these cases")
    return annotate_labels(document, measured)


def gallery_choice(document: dict, count: int) -> list[int]:
    """``count`` live latents for galleries: the most confident of each category in turn, so every category
    is shown before any gets a second one."""
    from ..interpretation.latent_labels import LatentLabels

    per_category = [ids for name, ids in LatentLabels(document).categories().items() if name != "dead"]
    chosen: list[int] = []
    for rank in range(max((len(ids) for ids in per_category), default=0)):
        chosen += [ids[rank] for ids in per_category if rank < len(ids)]
    return sorted(chosen[: max(count, 0)])


def _model_hash(model_dir) -> str:
    from ..networks.segmenter import weights_sha256

    return weights_sha256(model_dir)


def _parse_latents(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SegLensError(f"--gallery-latents expects comma-separated latent ids, got '{text}'") from None


def add_commands(sub) -> None:
    from .arguments import add_device_arguments

    p = sub.add_parser("interpret", help="label every SAE latent from its top-K slices over a labelled cohort")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("--cohort", required=True, help="labelled cohort: folder of case folders, or a text file listing them")
    p.add_argument("--out", required=True, help="labels file to write (latents.json)")
    p.add_argument("--top-k", type=int, default=16, help="top activating slices per latent (default 16)")
    p.add_argument("--score", choices=("max", "sum"), default="max", help="rank a latent's slices by peak (default) or summed activation")
    p.add_argument("--splits", type=int, default=3, help="random split-halves of the cohort for stability (default 3; 0 none)")
    p.add_argument("--stability-threshold", type=float, default=0.5, help="split agreement a latent needs to be stable (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split-halves")
    p.add_argument("--held-out", metavar="COHORT", help="labelled cases the labeller never saw: measure how much of each tumour "
                   "label's heatmap falls inside its class there, and record it in the labels (the panel's Holds %% column)")
    p.add_argument("--figures", help="folder for a gallery PNG per latent and the category chart")
    p.add_argument("--gallery-latents", help="only these latents' galleries, e.g. 3,17,40 (default: every live latent)")
    p.add_argument("--gallery-max", type=int, help="at most this many galleries: the most confident latent of each category in turn")
    p.add_argument("--gallery-examples", type=int, default=6, help="top examples shown per gallery (default 6)")
    p.add_argument("--overwrite", action="store_true", help="replace existing labels file and figures")
    add_device_arguments(p)
    p.set_defaults(func=cmd_interpret)
