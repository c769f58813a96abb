"""``seglens build-reference``: rebuild the shipped reference bundle (see :mod:`.build`)."""

from __future__ import annotations

import argparse

from ..console import log


def cmd_build_reference(args: argparse.Namespace) -> int:
    import torch

    from .build_reference import ReferenceSettings, build_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ReferenceSettings.tiny(args.arch) if args.tiny else ReferenceSettings.unet() if args.arch == "unet" else ReferenceSettings()
    build_reference(args.data, args.out, settings, overwrite=args.overwrite, publish=args.publish, log=log, until=args.until,
                    redo=args.redo)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "build-reference",
        help="rebuild the shipped reference bundle from real labelled cases (resumable: rerun to continue)",
    )
    p.add_argument("--data", required=True, help="folder with brats2018/ and brats2013/ case folders (e.g. ../shared/data)")
    p.add_argument("--out", required=True, help="build folder (rerun with the same options to continue an interrupted build)")
    p.add_argument("--arch", choices=("segformer", "unet"), default="segformer", help="the reference SegFormer (B1, the default) or a U-Net")
    p.add_argument("--tiny", action="store_true", help="a small model and short schedule: the same steps in minutes")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's choice)")
    p.add_argument("--publish", metavar="DIR", help="copy the finished bundle (and build.log) to DIR, e.g. Resources/adult-glioma-segformer")
    p.add_argument("--until", metavar="STEP", help="stop after this step (split, base, leverage, sae, ...); rerun without it to continue")
    p.add_argument("--redo", metavar="STEP", help="run this finished step and every later one again (e.g. bundle: rewrite the card)")
    p.add_argument("--overwrite", action="store_true", help="start the build in --out over")
    p.set_defaults(func=cmd_build_reference)
