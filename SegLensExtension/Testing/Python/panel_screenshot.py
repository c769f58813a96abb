"""A screenshot of the SegLens panel with a real case in it, for the README.

The panel is built exactly as ``Testing/slicer/test_slicer_widget.py`` builds it: the module's real ``.ui`` loaded by
PySide6 (offscreen), real MRML nodes and scenes from ``slicer-core``, and ``slicer_stand_in.py`` for what only the
Slicer application provides. A real BraTS 2018 case (by default ``Brats18_TCIA02_370_1``, one of the shipped
bundle's test cases, never trained on) is read with Slicer's volume reader; Segment runs with the shipped bundle
(``Resources/adult-glioma-segformer``); the Red view goes to the slice with the most tumour; the latent that fires
most there is selected in the latent table (its heatmap layer and the live preview follow); then the panel alone is
grabbed to PNG (``QWidget.grab``), with no slice or 3D view.

Run from the repository root::

    python SegLensExtension/Testing/Python/panel_screenshot.py --out docs/images/slicer-panel.png

Options: ``--case`` (a BraTS 2018 case folder; default the case above under ``$SEGLENS_DATA`` or ``../shared/data``),
``--bundle`` (a SegLens bundle folder), ``--width`` (pixels), ``--threads`` (PyTorch CPU threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

HERE = Path(__file__).resolve().parent
EXTENSION = HERE.parents[1]
REPO = EXTENSION.parent
MODULE_FILE = EXTENSION / "SegLens.py"
DEFAULT_BUNDLE = REPO / "Resources" / "adult-glioma-segformer"
DEFAULT_CASE = "Brats18_TCIA02_370_1"
SEQUENCES = ("t1", "t1ce", "t2", "flair")  # BraTS 2018 file suffixes; the panel assigns them from the node names
DEFAULT_WIDTH = 640
TABLE_ROWS = 6  # latent table rows visible in the screenshot


def default_case_dir() -> Path:
    data = Path(os.environ["SEGLENS_DATA"]).expanduser() if os.environ.get("SEGLENS_DATA") else REPO.parent / "shared" / "data"
    return data / "brats2018" / DEFAULT_CASE


def _paths() -> list[str]:
    """Put the stand-in, the module's folder and the repository on ``sys.path``; returns the entries added."""
    added = []
    for folder in (HERE, EXTENSION, REPO):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
            added.append(str(folder))
    return added


def wait_idle(widget, app, timeout: float = 600.0, step: float = 0.01) -> None:
    """Run the event loop until the panel has no job in flight or pending, sleeping ``step`` seconds between
    checks (a benchmark takes a small one, so that its own wait does not count)."""
    end = time.monotonic() + timeout
    while widget.job is not None or widget.pending:
        if time.monotonic() > end:
            raise TimeoutError(f"the panel is still busy with {widget.job and widget.job.kind}")
        app.processEvents()
        time.sleep(step)
    app.processEvents()


def pump(app, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def load_case(scene, case_dir: Path) -> list:
    """File > Add data: each sequence of a BraTS 2018 case through Slicer's volume reader, named as its file."""
    import slicer

    loaded = []
    for suffix in SEQUENCES:
        path = case_dir / f"{case_dir.name}_{suffix}.nii.gz"
        if not path.is_file():
            continue
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case_dir.name}_{suffix}")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RuntimeError(f"Slicer's volume reader could not read {path}")
        loaded.append(node)
    if not loaded:
        raise FileNotFoundError(f"no BraTS 2018 sequences ({', '.join(SEQUENCES)}) in {case_dir}")
    return loaded


def show_session(widget, app, red, bundle: Path, rows: int = 1, alpha: float = 2.0) -> dict:
    """Drive the panel as a user would for the screenshot: Segment with ``bundle``, go to the slice with the most
    tumour in the Red view, select the top ``rows`` latents of the table there and set the steering slider to
    ``alpha`` (the live preview of the current slice follows). Returns what it showed."""
    import numpy as np
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    from slicer_stand_in import move_slice, unwrap
    from SegLensLib import nodes

    ui = widget.ui
    ui.bundlePathLineEdit.currentPath = str(bundle)
    ui.segmentButton.click()
    if widget.job is None:
        raise RuntimeError(f"Segment did not start: {ui.statusLabel.text}")
    wait_idle(widget, app)
    session = widget.logic.session
    if session is None or not widget.logic.isSegmented():
        raise RuntimeError(f"Segment failed: {ui.statusLabel.text}")
    labels = session.labels
    per_slice = (labels > 0).reshape(-1, labels.shape[2]).sum(axis=0)
    k = int(np.argmax(per_slice)) if per_slice.any() else labels.shape[2] // 2
    centre = [labels.shape[0] / 2.0, labels.shape[1] / 2.0, float(k), 1.0]
    z = float((nodes.ijk_to_ras(widget.logic.referenceNode) @ np.array(centre))[2])
    move_slice(red, offset=z)
    pump(app, 0.3)  # the slice-following timer (150 ms after the last move)
    wait_idle(widget, app)
    table = unwrap(ui.latentTableWidget)
    if table.rowCount() == 0:
        raise RuntimeError("the latent table is empty after Segment")
    for row in range(min(rows, table.rowCount())):  # clicked as a user clicks: the first alone, then with Ctrl
        item = table.item(row, 0)
        table.scrollToItem(item)
        modifier = Qt.ControlModifier if row else Qt.NoModifier
        QTest.mouseClick(table.viewport(), Qt.LeftButton, modifier, table.visualItemRect(item).center())
    table.scrollToTop()
    wait_idle(widget, app)
    ui.alphaSliderWidget.value = float(alpha)
    wait_idle(widget, app)
    return {"slice": widget.currentSlice, "latents": widget.selectedLatents(), "status": ui.statusLabel.text,
            "segmentation": widget.logic.currentSegmentationNode.GetName()}


