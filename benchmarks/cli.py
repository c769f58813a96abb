#!/usr/bin/env python
"""Benchmark: how fast the ``seglens`` command line starts and segments, as whole processes.

What it measures (each command a fresh process, wall clock from start to exit)
-----------------------------------------------------------------------------
* **floor**: ``python -c "import torch"``: the least any command that runs a model must pay;
* ``python -c "pass"``: the interpreter alone (what ``--help`` could cost at best);
* ``import torch`` and transformers' SegFormer modeling module: what segmenting with the shipped model costs
  before SegLens reads a byte (transformers builds its lazy import structure by scanning its model files);
* ``seglens --help``: goal under 0.5 s (building the parser imports no torch, transformers, MONAI or SciPy);
* ``seglens segment --case CASE --out mask.nii.gz`` with the shipped model (default
  ``../shared/data/brats2018/Brats18_CBICA_ABM_1``, 240 x 240 x 155): goal under 4 s on 2 cores. The command's
  own line ``Wrote ... (N slices in X s ...)`` gives the time of ``segment_case`` (read, preprocess, model,
  write), reported beside the whole process, so the rest is start-up (imports, model and bundle loading).

Ratios are against the floor measured in the same run. One warm-up run of every command (file cache), then
``--repeats`` rounds, every command once per round (interleaved, so a change in the machine's load hits all of
them alike); medians and minima are reported.

``--compare DIR`` also times the same commands with the SegLens source tree at DIR (e.g. an older commit checked
out with ``git worktree add /tmp/seglens-before <commit>``), in the same rounds, for before/after figures.

Usage (from the repository root)::

    python benchmarks/cli.py
    python benchmarks/cli.py --repeats 5 --case DIR --json out.json
    python benchmarks/cli.py --compare /tmp/seglens-before
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, write_json  # noqa: E402

DEFAULT_CASE = REPO_ROOT.parent / "shared" / "data" / "brats2018" / "Brats18_CBICA_ABM_1"
# What the ``seglens`` entry point runs, with the source tree chosen by the working directory.
ENTRY = "import sys; from SegLensLogic.app.cli import main; sys.exit(main(sys.argv[1:]))"
SEGFORMER_FLOOR = "floor with the model's library: import torch + transformers' SegFormer"
SEGMENT_LINE = re.compile(r"Wrote .* \((\d+) slices in ([0-9.]+) s on (\w+)\)")


def run(argv: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """Wall seconds of one process (fails loudly on a non-zero exit), and its stdout."""
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return seconds, result.stdout


def commands(case: Path, out_dir: Path, sources: dict[str, Path]) -> dict[str, tuple[list[str], Path]]:
    """name -> (argv, working directory)."""
    table = {
        "python -c pass": ([sys.executable, "-c", "pass"], REPO_ROOT),
        "floor: python -c 'import torch'": ([sys.executable, "-c", "import torch"], REPO_ROOT),
        # What the shipped SegFormer costs before SegLens does anything: torch and transformers' modeling code.
        SEGFORMER_FLOOR: ([sys.executable, "-c", "import torch; from transformers.models.segformer import modeling_segformer"], REPO_ROOT),
    }
    for label, source in sources.items():
        suffix = f" [{label}]" if len(sources) > 1 else ""
        table[f"seglens --help{suffix}"] = ([sys.executable, "-c", ENTRY, "--help"], source)
        out = out_dir / f"mask-{label}.nii.gz"
        table[f"seglens segment{suffix}"] = ([sys.executable, "-c", ENTRY, "segment", "--case", str(case), "--out", str(out), "--overwrite"], source)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder for seglens segment")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--compare", type=Path, help="another SegLens source tree to time the same commands with")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process (default: unset, as a user runs it)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.case.is_dir():
        raise SystemExit(f"case folder {args.case} not found (give --case)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    sources = {"this tree": REPO_ROOT}
    if args.compare:
        sources = {"compare": args.compare.resolve(), "this tree": REPO_ROOT}
    load = load_average()
    print(f"- {os.cpu_count()} CPUs, 1-minute load average {load:.2f} at the start" if load is not None else f"- {os.cpu_count()} CPUs")
    if load is not None and load > 1.0:
        print("- WARNING: other processes share the CPUs: timings will be slow and noisy")
    print(f"- python {sys.version.split()[0]}, OMP_NUM_THREADS {env.get('OMP_NUM_THREADS', 'unset')}, case {args.case.name}, "
          f"{args.repeats} rounds after a warm-up")  # fmt: skip
    for label, source in sources.items():
        print(f"- {label}: {source}")

    with tempfile.TemporaryDirectory(prefix="seglens-cli-bench-") as tmp:
        table = commands(args.case, Path(tmp), sources)
        times: dict[str, list[float]] = {name: [] for name in table}
        segment_case: dict[str, list[float]] = {name: [] for name in table if "segment" in name}
        print("  rounds (seconds): " + " | ".join(table))
        for round_ in range(args.repeats + 1):
            this_round = []
            for name, (command, cwd) in table.items():
                seconds, stdout = run(command, cwd, env)
                this_round.append(seconds)
                if round_:  # round 0 is the warm-up
                    times[name].append(seconds)
                    match = SEGMENT_LINE.search(stdout)
                    if name in segment_case and match:
                        segment_case[name].append(float(match.group(2)))
            print(f"  {'warm-up' if not round_ else f'round {round_}'}: " + " | ".join(f"{s:.2f}" for s in this_round), flush=True)

    floor = statistics.median(times["floor: python -c 'import torch'"])
    print()
    print("| command | median | min | vs floor | of which segment_case (read, preprocess, model, write) | start-up (the rest) |")
    print("|---|---|---|---|---|---|")
    result = {"load_average_1min_at_start": load, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
              "omp_num_threads": env.get("OMP_NUM_THREADS"), "case": str(args.case), "repeats": args.repeats,
              "sources": {k: str(v) for k, v in sources.items()}, "commands": {}}  # fmt: skip
    for name, values in times.items():
        median = statistics.median(values)
        inner = rest = ""
        if segment_case.get(name):
            inner = f"{statistics.median(segment_case[name]):.2f} s"
            rest = f"{statistics.median(w - s for w, s in zip(values, segment_case[name])):.2f} s"
        print(f"| `{name}` | {median:.2f} s | {min(values):.2f} s | {median / floor:.2f}x | {inner} | {rest} |")
        result["commands"][name] = {"median_s": median, "min_s": min(values), "runs_s": values, "vs_floor": median / floor}
        if segment_case.get(name):
            result["commands"][name]["segment_case_median_s"] = statistics.median(segment_case[name])
            result["commands"][name]["start_up_median_s"] = statistics.median(w - s for w, s in zip(values, segment_case[name]))
    for name, goal in (("seglens --help", 0.5), ("seglens segment", 4.0)):
        median = statistics.median(times[name] if name in times else times[f"{name} [this tree]"])
        print(f"- `{name}`: {median:.2f} s, goal under {goal:g} s: {'met' if median < goal else 'NOT met'}")
    library = statistics.median(times[SEGFORMER_FLOOR])
    print(f"- of the segment goal's {4.0:g} s, importing torch and the SegFormer's library takes {library:.2f} s")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
