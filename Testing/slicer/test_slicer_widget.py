"""The SegLens panel driven like a user: the real ``.ui`` in a real Qt (PySide6, offscreen), real MRML nodes and
scenes (``slicer-core``), a real BraTS case read by Slicer's volume reader, and the tiny model trained on real cases.

What only the Slicer application provides comes from ``SegLensExtension/Testing/Python/slicer_stand_in.py``:
PythonQt's attribute-style properties and ``connect("signal(args)", slot)``, the Slicer/CTK widgets of the ``.ui``
(selectors that follow the scene, sliders, path edits), ``slicer.app`` with a layout manager over the scene's real
slice nodes, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` (stored as Slicer stores it) and
message boxes that record what they would show. ``slicer.util``'s own ``loadUI``, ``childWidgetVariables``,
``settingsValue``, ``NodeModify`` and ``VTKObservationMixin`` run unchanged.

One test walks through a session as a user would (each step says which point of the panel's contract it shows) and
measures the statement coverage of ``SegLensWidget`` while doing so.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install -e '.[test]') is needed for the Slicer module tests")
pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is needed to load the panel's .ui file")
coverage = pytest.importorskip("coverage", reason="coverage (pip install -e '.[test]') measures the panel's coverage")

REPO = Path(__file__).resolve().parents[2]
EXTENSION = REPO / "SegLensExtension"
MODULE_FILE = EXTENSION / "SegLens.py"
STAND_IN = EXTENSION / "Testing" / "Python"
MIN_WIDGET_COVERAGE = 90.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- a reference bundle made from the tiny real pipeline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_resources(real_pipeline, real_decoder_sae, tmp_path_factory) -> Path:
    """A ``Resources`` folder holding a bundle under the reference bundle's name, from the tiny real pipeline with its
    SAE at the decoder level ``up_4`` (where a hint fix has something to move): its model says it was trained with
    modality dropout (it accepts missing sequences); latent labels; alignments with two populations (``ssa`` shares
    latents 64-127, ``pediatric`` 96-127 and 0-15); suggestions for ``ssa``."""
    pytest.importorskip("SegLensLogic.steering.suggestions", reason="suggested corrections are not in this checkout")
    import shutil

    from SegLensLogic.bundle import build_bundle
    from SegLensLogic.resources import REFERENCE_BUNDLE_NAME
    from SegLensLogic.sae import sae_sha256

    root = tmp_path_factory.mktemp("reference")
    model = root / "model"
    shutil.copytree(real_pipeline.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.setdefault("training", {}).setdefault("options", {})["modality_dropout"] = 0.25
    (model / "config.json").write_text(json.dumps(config))
    from SegLensLogic.sae import BatchTopKSAE

    sha = sae_sha256(real_decoder_sae)
    d_sae = BatchTopKSAE.load(real_decoder_sae).d_sae
    labels = root / "latents.json"
    labels.write_text(json.dumps({"format_version": 1, "kind": "seglens-latent-labels", "sae": {"path": "sae", "sha256": sha},
                                  "latents": [{"id": j, "category": "edema" if j % 2 else "tumour core"} for j in range(0, d_sae, 3)]}))  # fmt: skip
    alignments = []
    for name, shared in (("ssa", list(range(d_sae // 2, d_sae))), ("pediatric", list(range(3 * d_sae // 4, d_sae)) + list(range(16)))):
        path = root / f"adult-vs-{name}.json"
        path.write_text(json.dumps({
            "format_version": 1, "kind": "seglens-alignment", "method": "decoder-encoder-cosine", "tau": 0.8,
            "sae_a": {"name": "adult", "sha256": sha, "d_sae": d_sae}, "sae_b": {"name": name, "sha256": "0" * 64, "d_sae": d_sae},
            "pairs": [{"a": j, "b": j, "shared": j in shared} for j in range(d_sae)], "shared_a": shared, "shared_b": shared,
        }))  # fmt: skip
        alignments.append(path)
    suggestions = root / "suggestions.json"
    suggestions.write_text(json.dumps({
        "format_version": 1, "kind": "seglens-steering-suggestions", "n_latents": 3, "alphas": [0.5, 2.0],
        "reference": {"proportions": [0.2, 0.6, 0.2], "log_size": [9.0, 1.0]},
        "populations": {"ssa": {"specific": list(range(d_sae // 2)), "alignment": "alignments/adult-vs-ssa.json", "calibrated_alpha": 2.0}},
        "calibrated_alpha": {"all": 2.0, "ssa": 2.0}, "evidence": [],
    }))  # fmt: skip
    resources = root / "Resources"
    build_bundle(model, real_decoder_sae, resources / REFERENCE_BUNDLE_NAME, "adult", labels=labels,
                 alignments=alignments, cohort="adult", suggestions=suggestions)  # fmt: skip
    return resources


# -- driving the panel -------------------------------------------------------------------------------------------------------
def pump(app, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.005)


def wait_idle(widget, app, timeout: float = 180.0, seen: list | None = None) -> None:
    """Let the event loop run until no job is in flight or pending (``seen`` collects progress snapshots)."""
    end = time.monotonic() + timeout
    while widget.job is not None or widget.pending:
        assert time.monotonic() < end, f"the panel is still busy with {widget.job and widget.job.kind}"
        if seen is not None and widget.job is not None:
            seen.append((widget.job.kind, *widget.job.progress.snapshot(), widget.ui.statusLabel.text, widget.ui.progressBar.value))
        app.processEvents()
        time.sleep(0.005)
    app.processEvents()


def settle(widget, app) -> None:
    """Wait for the slice-following timer (150 ms after the last scroll), then for the jobs it starts."""
    pump(app, 0.25)
    wait_idle(widget, app)


def load_volume(scene, path: Path, name: str):
    """File > Add data: Slicer's volume reader into a new scalar volume node."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node


def coarse_copy(scene, path: Path, name: str):
    """The same sequence acquired on a coarser grid (every second voxel, 2 mm): another grid than the others."""
    from SegLensLib import nodes

    source = load_volume(scene, path, "tmp")
    array, affine = nodes.volume_array(source)[::2, ::2, ::2], nodes.ijk_to_ras(source)
    scene.RemoveNode(source)
    affine[:3, :3] *= 2.0
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
    nodes.set_volume_array(node, np.ascontiguousarray(array))
    return node


def read_seg_labels(case_dir: Path) -> np.ndarray:
    """The case's expert labels (values 0, 1, 2, 4) as a float array on its grid: a segmentation loaded as an image."""
    import nibabel as nib

    return np.asarray(nib.load(str(case_dir / f"{case_dir.name}_seg.nii.gz")).dataobj).astype(np.float32)


def segment_nodes(scene, role=None) -> list:
    found = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if role is None or node.GetAttribute("SegLens.Role") == role:
            found.append(node)
    return found


