"""The command line starts fast: building the parser, ``seglens --help`` and a command's ``--help`` import none of
the heavy packages (torch, transformers, MONAI, SciPy, matplotlib); the concept packages' commands are listed
without importing their modules, and ``seglens segment`` imports only what a segmentation needs and reads only
the images the model takes.

Times are measured by ``benchmarks/cli.py``, never asserted here: each check looks at ``sys.modules`` of a fresh
process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_unet, seglens, write_synthetic_case

from SegLensLogic.app import cli

HEAVY = ("torch", "transformers", "monai", "scipy", "matplotlib")
CORE_COMMANDS = ("segment", "evaluate", "train-segmenter", "hooks", "extract", "train-sae", "evaluate-sae", "latents", "demo")
# Commands whose --help imports a package __init__ that still imports its whole package eagerly (torch, SciPy).
# When that package becomes lazy, the xfail turns into a failure (strict): drop the command from this table.
HEAVY_HELP: dict[str, str] = {}  # (none left: phantoms and degrade read their presets without SciPy or nibabel)


def heavy_modules_after(code: str, env: dict | None = None) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy packages it left in ``sys.modules``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_nothing_heavy():
    assert heavy_modules_after("from SegLensLogic.app.cli import build_parser\nbuild_parser()") == []


def test_help_imports_nothing_heavy():
    code = "from SegLensLogic.app.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0"
    assert heavy_modules_after(code) == []


@pytest.mark.parametrize(
    "command",
    [*CORE_COMMANDS, *(name for name in cli.PACKAGE_COMMANDS if name not in HEAVY_HELP)]
    + [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=why)) for name, why in HEAVY_HELP.items()],
)
def test_command_help_imports_nothing_heavy(command):
    code = f"from SegLensLogic.app.cli import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0"
    assert heavy_modules_after(code) == []


def test_deferred_commands_match_their_modules():
    """The names and help lines ``seglens --help`` lists without importing a module are those its ``add_commands``
    defines, in the same order, and nothing else."""
    for module in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser(prog="seglens").add_subparsers()
        __import__(module, fromlist=["add_commands"]).add_commands(sub)
        added = [(action.dest, action.help) for action in sub._choices_actions]
        listed = [(name, help_line) for name, (owner, help_line) in cli.PACKAGE_COMMANDS.items() if owner == module]
        assert added == listed, module


def test_deferred_commands_build_the_same_parser():
    """Loading every deferred command leaves ``seglens --help`` and each command's help as loading on demand does."""
    lazy, full = cli.build_parser(), cli.build_parser(load_all=True)
    assert lazy.format_help() == full.format_help()

    def commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
        return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))

    for name in cli.PACKAGE_COMMANDS:
        if name in commands(lazy).deferred:
            commands(lazy).load(commands(lazy).deferred[name])
        assert commands(lazy).choices[name].format_help() == commands(full).choices[name].format_help(), name
    assert not commands(lazy).deferred
    assert list(commands(lazy).choices) == list(commands(full).choices)
    assert lazy.format_help() == full.format_help()


def test_architectures_listed_without_torch_are_those_registered():
    from SegLensLogic.networks import ARCHITECTURES
    from SegLensLogic.networks import segformer, unet  # noqa: F401 (register their classes)
    from SegLensLogic.networks.segmenter import Segmenter, segmenter_class

    assert set(ARCHITECTURES) == set(Segmenter.registry)
    assert all(segmenter_class(arch).__name__ in ("SegFormerSegmenter", "UNetSegmenter") for arch in ARCHITECTURES)
    assert segmenter_class("no-such-arch") is None


def test_lazy_packages_keep_their_public_names():
    """Every name a lazy package ``__init__`` exports resolves, and ``from package import name`` works."""
    import importlib

    for package in ("SegLensLogic.networks", "SegLensLogic.sae", "SegLensLogic.data", "SegLensLogic.interpretation", "SegLensLogic.alignment"):
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, (package, name)
            assert name in dir(module), (package, name)
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018
    # In a fresh process, names reached in reverse order stay what they are: importing a submodule for one name
    # must not leave its sibling of the submodule's own name (interpretation.label_mass) bound to the submodule.
    code = (
        "import importlib, inspect\n"
        "for package in ('SegLensLogic.networks', 'SegLensLogic.sae', 'SegLensLogic.data', 'SegLensLogic.interpretation', 'SegLensLogic.alignment'):\n"
        "    module = importlib.import_module(package)\n"
        "    for name in reversed(module.__all__):\n"
        "        getattr(module, name)\n"
        "    bad = [name for name in module.__all__ if inspect.ismodule(getattr(module, name))]\n"
        "    assert not bad, (package, bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    from SegLensLogic.sae import SAETrainingOptions
    from SegLensLogic.sae.trainer import SAETrainingOptions as from_training

    assert SAETrainingOptions is from_training


def test_loading_a_segformer_does_not_import_monai():
    """A SegFormer model (the shipped one) loads without the U-Net's MONAI."""
    code = (
        "from SegLensLogic.networks import load_segmenter\n"
        "from SegLensLogic.resources import reference_bundle_path\n"
        "load_segmenter(reference_bundle_path() / 'model', device='cpu')"
    )
    assert "monai" not in heavy_modules_after(code)


def test_segment_reads_no_label_file(capsys, tmp_path, monkeypatch):
    """``seglens segment`` reads the model's images only: a label file that cannot be read does not matter."""
    import SegLensLogic.data.cases as cases

    case = write_synthetic_case(tmp_path, "BraTS-SYN-00001-000", shape=(32, 32, 8))
    model = save_tiny_unet(tmp_path / "model", ["t1n", "t1c", "t2w", "t2f"])

    def no_labels(*args, **kwargs):
        raise AssertionError("segment read the label file")

    monkeypatch.setattr(cases, "read_label_array", no_labels)
    out = tmp_path / "mask.nii.gz"
    code, stdout, err = seglens(capsys, "segment", "--model", model, "--case", case, "--out", out)
    assert code == 0, err
    assert out.is_file() and f"Wrote {out}" in stdout


def test_segment_end_to_end_with_the_shipped_model(tmp_path, brats2018_case):
    """The real entry point on a real 240x240x155 case with the shipped model: a mask on the input's grid, and no
    MONAI (a SegFormer needs none)."""
    import nibabel as nib

    out = tmp_path / "mask.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a busy test machine: one thread does not spin-wait
    code = (
        "from SegLensLogic.app.cli import main\n"
        f"assert main(['segment', '--case', {str(brats2018_case)!r}, '--out', {str(out)!r}, '--device', 'cpu']) == 0"
    )
    assert "monai" not in heavy_modules_after(code, env=env)
    reference = next(Path(brats2018_case).glob("*_t1.nii.gz"))
    mask, image = nib.load(str(out)), nib.load(str(reference))
    assert mask.shape == image.shape == (240, 240, 155)
    assert (mask.affine == image.affine).all()
    assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2, 3}
