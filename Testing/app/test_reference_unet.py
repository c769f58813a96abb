"""The reference build of the U-Net (``seglens build-reference --tiny --arch unet``), in a file of its own so that
it runs beside the SegFormer's tiny build (``test_reference.py``) on the other pytest-xdist worker."""

from __future__ import annotations

import pytest

from helpers import seglens
from SegLensLogic.bundle import load_bundle


@pytest.mark.extended
def test_tiny_unet_rebuild_ships_a_bundle_the_command_line_segments_with(shared_data, brats2018_case, tmp_path_factory, capsys,
                                                                         monkeypatch):  # fmt: skip
    """``seglens build-reference --tiny --arch unet``: the same ten steps on a small U-Net, leverage measured at an
    encoder and a decoder level, published as a bundle beside a SegFormer one; ``seglens segment --model NAME``
    segments with it by its folder name, and the shipped-bundle checks hold for it."""
    root = tmp_path_factory.mktemp("reference-unet")
    code, out, err = seglens(capsys, "build-reference", "--tiny", "--arch", "unet", "--data", shared_data, "--out", root / "build",
                             "--publish", root / "adult-glioma-unet")  # fmt: skip
    assert code == 0, err
    bundle = load_bundle(root / "adult-glioma-unet")
    model = bundle.load_model(device="cpu")
    assert model.config.arch == "unet" and bundle.hook_point in ("down_3", "up_3")
    assert "U-Net" in bundle.card_path.read_text(encoding="utf-8").splitlines()[0]
    assert len(bundle.load_alignments()) == 3 and bundle.figures["training"]["arch"] == "unet"
    monkeypatch.setenv("SEGLENS_RESOURCES", str(root))
    code, out, err = seglens(capsys, "segment", "--case", brats2018_case, "--model", "adult-glioma-unet", "--out", root / "mask.nii.gz")
    assert code == 0, err
    assert (root / "mask.nii.gz").is_file() and "Voxels per class" in out