def ctrl_click_rows(table, rows) -> None:
    """Click rows of the latent table with Ctrl held, as a user selects several."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    from slicer_stand_in import unwrap

    view = unwrap(table)
    for row in rows:
        item = view.item(row, 0)
        view.scrollToItem(item)
        QTest.mouseClick(view.viewport(), Qt.LeftButton, Qt.ControlModifier, view.visualItemRect(item).center())


def widget_coverage(cov, path: Path) -> tuple[float, int, int, list[int]]:
    """Statement coverage of the ``SegLensWidget`` class: (percent, run, statements, missing lines)."""
    _, statements, _, missing, _ = cov.analysis2(str(path))
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegLensWidget")
    inside = [line for line in statements if cls.lineno <= line <= cls.end_lineno]
    missed = [line for line in missing if cls.lineno <= line <= cls.end_lineno]
    return 100.0 * (len(inside) - len(missed)) / len(inside), len(inside) - len(missed), len(inside), missed


@pytest.fixture
def fresh_module_imports():
    """``SegLens`` and ``SegLensLib`` imported afresh for the test and forgotten afterwards (other suites import them
    without Qt, as the headless Logic)."""
    names = [n for n in sys.modules if n == "SegLens" or n == "SegLensLib" or n.startswith("SegLensLib.")]
    saved = {n: sys.modules.pop(n) for n in names}
    added = []
    for folder in (EXTENSION, STAND_IN):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
            added.append(str(folder))
    yield
    for n in [n for n in sys.modules if n == "SegLens" or n == "SegLensLib" or n.startswith("SegLensLib.")]:
        del sys.modules[n]
    sys.modules.update(saved)
    for folder in added:
        sys.path.remove(folder)


def test_panel_driven_like_a_user(reference_resources, real_pipeline, brats2018_dir, tmp_path, monkeypatch,
                                  fresh_module_imports, capsys, subtests):
    from pipelines import REAL_TEST_CASES
    from SegLensLogic.resources import REFERENCE_BUNDLE_NAME
    from SegLensLogic.steering import SteeringSession

    monkeypatch.setenv("SEGLENS_RESOURCES", str(reference_resources))
    reference_bundle = reference_resources / REFERENCE_BUNDLE_NAME

    # Every model call of the session is recorded with the thread it ran on: none may run on the main thread.
    calls: list[tuple[str, str]] = []
    for name in ("segment", "latent_table", "heatmap", "preview_slice", "apply", "suggest", "apply_recipe", "fix"):
        original = getattr(SteeringSession, name)

        def recorded(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, threading.current_thread().name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(SteeringSession, name, recorded)

    scene = slicer.vtkMRMLScene()
    colour_logic = slicer.vtkMRMLColorLogic()
    colour_logic.SetMRMLScene(scene)
    import slicer_stand_in as stand_in

    views = stand_in.add_slice_views(scene)
    red = views["Red"]
    remembered = tmp_path / "remembered-exports"
    remembered.mkdir()
    cov = coverage.Coverage(data_file=None, include=[str(MODULE_FILE)])
    with stand_in.installed(scene, MODULE_FILE, tmp_path / "settings") as (app, messages):
        import qt

        qt.QSettings().setValue("SegLens/ExportFolder", str(remembered))  # a folder chosen in an earlier session
        cov.start()
        widget = None
        try:
            SegLens = importlib.import_module("SegLens")
            from SegLensLib import nodes

            widget = stand_in.module_panel(SegLens.SegLensWidget)
            ui = widget.ui
            parameters = widget._parameterNode
            _drive(SegLens, nodes, widget, ui, parameters, app, messages, scene, red, calls, reference_bundle, remembered,
                   brats2018_dir / REAL_TEST_CASES[0], tmp_path, stand_in, monkeypatch, subtests)
            # Slicer closes (or reloads the module) while a job runs: the daemon worker is told to stop, nothing waits.
            ui.segmentButton.click()
            job = widget.job
            assert job is not None and job.kind == "segment", messages.errors()[-1:]
            widget.cleanup()
            assert job.orphaned and job.cancelled and widget.worker.thread.daemon

            # An old Slicer: a message instead of the panel, and in the module's help.
            app.majorVersion, app.minorVersion = 5, 8
            old = stand_in.module_panel(SegLens.SegLensWidget)
            assert "needs 3D Slicer 5.10 or later" in old.versionLabel.text and "Slicer 5.8" in old.versionLabel.text
            assert old.logic is None and not hasattr(old, "ui")
            old.cleanup()
            module = SegLens.SegLens(types.SimpleNamespace(path=str(MODULE_FILE)))
            assert module.parent.helpText.startswith("SegLens needs 3D Slicer 5.10 or later")
            app.majorVersion, app.minorVersion = 5, 10
        finally:
            cov.stop()
            if widget is not None and widget.logic is not None and widget.worker.thread.is_alive():
                widget.cleanup()
        assert app.slotErrors == [], "a slot raised (PythonQt would print a traceback):\n" + "\n".join(app.slotErrors)

    # No model call ran on the main thread: all on the worker thread.
    assert calls and {thread for _, thread in calls} == {"SegLens"}, sorted(set(calls))

    percent, run, total, missed = widget_coverage(cov, MODULE_FILE)
    with capsys.disabled():
        print(f"\nSegLensWidget statement coverage: {percent:.1f} % ({run} of {total} statements; not run: lines {missed})")
    assert percent >= MIN_WIDGET_COVERAGE, f"SegLensWidget coverage {percent:.1f} % < {MIN_WIDGET_COVERAGE} %; not run: {missed}"


def _drive(SegLens, nodes, widget, ui, parameters, app, messages, scene, red, calls, reference_bundle, remembered,
           case_dir, tmp_path, stand_in, monkeypatch, subtests):
    """The user's session, step by step: each step a subtest of its own, so that a failure names its step and the
    steps after it still run (on the state it left)."""
    import qt

    from slicer_stand_in import move_slice, unwrap
    from SegLensLib import dependencies

    with subtests.test(msg="Getting started"):
        # -- Getting started: the reference bundle is preselected, the export folder remembered, nothing to do yet.
        assert ui.bundlePathLineEdit.currentPath == str(reference_bundle) == parameters.bundlePath
        # The model chooser lists the shipped bundles (the reference first) and follows the bundle folder.
        models = [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count)]
        assert len(models) == 2 and models[0].startswith("adult (") and models[1] == SegLens.OTHER_BUNDLE
        assert ui.modelComboBox.currentIndex == 0
        ui.bundlePathLineEdit.currentPath = str(tmp_path)
        assert ui.modelComboBox.currentIndex == 1 and parameters.bundlePath == str(tmp_path)
        ui.modelComboBox.currentIndex = 0
        assert Path(ui.bundlePathLineEdit.currentPath).resolve() == reference_bundle.resolve() and ui.modelComboBox.currentIndex == 0
        ui.bundlePathLineEdit.currentPath = str(reference_bundle)
        assert ui.exportDirectoryButton.directory == str(remembered)
        assert ui.segmentButton.enabled and not ui.applyButton.enabled and not ui.undoButton.enabled
        assert not ui.exportButton.enabled and not ui.suggestButton.enabled and not ui.cancelButton.enabled
        headers = [unwrap(ui.latentTableWidget).horizontalHeaderItem(c).text() for c in range(ui.latentTableWidget.columnCount)]
        assert headers == ["Latent", "Label", "Category", "Holds %", "Other seed", "Status", "Shared with", "Slice", "Volume"]

        # Bad input is a clear message, never a traceback.
        ui.segmentButton.click()
        assert widget.job is None and messages.errors()[-1] == "Cannot segment: select at least one input volume (T1, T1 contrast, T2 or FLAIR)"
        assert "detailedText" not in messages.messages[-1][2]

        # Dependencies: pip decides whether the index is reachable; when it fails, the message says what to install by hand.
        requirements = tmp_path / "requirements.txt"
        requirements.write_text("seglens-not-a-real-package>=1\n")
        monkeypatch.setattr(dependencies, "REQUIREMENTS", requirements)

        def failing_pip(text):
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", text])

        monkeypatch.setattr(slicer.util, "pip_install", failing_pip)
        ui.segmentButton.click()
        assert messages.questions[-1].startswith("SegLens needs these Python packages in Slicer: seglens-not-a-real-package>=1")
        error = messages.errors()[-1]
        assert error.startswith("SegLens cannot start: SegLens could not install seglens-not-a-real-package>=1: pip failed")
        assert "PythonSlicer -m pip install 'seglens-not-a-real-package>=1'" in error and widget.job is None
        # A package that was already imported gets a new version: Slicer must restart, and the panel offers it.
        site = tmp_path / "site"
        site.mkdir()
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setitem(sys.modules, "seglens_fake_pkg", types.ModuleType("seglens_fake_pkg"))
        requirements.write_text("seglens-fake-pkg>=1\n")

        def installing_pip(text):
            info = site / "seglens_fake_pkg-1.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text("Metadata-Version: 2.1\nName: seglens-fake-pkg\nVersion: 1.0\n")
            (info / "top_level.txt").write_text("seglens_fake_pkg\n")

        monkeypatch.setattr(slicer.util, "pip_install", installing_pip)
        ui.segmentButton.click()
        assert "Slicer had already loaded seglens-fake-pkg>=1: restart Slicer now" in messages.questions[-1]
        assert app.restarts == 1 and widget.job is None and "Restart Slicer" in ui.statusLabel.text
        monkeypatch.setattr(dependencies, "REQUIREMENTS", dependencies.MODULE_DIR / "Resources" / "requirements.txt")

    with subtests.test(msg="Load volumes"):
        # -- Load volumes: the sequences are assigned from the node names where they are clear. The FLAIR is on a
        #    coarser grid; there is no T2 (the bundle's model accepts missing sequences).
        name = case_dir.name
        t1 = load_volume(scene, case_dir / f"{name}_t1.nii.gz", f"{name}_t1")
        t1c = load_volume(scene, case_dir / f"{name}_t1ce.nii.gz", f"{name}_t1ce")
        flair = coarse_copy(scene, case_dir / f"{name}_flair.nii.gz", f"{name}_flair")
        flair_voxels = nodes.volume_array(flair)
        load_volume(scene, case_dir / f"{name}_t1.nii.gz", "scan")  # says nothing about its sequence
        pump(app, 0.05)
        assert [ui.t1nSelector.currentNode(), ui.t1cSelector.currentNode(), ui.t2wSelector.currentNode(), ui.t2fSelector.currentNode()] == [t1, t1c, None, flair]
        assert ui.statusLabel.text.startswith("Sequences from the volume names: T1 = ")
        assert parameters.t1n is t1 and parameters.t2f is flair and parameters.t2w is None
        # The user has a label map of their own in the views' label layer (SegLens borrows that layer for its preview).
        user_labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "my labels")
        nodes.set_volume_array(user_labels, np.zeros((8, 8, 8), dtype=np.uint8))
        views = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
        for view in views:
            view.SetLabelVolumeID(user_labels.GetID())
            view.SetLabelOpacity(0.6)

        # A bundle folder that is not there: a clear message from the job, and no session.
        ui.bundlePathLineEdit.currentPath = ""
        ui.segmentButton.click()
        assert messages.errors()[-1] == "Cannot segment: choose a bundle folder (bundle.json, model/, sae/)"
        ui.bundlePathLineEdit.currentPath = str(tmp_path / "no-bundle")
        ui.segmentButton.click()
        wait_idle(widget, app)
        assert messages.errors()[-1] == f"Segmentation failed: {tmp_path / 'no-bundle'}: bundle folder not found"
        assert "detailedText" not in messages.messages[-1][2] and widget.logic.session is None
        ui.bundlePathLineEdit.currentPath = str(reference_bundle)

    with subtests.test(msg="What is not an MRI is refused before any work, naming the volume"):
        # -- What is not an MRI is refused before any work, naming the volume: a photograph, a label map as FLAIR.
        photo = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "holiday photo")
        nodes.set_volume_array(photo, np.random.default_rng(0).integers(0, 255, (64, 64, 1)).astype(np.float32))
        ui.t1nSelector.setCurrentNode(photo)
        ui.segmentButton.click()
        assert widget.job is None and messages.errors()[-1].startswith("Cannot segment: volume 'holiday photo' (t1n) is not a 3D MRI volume")
        ui.t1nSelector.setCurrentNode(t1)
        segmentation_as_image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "labels")
        nodes.set_volume_array(segmentation_as_image, read_seg_labels(case_dir))
        ui.t2fSelector.setCurrentNode(segmentation_as_image)
        ui.segmentButton.click()
        assert widget.job is None and "looks like a label map, not an MRI sequence" in messages.errors()[-1]
        ui.t2fSelector.setCurrentNode(flair)  # (label map nodes are not offered by the selectors at all)
        for node in (photo, segmentation_as_image):
            scene.RemoveNode(node)

    with subtests.test(msg="Segment, with a double click, while the user scrolls and pans the Red view"):
        # -- Segment, with a double click, while the user scrolls and pans the Red view.
        segments_before = len(calls)
        ui.segmentButton.click()
        ui.segmentButton.click()
        widget.onSegment()  # a script calling the handler again: one job at a time
        assert widget.job.kind == "segment" and not ui.segmentButton.enabled and ui.cancelButton.enabled
        assert not ui.applyButton.enabled and not ui.exportButton.enabled
        move_slice(red, offset=20.0)
        move_slice(red, pan=(400.0, 0.0))
        pump(app, 0.25)  # the slice-following timer fires: it must neither compute here nor start a segmentation
        assert widget.currentSlice is None and ui.latentTableWidget.rowCount == 0
        assert widget.job is not None and widget.job.kind == "segment"
        seen: list = []
        wait_idle(widget, app, seen=seen)
        originals = segment_nodes(scene, "original")
        assert len(originals) == 1 and [c for c, _ in calls[segments_before:]].count("segment") == 1
        segmentation = originals[0]
        session = widget.logic.session
        assert ui.statusLabel.text == f"Created segmentation '{segmentation.GetName()}'."
        # The words went through Slicer's translator (slicer.i18n.tr, in the module file's context), placeholders unfilled.
        assert ("SegLens", "Created segmentation '{name}'.") in messages.translated
        assert np.array_equal(nodes.labels_from_segmentation(segmentation, t1, widget.logic.colourTableNode), session.labels)
        notes = ui.inputNotesLabel.text
        assert f"'{name}_flair' (t2f) was on another grid: resampled onto the grid of '{name}_t1' (t1n)" in notes
        assert "No T2 (t2w): set to zero" in notes
        # Progress: each phase counted on its own (never "slice 37 of 40" on a 24-slice volume), the bar within 0-100.
        phases = [phase for kind, phase, done, total, *_ in seen if kind == "segment"]
        assert "Loading PyTorch and the model" in phases and all(0 <= done <= total for kind, _, done, total, *_ in seen if total)
        assert all(0 <= bar <= 100 for *_, bar in seen)
        steps = [p for p in phases if p.startswith("Segmenting")]
        assert steps and all(p in SegLens.SEGMENT_PHASES for p in steps)
        assert any(text.startswith(SegLens.SEGMENT_PHASES[0]) and text.endswith("%") for *_, text, _ in seen)

    with subtests.test(msg="The latent table follows the Red view"):
        # -- The latent table follows the Red view (panned: only the slice counts), with the partner populations.
        expected = widget.worker.run(lambda: session.slice_of_point(nodes.slice_plane_point(red, t1)))
        assert widget.currentSlice == expected and ui.currentSliceLabel.text == str(expected)
        assert ui.latentTableWidget.rowCount == len(widget.rows) > 0
        shared = {int(r["id"]): r["shared_with"] for r in widget.rows}
        table = unwrap(ui.latentTableWidget)
        columns = SegLens.latenttable.COLUMNS
        texts = {int(table.item(r, 0).text()): table.item(r, columns.index("shared_with")).text() for r in range(table.rowCount())}
        # "Holds %": the held-out share as a whole percentage where the bundle's labels carry it, else empty
        holds = {int(r["id"]): SegLens.latenttable.cell_text(r, "holds") for r in widget.rows}
        assert all(table.item(r, columns.index("holds")).text() == holds[int(table.item(r, 0).text())] for r in range(table.rowCount()))
        # "Other seed": yes / no where the labels were compared with a seed replica, else empty
        found = {int(r["id"]): SegLens.latenttable.cell_text(r, "replicates") for r in widget.rows}
        assert all(table.item(r, columns.index("replicates")).text() == found[int(table.item(r, 0).text())] for r in range(table.rowCount()))
        assert all(texts[j] == ", ".join(shared[j]) for j in texts)
        assert {p for j in texts for p in shared[j]} == {"ssa", "pediatric"}
        tumour = np.argwhere(session.labels > 0)
        voxel = tumour[len(tumour) // 2]
        tumour_z = float((nodes.ijk_to_ras(t1) @ np.array([*voxel, 1.0]))[2])
        move_slice(red, offset=tumour_z)
        settle(widget, app)
        tumour_slice = widget.currentSlice
        assert tumour_slice == widget.worker.run(lambda: session.slice_of_point(nodes.slice_plane_point(red, t1)))
        first = widget.worker.run(session.latent_table, tumour_slice)
        top = max(first, key=lambda r: r["slice_activation"])
        assert int(table.item(0, 0).text()) == top["id"]  # sorted by activation in the slice shown
        # Leaving the volume is quiet: panned far away the slice is the same; scrolled out, the label says so.
        move_slice(red, pan=(5000.0, -5000.0))
        settle(widget, app)
        assert widget.currentSlice == tumour_slice
        move_slice(red, offset=tumour_z + 5000.0)
        settle(widget, app)
        assert widget.currentSlice is None and ui.currentSliceLabel.text == "(outside the volume)"
        move_slice(red, offset=tumour_z)
        settle(widget, app)
        assert widget.currentSlice == tumour_slice

    with subtests.test(msg="Select several rows (Ctrl+click)"):
        # -- Select several rows (Ctrl+click): a heatmap layer each; refreshing the table keeps all of them selected.
        ctrl_click_rows(ui.latentTableWidget, [0, 1, 2])
        wait_idle(widget, app)
        chosen = [int(table.item(r, 0).text()) for r in range(3)]
        assert sorted(widget.selectedLatents()) == sorted(chosen) and sorted(parameters.selectedLatents) == sorted(chosen)
        assert ui.selectedLatentsLabel.text == ", ".join(str(j) for j in widget.selectedLatents())  # what Apply steers
        heatmaps = [widget.logic.heatmapNodes[j] for j in widget.selectedLatents()]
        composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
        layers = [composite.GetForegroundVolumeID(), composite.GetNthLayerVolumeID(3), composite.GetNthLayerVolumeID(4)]
        assert layers == [h.GetID() for h in heatmaps]
        for j, node in zip(widget.selectedLatents(), heatmaps):
            assert np.array_equal(nodes.volume_array(node), widget.worker.run(session.heatmap, j))
        # More latents than layers: the first four are shown, and the panel says so; Ctrl+click again deselects.
        ctrl_click_rows(ui.latentTableWidget, [3, 4])
        wait_idle(widget, app)
        assert len(widget.selectedLatents()) == 5 and len(widget.logic.heatmapNodes) == SegLens.MAX_HEATMAPS
        assert ui.selectedLatentsLabel.text.endswith(" (heatmaps of the first 4 are shown)")
        ctrl_click_rows(ui.latentTableWidget, [3, 4])
        wait_idle(widget, app)
        assert sorted(widget.selectedLatents()) == sorted(chosen) and len(widget.logic.heatmapNodes) == 3
        # A category filter hides rows: hidden latents are no longer steered, and the label says which are.
        categories = [ui.categoryFilterComboBox.itemText(i) for i in range(ui.categoryFilterComboBox.count)]
        assert categories[0] == "all" and "edema" in categories
        ui.categoryFilterComboBox.currentIndex = categories.index("edema")
        visible = {int(r["id"]) for r in widget.rows}
        assert all(r["category"] == "edema" for r in widget.rows) and ui.latentTableWidget.rowCount == len(visible)
        assert widget.selectedLatents() == [j for j in chosen if j in visible] or sorted(widget.selectedLatents()) == sorted(j for j in chosen if j in visible)
        ui.categoryFilterComboBox.currentIndex = 0
        wait_idle(widget, app)
        ctrl_click_rows(ui.latentTableWidget, [r for r in range(ui.latentTableWidget.rowCount)
                                               if int(table.item(r, 0).text()) in set(chosen) - set(widget.selectedLatents())])
        wait_idle(widget, app)
        assert sorted(widget.selectedLatents()) == sorted(chosen) and parameters.category == "all"
        move_slice(red, offset=tumour_z + 2.0)  # another slice: the table is refreshed
        settle(widget, app)
        assert widget.currentSlice != tumour_slice
        assert sorted(widget.tableSelection()) == sorted(chosen) and sorted(widget.selectedLatents()) == sorted(chosen)
        move_slice(red, offset=tumour_z)
        settle(widget, app)

        heatmaps = [widget.logic.heatmapNodes[j] for j in widget.selectedLatents()]
        assert [composite.GetForegroundVolumeID(), composite.GetNthLayerVolumeID(3), composite.GetNthLayerVolumeID(4)] == [h.GetID() for h in heatmaps]

    with subtests.test(msg="Threshold, opacity and colours change the display nodes only"):
        # -- Threshold, opacity and colours change the display nodes only: nothing is computed, no voxel changes.
        before_calls, before_times = len(calls), [h.GetImageData().GetMTime() for h in heatmaps]
        ui.heatmapThresholdSliderWidget.value = 0.5
        ui.heatmapOpacitySliderWidget.value = 0.3
        rainbow = scene.GetNodeByID("vtkMRMLColorTableNodeRainbow")
        ui.heatmapColorSelector.setCurrentNode(rainbow)
        assert widget.job is None and len(calls) == before_calls
        assert [h.GetImageData().GetMTime() for h in heatmaps] == before_times
        for node in heatmaps:
            display = node.GetDisplayNode()
            assert display.GetLowerThreshold() == pytest.approx(0.5 * float(node.GetAttribute("SegLens.Maximum")))
            assert display.GetColorNodeID() == rainbow.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.3) and composite.GetNthLayerOpacity(4) == pytest.approx(0.3)
        assert parameters.threshold == 0.5 and parameters.opacity == 0.3 and parameters.colourNode is rainbow

    with subtests.test(msg="Move the alpha slider fast"):
        # -- Move the alpha slider fast: previews are coalesced, the stale one is dropped, the last value is shown.
        ui.regionComboBox.currentIndex = ui.regionComboBox.findText("current slice")
        wait_idle(widget, app)
        previews_before, dropped_before = [c for c, _ in calls].count("preview_slice"), widget.droppedResults
        values = [round(float(v), 2) for v in np.linspace(1.5, 4.0, 11)]
        for value in values:
            ui.alphaSliderWidget.value = value
        assert widget.job.kind == "preview" and not ui.applyButton.enabled  # one job at a time
        wait_idle(widget, app)
        assert [c for c, _ in calls].count("preview_slice") - previews_before == 2  # the first value's, then the last one's
        assert widget.droppedResults == dropped_before + 1 and parameters.alpha == 4.0
        edit = widget.logic.makeEdit(widget.selectedLatents(), "scale", 4.0, "current slice", tumour_slice)
        expected_changes = widget.worker.run(lambda: nodes.change_map(session.labels, session.preview(edit, tumour_slice)))
        preview = widget.logic.previewNode
        assert np.array_equal(nodes.volume_array(preview), expected_changes)
        assert preview.GetName() == "SegLens preview" and composite.GetLabelVolumeID() == preview.GetID()
        table_node = preview.GetDisplayNode().GetColorNode()
        assert [table_node.GetColorName(v) for v in (1, 2)] == ["added", "removed"]
        added, removed = [0.0] * 4, [0.0] * 4
        table_node.GetColor(1, added)
        table_node.GetColor(2, removed)
        assert added != removed
        assert ui.statusLabel.text.startswith(f"Preview of slice {tumour_slice}: ")
        # A preview can be cancelled too: its result is dropped and the old one goes (it no longer matches the slider).
        dropped = widget.droppedResults
        ui.alphaSliderWidget.value = 3.0
        assert widget.job.kind == "preview" and ui.cancelButton.enabled
        ui.cancelButton.click()
        wait_idle(widget, app)
        assert widget.droppedResults == dropped + 1 and widget.logic.previewNode is None and widget._previewShown is None
        assert ui.statusLabel.text == "Preview cancelled."
        ui.alphaSliderWidget.value = 4.0
        wait_idle(widget, app)
        assert np.array_equal(nodes.volume_array(widget.logic.previewNode), expected_changes)
        # Changing the region refreshes the preview; turning live preview off clears it.
        ui.regionComboBox.currentIndex = ui.regionComboBox.findText("whole volume")
        wait_idle(widget, app)
        assert widget._previewShown is not None and "whole volume" in widget._previewShown
        ui.livePreviewCheckBox.checked = False
        assert widget.logic.previewNode is None and parameters.livePreview is False
        # No preview: every view shows the user's label map again, as they had it.
        assert all(v.GetLabelVolumeID() == user_labels.GetID() and v.GetLabelOpacity() == pytest.approx(0.6) for v in views)
        ui.livePreviewCheckBox.checked = True
        wait_idle(widget, app)
        assert widget.logic.previewNode is not None
        assert all(v.GetLabelVolumeID() == widget.logic.previewNode.GetID() for v in views)

    with subtests.test(msg="Leaving the module (another one is shown) while a preview is computed"):
        # -- Leaving the module (another one is shown) while a preview is computed: the views get back the layers the
        #    user had, nothing keeps watching the views, the scene or the parameter node, and nothing new is computed.
        import vtk

        heatmap_ids = [composite.GetForegroundVolumeID(), composite.GetNthLayerVolumeID(3), composite.GetNthLayerVolumeID(4)]
        ui.alphaSliderWidget.value = 3.5
        assert widget.job is not None and widget.job.kind == "preview"
        dropped = widget.droppedResults
        widget.exit()
        assert widget.logic.previewNode is None and scene.GetFirstNodeByName("SegLens preview") is None
        for view in views:
            assert view.GetLabelVolumeID() == user_labels.GetID() and view.GetLabelOpacity() == pytest.approx(0.6)
            assert view.GetForegroundVolumeID() is None and view.GetNthLayerVolumeID(3) is None and view.GetNthLayerVolumeID(4) is None
            assert view.GetBackgroundVolumeID() == t1.GetID()  # (the views had no background: the input stays)
        assert not widget.hasObserver(red, vtk.vtkCommand.ModifiedEvent, widget.onSliceModified)
        assert not widget.hasObserver(scene, scene.NodeAddedEvent, widget.onNodeAdded)
        assert not widget.hasObserver(widget._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, widget.onParameterNodeModified)
        assert not widget._sliceTimer.isActive() and not widget._assignTimer.isActive()
        end = time.monotonic() + 120.0
        while widget.job is not None and time.monotonic() < end:  # the preview in flight ends while hidden
            app.processEvents()
            time.sleep(0.005)
        # Its result is dropped, not shown; it is put off until the module is shown again.
        assert widget.job is None and widget.droppedResults == dropped + 1 and widget.logic.previewNode is None
        assert widget.pending == {"preview"} and not widget._pollTimer.isActive()
        assert all(v.GetLabelVolumeID() == user_labels.GetID() for v in views)
        table_calls = [c for c, _ in calls].count("latent_table")
        move_slice(red, offset=tumour_z + 3.0)
        pump(app, 0.3)
        assert widget.job is None and not widget._sliceTimer.isActive() and [c for c, _ in calls].count("latent_table") == table_calls
        assert widget.currentSlice == tumour_slice  # the Red view is not followed while hidden
        # Back in the module: the Red view is followed again; heatmaps and the preview return to the views.
        widget.enter()
        assert widget.hasObserver(red, vtk.vtkCommand.ModifiedEvent, widget.onSliceModified)
        assert widget.hasObserver(widget._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, widget.onParameterNodeModified)
        wait_idle(widget, app)
        assert widget.currentSlice != tumour_slice and [c for c, _ in calls].count("latent_table") > table_calls
        assert [composite.GetForegroundVolumeID(), composite.GetNthLayerVolumeID(3), composite.GetNthLayerVolumeID(4)] == heatmap_ids
        assert all(v.GetLabelVolumeID() == widget.logic.previewNode.GetID() for v in views)
        move_slice(red, offset=tumour_z)
        ui.alphaSliderWidget.value = 4.0
        settle(widget, app)
        assert widget.currentSlice == tumour_slice and widget._previewShown is not None

    with subtests.test(msg="Apply, cancelled at once"):
        # -- Apply, cancelled at once: the session is left as it was.
        ui.applyButton.click()
        assert widget.job.kind == "apply" and ui.cancelButton.enabled
        ui.cancelButton.click()
        wait_idle(widget, app)
        assert session.edits == [] and segment_nodes(scene, "corrected") == []
        assert ui.statusLabel.text == "Steering cancelled; the previous segmentation and edits are kept."
        # Cancel that arrives after the job's last check (the worker has finished, the panel has not seen it yet): the
        # finished edit is undone, the session is as it was.
        dropped = widget.droppedResults
        ui.applyButton.click()
        widget.job.future.result(timeout=120)
        ui.cancelButton.click()
        wait_idle(widget, app)
        assert session.edits == [] and segment_nodes(scene, "corrected") == [] and widget.droppedResults == dropped + 1
        # Apply with a double click: one corrected node; the preview goes.
        ui.applyButton.click()
        ui.applyButton.click()
        seen = []
        wait_idle(widget, app, seen=seen)
        corrected = segment_nodes(scene, "corrected")
        assert len(corrected) == 1 and len(session.edits) == 1 and session.edits[0].latents == tuple(widget.selectedLatents())
        assert widget.logic.previewNode is None and scene.GetFirstNodeByName("SegLens preview") is None
        assert scene.GetNodeByID(segmentation.GetID()) is segmentation  # the original is kept
        assert any(kind == "apply" and phase.startswith("Steering") for kind, phase, *_ in seen)
        assert ui.undoButton.enabled and ui.statusLabel.text.startswith(f"Created '{corrected[0].GetName()}'")

    with subtests.test(msg="Undo"):
        # -- Undo: the corrected node goes, the session steps back.
        ui.undoButton.click()
        wait_idle(widget, app)
        assert session.edits == [] and scene.GetNodeByID(corrected[0].GetID()) is None
        assert widget.logic.currentSegmentationNode is segmentation and not ui.undoButton.enabled

    with subtests.test(msg="Fix by pointing"):
        # -- Fix by pointing: a + point at the interior of the largest missed tumour (as the simulated user clicks), Fix
        #    previews the fitted latent edit on the current slice, Apply fix makes one new node, Undo goes back.
        from SegLensLogic.data import read_case
        from SegLensLogic.experiments.clicks import next_click

        assert not ui.fixButton.enabled and not ui.applyFixButton.enabled and ui.placePlusButton.enabled
        classes = [ui.hintClassComboBox.itemText(i) for i in range(ui.hintClassComboBox.count)]
        assert classes == [SegLens.ANY_TUMOUR, "necrotic core", "edema", "enhancing tumour"]
        truth = read_case(case_dir, modalities=["t1n"]).label
        click = next_click(session.labels, truth, spacing=(1.0, 1.0, 1.0))
        ui.hintClassComboBox.currentIndex = classes.index(("necrotic core", "edema", "enhancing tumour")[click.cls - 1]) if click.sign == "+" else 0
        ui.placePlusButton.click() if click.sign == "+" else ui.placeMinusButton.click()
        assert ui.statusLabel.text.startswith("Click on")
        plus_node, minus_node = widget.logic.hintNode("+"), widget.logic.hintNode("-")
        point = (nodes.ijk_to_ras(t1) @ np.array([*click.voxel, 1.0]))[:3]
        (plus_node if click.sign == "+" else minus_node).AddControlPoint(*point)  # what a click in a slice view adds
        pump(app, 0.05)
        assert ui.hintCountLabel.text == ("1 +, 0 -" if click.sign == "+" else "0 +, 1 -") and ui.fixButton.enabled
        hints = widget.logic.readHints()
        assert len(hints) == 1 and hints[0].sign == click.sign and np.allclose(hints[0].point, point)
        # So small a model barely moves under its latents: without the penalty on the scales, the fit moves them anyway
        # (the Python console's way to change how Fix fits; the panel's plumbing is what is tested here).
        from SegLensLogic.steering.guided import GuidedOptions

        widget.logic.fixOptions = GuidedOptions(l2=0.0)
        ui.fixButton.click()
        wait_idle(widget, app)
        fix = widget.pendingFix
        assert fix is not None and fix.edits and ui.applyFixButton.enabled, (ui.fixLabel.text, widget.lastFix)
        assert ui.fixLabel.text.startswith(f"Fix: {len(fix.edits)} latent(s) scaled")
        expected_fix = widget.worker.run(lambda: nodes.change_map(session.labels, session.preview(list(fix.edits), widget.currentSlice)))
        assert np.array_equal(nodes.volume_array(widget.logic.previewNode), expected_fix)
        assert ui.statusLabel.text.startswith(f"Fix on slice {widget.currentSlice}: ")
        moved = plus_node if click.sign == "+" else minus_node
        moved.SetNthControlPointPosition(0, *(point + 1.0))  # moving the point drops the fix
        pump(app, 0.05)
        assert widget.pendingFix is None and not ui.applyFixButton.enabled and ui.fixLabel.text == "The points changed: press Fix again."
        moved.SetNthControlPointPosition(0, *point)
        ui.fixButton.click()
        wait_idle(widget, app)
        assert widget.pendingFix is not None and [e.latents for e in widget.pendingFix.edits] == [e.latents for e in fix.edits]
        ui.applyFixButton.click()
        ui.applyFixButton.click()
        wait_idle(widget, app)
        fixed = segment_nodes(scene, "fixed")
        assert len(fixed) == 1 and session.edits == list(fix.edits) and widget.pendingFix is None
        assert np.array_equal(nodes.labels_from_segmentation(fixed[0], t1, widget.logic.colourTableNode), session.labels)
        assert ui.statusLabel.text.startswith(f"Created '{fixed[0].GetName()}' with the fix")
        ui.undoButton.click()
        wait_idle(widget, app)
        assert session.edits == [] and scene.GetNodeByID(fixed[0].GetID()) is None
        # A point whose label names no class of the model: a clear message naming the point.
        moved.SetNthControlPointLabel(0, "+tumor core")
        ui.fixButton.click()
        assert widget.job is None and "point '+tumor core'" in messages.errors()[-1] and "unknown class" in messages.errors()[-1]
        ui.clearHintsButton.click()
        pump(app, 0.05)
        assert widget.logic.hintCount() == 0 and not ui.fixButton.enabled and ui.hintCountLabel.text == "none placed"

    with subtests.test(msg="An unexpected failure (a bug, not the user's input)"):
        # -- An unexpected failure (a bug, not the user's input): a message, with the traceback under the details.
        def broken(*args, **kwargs):
            raise RuntimeError("something inside broke")

        widget.logic.computeSuggestion = broken
        ui.suggestButton.click()
        wait_idle(widget, app)
        del widget.logic.computeSuggestion
        assert messages.errors()[-1] == "Suggested correction failed: RuntimeError: something inside broke"
        assert "Traceback" in messages.messages[-1][2]["detailedText"] and widget.suggestion is None

    with subtests.test(msg="Suggest a correction for the case's population"):
        # -- Suggest a correction for the case's population: cancellable (fault 1), then into the controls, previewed,
        #    then applied.
        populations = [ui.populationComboBox.itemText(i) for i in range(ui.populationComboBox.count)]
        assert populations == [SegLens.NO_POPULATION, "ssa"]
        ui.populationComboBox.currentIndex = 1
        ui.suggestButton.click()
        assert widget.job.kind == "suggest" and ui.cancelButton.enabled
        ui.cancelButton.click()
        wait_idle(widget, app)
        assert widget.suggestion is None and ui.statusLabel.text == "Suggested correction cancelled." and session.edits == []
        ui.suggestButton.click()
        wait_idle(widget, app)
        suggestion = widget.suggestion
        assert suggestion is not None and suggestion.population == "ssa" and suggestion.edits
        assert ui.suggestionLabel.text == suggestion.describe()
        edit = suggestion.edits[0]
        assert widget.selectedLatents() == list(edit.latents) and ui.alphaSliderWidget.value == pytest.approx(edit.alpha)
        assert ui.regionComboBox.currentText == "whole volume" and ui.modeComboBox.currentText == "scale"
        assert widget._previewShown is not None  # previewed on the current slice
        ui.applyButton.click()
        wait_idle(widget, app)
        assert session.edits == [edit]

    with subtests.test(msg="Export"):
        # -- Export: files written; the folder is remembered; nothing is overwritten.
        out = tmp_path / "exports"
        out.mkdir()
        ui.exportDirectoryButton.directory = str(out)
        ui.exportNameLineEdit.text = "case"
        ui.exportButton.click()
        assert widget.job.kind == "export"  # written on the worker
        wait_idle(widget, app)
        files = {suffix: out / f"case{suffix}" for suffix in (".seg.nrrd", ".nii.gz", ".recipe.json", ".ctbl")}
        assert all(path.is_file() for path in files.values()), ui.statusLabel.text
        assert qt.QSettings().value("SegLens/ExportFolder") == str(out) and parameters.exportName == "case"
        recipe = json.loads(files[".recipe.json"].read_text())
        assert [e["latents"] for e in recipe["edits"]] == [list(edit.latents)]
        stamps = {k: p.stat().st_mtime_ns for k, p in files.items()}
        ui.exportButton.click()
        assert "already exists; choose another name or tick 'Overwrite existing files'" in messages.errors()[-1] and "--overwrite" not in messages.errors()[-1]
        assert "detailedText" not in messages.messages[-1][2]
        assert {k: p.stat().st_mtime_ns for k, p in files.items()} == stamps
        ui.exportDirectoryButton.directory = str(tmp_path / "nowhere")
        ui.exportButton.click()
        assert messages.errors()[-1].startswith("Export failed: choose an existing export folder")

    with subtests.test(msg="Load recipe"):
        # -- Load recipe: back to the model's mask, then the exported recipe replays the correction bit for bit.
        ui.undoButton.click()
        wait_idle(widget, app)
        assert session.edits == [] and not ui.loadRecipeButton.enabled
        bad = tmp_path / "bad.recipe.json"
        bad.write_text('{"kind": "something else"}')
        ui.recipePathLineEdit.currentPath = str(bad)
        ui.loadRecipeButton.click()
        wait_idle(widget, app)
        assert messages.errors()[-1].startswith("Loading the recipe failed: ") and "detailedText" not in messages.messages[-1][2]
        assert session.edits == []
        ui.recipePathLineEdit.currentPath = str(files[".recipe.json"])
        assert parameters.recipePath == str(files[".recipe.json"])
        shown = widget.logic.currentSegmentationNode
        ui.loadRecipeButton.click()  # Load recipe is cancellable (fault 1): nothing changes
        assert widget.job.kind == "recipe" and ui.cancelButton.enabled
        ui.cancelButton.click()
        wait_idle(widget, app)
        assert session.edits == [] and widget.logic.currentSegmentationNode is shown and ui.statusLabel.text == "Loading the recipe cancelled."
        ui.loadRecipeButton.click()
        wait_idle(widget, app)
        assert session.edits == [edit]
        replayed = widget.logic.currentSegmentationNode
        assert replayed.GetAttribute("SegLens.Role") == "recipe" and "recipe" in replayed.GetName()
        import nibabel as nib

        assert np.array_equal(np.asanyarray(nib.load(str(files[".nii.gz"])).dataobj), session.labels)
        assert np.array_equal(nodes.labels_from_segmentation(replayed, t1, widget.logic.colourTableNode), session.labels)

    with subtests.test(msg="Segment again and Cancel"):
        # -- Segment again and Cancel: the session, its edits and its nodes stay as they were; scrolling afterwards
        #    starts no segmentation.
        before_nodes = {n.GetID() for n in segment_nodes(scene)}
        ui.segmentButton.click()
        ui.cancelButton.click()
        wait_idle(widget, app)
        assert widget.logic.session is session and session.edits == [edit] and widget.logic.currentSegmentationNode is replayed
        assert {n.GetID() for n in segment_nodes(scene)} == before_nodes
        assert ui.statusLabel.text == "Segmentation cancelled; the previous segmentation and edits are kept."
        segment_calls = [c for c, _ in calls].count("segment")
        move_slice(red, offset=tumour_z + 4.0)
        settle(widget, app)
        assert [c for c, _ in calls].count("segment") == segment_calls

    with subtests.test(msg="Fault 5"):
        # -- Fault 5: the inputs change after Segment. The session is bound to its input nodes: another node chosen, another
        #    bundle, or new voxels in an input make it stale; Apply, preview, Fix, Suggest, Load recipe, Undo and Export
        #    stop, the preview goes, and a one-line notice says to press Segment. The very same unmodified node chosen back
        #    makes it current again; modified voxels stay stale until Segment is pressed again.
        stale_buttons = ("applyButton", "exportButton", "suggestButton", "loadRecipeButton", "fixButton", "applyFixButton",
                         "undoButton", "placePlusButton")
        assert widget.logic.previewNode is not None and ui.applyButton.enabled and ui.exportButton.enabled
        assert not widget.logic.isStale(widget.inputNodes(), ui.bundlePathLineEdit.currentPath)
        segmented_notes = ui.inputNotesLabel.text
        scan = scene.GetFirstNodeByName("scan")  # the T1 of the same case loaded again: another node
        ui.t1nSelector.setCurrentNode(scan)
        assert widget.logic.isStale(widget.inputNodes(), ui.bundlePathLineEdit.currentPath)
        assert ui.inputNotesLabel.text == SegLens.STALE_NOTICE == ui.statusLabel.text
        assert SegLens.STALE_NOTICE == "The inputs changed after Segment: press Segment to work on them."
        assert widget.logic.previewNode is None and scene.GetFirstNodeByName("SegLens preview") is None
        assert not any(getattr(ui, b).enabled for b in stale_buttons) and ui.segmentButton.enabled
        # No preview of the old case any more, whatever the user moves; a script's call does nothing either.
        previews = [c for c, _ in calls].count("preview_slice")
        ui.alphaSliderWidget.value = 1.5
        move_slice(red, offset=tumour_z)
        settle(widget, app)
        assert [c for c, _ in calls].count("preview_slice") == previews and widget.logic.previewNode is None
        nodes_before, edits_before = {n.GetID() for n in segment_nodes(scene)}, list(session.edits)
        for handler in (widget.onApply, widget.onSuggest, widget.onLoadRecipe, widget.onFix, widget.onExport):
            handler()
            assert widget.job is None and ui.statusLabel.text == SegLens.STALE_NOTICE
        assert session.edits == edits_before and {n.GetID() for n in segment_nodes(scene)} == nodes_before
        # The very node it was made from, chosen back: current again, the preview and the notes come back.
        ui.t1nSelector.setCurrentNode(t1)
        settle(widget, app)
        assert not widget._stale and ui.applyButton.enabled and ui.exportButton.enabled
        assert ui.inputNotesLabel.text == segmented_notes and widget.logic.previewNode is not None
        # Another bundle folder: stale; the same folder again: current.
        ui.bundlePathLineEdit.currentPath = str(tmp_path)
        assert widget._stale and not ui.applyButton.enabled and widget.logic.previewNode is None
        ui.bundlePathLineEdit.currentPath = str(reference_bundle)
        settle(widget, app)
        assert not widget._stale and ui.applyButton.enabled
        # New voxels in an input (edited in place, as arrayFromVolume users do; or replaced): stale, and choosing the
        # node again does not help.
        voxels = slicer.util.arrayFromVolume(t1c)
        voxels[voxels.shape[0] // 2] = 0
        slicer.util.arrayFromVolumeModified(t1c)
        assert widget._stale and ui.inputNotesLabel.text == SegLens.STALE_NOTICE and not ui.exportButton.enabled
        ui.t1cSelector.setCurrentNode(scan)
        ui.t1cSelector.setCurrentNode(t1c)
        settle(widget, app)
        assert widget._stale and widget.logic.previewNode is None and not ui.applyButton.enabled
        # Segment again: a session on the inputs as they are now; the notice goes and the panel works on it.
        ui.segmentButton.click()
        wait_idle(widget, app)
        assert widget.logic.session is not session and not widget._stale and ui.applyButton.enabled and ui.exportButton.enabled
        assert ui.inputNotesLabel.text != SegLens.STALE_NOTICE and ui.statusLabel.text != SegLens.STALE_NOTICE
        assert widget.logic.sessionInputs["t1c"] == (t1c.GetID(), t1c.GetImageData().GetMTime())
        session = widget.logic.session
        nodes.set_volume_array(t1c, nodes.volume_array(t1c) + 1.0)  # voxels replaced through Slicer's helper
        assert widget._stale and not ui.applyButton.enabled
        ui.segmentButton.click()
        wait_idle(widget, app)
        assert widget.logic.session is not session and not widget._stale and ui.applyButton.enabled
        session = widget.logic.session

    with subtests.test(msg="The output segmentation selector"):
        # -- The output segmentation selector: a node the user chose is filled only after they confirm replacing its
        #    segments; declined, nothing runs and the node keeps what it had. ("Create new" is the default: every Segment
        #    above made a new node.)
        mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
        mine.GetSegmentation().AddEmptySegment("mine", "my own segment")
        ui.outputSegmentationSelector.setCurrentNode(mine)
        asked = len(messages.questions)
        messages.answer = False
        ui.segmentButton.click()
        assert widget.job is None and len(messages.questions) == asked + 1 and "replace the 1 segment(s) of 'My segmentation'" in messages.questions[-1]
        assert ui.statusLabel.text == "Nothing was segmented: 'My segmentation' is kept as it is."
        assert mine.GetSegmentation().GetNumberOfSegments() == 1 and widget.logic.session is session
        messages.answer = True
        before_nodes = {n.GetID() for n in segment_nodes(scene)}
        ui.segmentButton.click()
        wait_idle(widget, app)
        assert {n.GetID() for n in segment_nodes(scene)} == before_nodes  # written into the chosen node, none added
        assert widget.logic.currentSegmentationNode is mine and mine.GetSegmentation().GetSegment("mine") is None
        assert np.array_equal(nodes.labels_from_segmentation(mine, t1, widget.logic.colourTableNode), widget.logic.session.labels)
        session = widget.logic.session  # a new session: what follows works on it
        ui.outputSegmentationSelector.setCurrentNode(None)

    with subtests.test(msg="Save the scene, then close it while a job runs, then load it back"):
        # -- Save the scene, then close it while a job runs, then load it back: the parameter node restores the panel.
        ui.modeComboBox.currentIndex = ui.modeComboBox.findText("add")
        ui.regionComboBox.currentIndex = ui.regionComboBox.findText("slice range")
        ui.alphaSliderWidget.value = 2.5
        wait_idle(widget, app)
        saved_latents = widget.selectedLatents()
        scene.SetSaveToXMLString(1)
        scene.Commit()
        xml = scene.GetSceneXMLString()
        ui.segmentButton.click()
        assert widget.job is not None
        dropped = widget.droppedResults
        scene.Clear(0)
        wait_idle(widget, app)
        assert widget.droppedResults == dropped + 1 and widget.logic.session is None and segment_nodes(scene) == []
        # Fault 3: the status line ends in the real state, never on "Cancelling: ..." after the job has ended.
        assert ui.statusLabel.text == "Segmentation stopped: the scene was closed.", ui.statusLabel.text
        assert ui.latentTableWidget.rowCount == 0 and not ui.applyButton.enabled and ui.segmentButton.enabled
        assert ui.alphaSliderWidget.value == 1.0 and ui.modeComboBox.currentText == "scale"
        assert ui.bundlePathLineEdit.currentPath == str(reference_bundle)  # preselected again
        scene.SetLoadFromXMLString(1)
        scene.SetSceneXMLString(xml)
        scene.Import()
        pump(app, 0.05)
        parameters = widget._parameterNode
        assert ui.modeComboBox.currentText == "add" and ui.regionComboBox.currentText == "slice range"
        assert ui.alphaSliderWidget.value == 2.5 and parameters.selectedLatents == saved_latents
        assert ui.t1nSelector.currentNode().GetName() == f"{name}_t1" and ui.t2wSelector.currentNode() is None
        assert ui.t2fSelector.currentNode().GetName() == f"{name}_flair" and parameters.population == "ssa"
        assert ui.exportNameLineEdit.text == "case" and ui.recipePathLineEdit.currentPath == str(files[".recipe.json"])
        assert not ui.applyButton.enabled
        # The volumes get their voxels back (a saved .mrb holds them): Segment works on the restored inputs.
        for node, suffix in ((ui.t1nSelector.currentNode(), "t1"), (ui.t1cSelector.currentNode(), "t1ce")):
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(case_dir / f"{name}_{suffix}.nii.gz"))
            assert storage.ReadData(node)
        nodes.set_volume_array(ui.t2fSelector.currentNode(), flair_voxels)


# -- the README's screenshot ------------------------------------------------------------------------------------------------
SCREENSHOT = REPO / "docs" / "images" / "slicer-panel.png"


def test_panel_screenshot_script_renders_a_real_case(reference_resources, brats2018_dir, tmp_path, fresh_module_imports):
    """``panel_screenshot.py`` (what made ``docs/images/slicer-panel.png``) renders the real .ui with a real case
    segmented in it, a latent selected and its preview on: a PNG of the panel alone, with content. Here with the tiny
    model's bundle (the script's default is the shipped one)."""
    from PySide6.QtGui import QImage

    from pipelines import REAL_TEST_CASES
    from SegLensLogic.resources import REFERENCE_BUNDLE_NAME

    sys.path.insert(0, str(STAND_IN))
    try:
        screenshot = importlib.import_module("panel_screenshot")
    finally:
        sys.path.remove(str(STAND_IN))
    out = tmp_path / "panel.png"
    result = screenshot.render(out, brats2018_dir / REAL_TEST_CASES[0], reference_resources / REFERENCE_BUNDLE_NAME)
    assert result["latents"] and result["slice"] is not None, result
    assert result["status"].startswith(f"Preview of slice {result['slice']}: "), result["status"]
    assert result["segmentation"].startswith(f"{REAL_TEST_CASES[0]}_t1 SegLens")
    image = QImage(str(out))
    assert not image.isNull() and (image.width(), image.height()) == (result["width"], result["height"])
    assert image.width() >= screenshot.DEFAULT_WIDTH and image.height() > image.width()
    pixels = [image.pixel(x, y) for x in range(0, image.width(), 3) for y in range(0, image.height(), 3)]
    commonest = max(set(pixels), key=pixels.count)
    assert len(set(pixels)) > 64 and pixels.count(commonest) < 0.9 * len(pixels), "the panel rendered blank"
    assert result["bytes"] < 300_000
    # The picture the README shows: made by the script, small enough for the repository.
    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size < 300_000
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

