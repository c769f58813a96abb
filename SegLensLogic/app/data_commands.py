"""``seglens phantoms`` (synthetic cohorts with planted shifts) and ``seglens degrade`` (acquisition shift of real cases)."""

from __future__ import annotations

import argparse

from ..errors import SegLensError


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape expects X,Y,Z voxel counts, got '{text}'") from None
    if len(shape) != 3 or min(shape) < 16:
        raise argparse.ArgumentTypeError(f"--shape expects three sizes of at least 16 voxels, got '{text}'")
    return shape  # type: ignore[return-value]


def cmd_phantoms(args: argparse.Namespace) -> int:
    from ..console import log
    from ..data.phantoms import get_population, write_phantom_cohort

    if args.n < 1:
        raise SegLensError("--n must be at least 1")
    population = get_population(args.population)
    log(f"Writing {args.n} {population.name} phantom(s) of {'x'.join(map(str, args.shape))} voxels to {args.out}")
    write_phantom_cohort(args.out, args.n, seed=args.seed, shape=args.shape, prefix=args.prefix, population=population,
                         overwrite=args.overwrite, log=log)  # fmt: skip
    log(f"Wrote {args.out} (cohort.json records the population and its shifted factors)")
    return 0


def cmd_degrade(args: argparse.Namespace) -> int:
    from ..console import log
    from ..data.phantoms import degrade_case

    for case_dir in args.case:
        target = degrade_case(case_dir, args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite, strength=args.strength)
        log(f"Wrote {target} ({args.preset} acquisition, strength {args.strength:g})")
    return 0


def add_commands(sub) -> None:
    from ..data.phantoms import DEGRADE_PRESETS, POPULATIONS

    p = sub.add_parser("phantoms", help="write a synthetic cohort (MNI152-based phantoms) of a population with planted shifts")
    p.add_argument("--population", choices=tuple(POPULATIONS), default="adult", help="population preset (default adult)")
    p.add_argument("--n", type=int, default=20, help="number of cases (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses seed+i")
    p.add_argument("--shape", type=_shape, default=(96, 112, 96), help="volume size X,Y,Z in voxels (default 96,112,96)")
    p.add_argument("--prefix", help="case id prefix (default SYN-<POPULATION>)")
    p.add_argument("--out", required=True, help="cohort folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing cases of the same ids")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("degrade", help="apply a population's acquisition shift (noise, bias field, thick slices) to real cases")
    p.add_argument("case", nargs="+", help="case folder(s)")
    p.add_argument("--preset", choices=tuple(DEGRADE_PRESETS), default="ssa", help="acquisition preset (default ssa)")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the preset's noise, bias field and extra slice thickness (default 1; 2 is twice as strong)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write the degraded case folder(s) into")
    p.add_argument("--overwrite", action="store_true", help="replace existing output case folders")
    p.set_defaults(func=cmd_degrade)