def grab_panel(widget, out: Path, width: int = DEFAULT_WIDTH):
    """The module panel alone (no views) as a PNG at ``out``, ``width`` pixels wide and as tall as its layout asks.
    Returns the QImage that was saved."""
    from PySide6 import QtGui, QtWidgets

    from slicer_stand_in import unwrap

    panel = unwrap(widget.parent)
    table = unwrap(widget.ui.latentTableWidget)
    rows = min(TABLE_ROWS, max(table.rowCount(), 1))
    table.setMinimumHeight(table.horizontalHeader().height() + rows * table.verticalHeader().defaultSectionSize()
                           + table.horizontalScrollBar().sizeHint().height() + 2 * table.frameWidth())
    hint = panel.sizeHint()
    panel.resize(max(width, panel.minimumSizeHint().width()), hint.height())
    QtWidgets.QApplication.processEvents()
    image = panel.grab().toImage()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = image.convertToFormat(QtGui.QImage.Format_RGB32)  # no alpha channel: the panel is opaque
    if not image.save(str(out), "PNG", 9):
        raise OSError(f"could not write {out}")
    return image


def render(out: Path, case_dir: Path | None = None, bundle: Path | None = None, width: int = DEFAULT_WIDTH) -> dict:
    """Build the panel, show a real case segmented with ``bundle`` in it, and save the panel as a PNG at ``out``.

    Returns ``{"path", "width", "height", "bytes", "slice", "latents", "status", "segmentation"}``.
    """
    added = _paths()
    try:
        return _render(Path(out), case_dir, bundle, width)
    finally:
        for folder in added:
            sys.path.remove(folder)


def _render(out: Path, case_dir, bundle, width) -> dict:
    import importlib

    import slicer

    import slicer_stand_in as stand_in

    case_dir = Path(case_dir) if case_dir is not None else default_case_dir()
    bundle = Path(bundle) if bundle is not None else DEFAULT_BUNDLE
    if not case_dir.is_dir():
        raise FileNotFoundError(f"case folder not found: {case_dir} (set SEGLENS_DATA or pass --case)")
    if not (bundle / "bundle.json").is_file():
        raise FileNotFoundError(f"not a SegLens bundle: {bundle}")
    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    views = stand_in.add_slice_views(scene)
    fresh = [n for n in sys.modules if n == "SegLens" or n.startswith("SegLensLib")]
    saved = {n: sys.modules.pop(n) for n in fresh}  # the panel's module imported with the stand-in's qt
    widget = None
    with tempfile.TemporaryDirectory(prefix="seglens-screenshot-") as settings, \
            stand_in.installed(scene, MODULE_FILE, settings) as (app, messages):
        try:
            SegLens = importlib.import_module("SegLens")
            widget = stand_in.module_panel(SegLens.SegLensWidget)
            load_case(scene, case_dir)
            pump(app, 0.05)  # the panel assigns the sequences from the node names
            shown = show_session(widget, app, views["Red"], bundle)
            if messages.errors():
                raise RuntimeError(f"the panel showed an error: {messages.errors()[-1]}")
            if app.slotErrors:
                raise RuntimeError("a slot raised:\n" + "\n".join(app.slotErrors))
            image = grab_panel(widget, out, width)
        finally:
            if widget is not None and widget.logic is not None:
                widget.cleanup()
            if widget is not None:  # the selectors stop following the scene before it goes
                for combo in stand_in.unwrap(widget.parent).findChildren(stand_in.qMRMLNodeComboBox):
                    combo.blockSignals(True)
                    combo.setMRMLScene(None)
            for name in [n for n in sys.modules if n == "SegLens" or n.startswith("SegLensLib")]:
                del sys.modules[name]
            sys.modules.update(saved)
    return {"path": out, "width": image.width(), "height": image.height(), "bytes": out.stat().st_size, **shown}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "slicer-panel.png", help="PNG file to write")
    parser.add_argument("--case", type=Path, default=None, help=f"BraTS 2018 case folder (default: {DEFAULT_CASE})")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="SegLens bundle folder")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="panel width in pixels")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    started = time.monotonic()
    result = render(args.out, args.case, args.bundle, args.width)
    print(f"wrote {result['path']} ({result['width']} x {result['height']} px, {result['bytes'] / 1024:.0f} KB) in "
          f"{time.monotonic() - started:.0f} s: slice {result['slice']}, latents {result['latents']}; "
          f"status: {result['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
