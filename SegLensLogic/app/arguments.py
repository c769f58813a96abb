"""Arguments shared by the ``seglens`` commands: the case to read and the device a model runs on."""

from __future__ import annotations

import argparse

from ..errors import SegLensError


def case_from_args(args: argparse.Namespace):
    """The case to read: a folder, or ``--image MOD=FILE`` pairs (plus ``--seg``)."""
    from ..data.cases import case_from_mapping, find_case

    if args.image:
        from ..data.cases import canonical_modality

        mapping: dict[str, str] = {}
        given: dict[str, str] = {}
        for item in args.image:
            modality, sep, path = item.partition("=")
            if not sep or not path or not modality.strip():
                raise SegLensError(f"--image expects MODALITY=FILE, got '{item}'")
            try:
                canonical = canonical_modality(modality)
            except ValueError as exc:
                raise SegLensError(f"--image {item}: {exc}") from None
            if canonical in given:
                raise SegLensError(f"--image gives {canonical} twice ('{given[canonical]}' and '{item}'); give each modality once")
            given[canonical] = item
            mapping[canonical] = path
        if getattr(args, "seg", None):
            mapping["seg"] = args.seg
        return case_from_mapping(mapping, case_id=args.case.name if args.case else None)
    if args.case is None:
        raise SegLensError("give --case FOLDER or --image MODALITY=FILE for each modality")
    return find_case(args.case)


def device_from_args(args: argparse.Namespace):
    import torch

    from ..networks import default_device

    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise SegLensError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.device == "auto":
        return default_device()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SegLensError("--device cuda was asked for but PyTorch sees no GPU")
    return torch.device(args.device)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--batch-size``, as every command that runs a segmenter takes them."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (auto: GPU if any)")
    p.add_argument("--batch-size", type=int, help="axial slices per forward pass (default: 16 on a GPU; on the CPU 1 for U-Net, 4 for SegFormer)")
