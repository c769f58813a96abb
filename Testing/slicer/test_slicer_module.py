"""The Slicer module (SegLensExtension/) in CI, without a Slicer application.

What covers what:

- Real MRML: ``SegLens.py``'s Logic and ``SegLensLib`` run against Slicer's own MRML, segmentation-core and storage
  classes from the ``slicer-core`` wheel (no Qt, no ``slicer.app``). A real BraTS case is read by Slicer's volume
  reader into scalar volume nodes; segmentation, heatmap, preview, Apply, Undo and Export go through the Logic.
  The wheel has no ``slicer.ScriptedLoadableModule`` (it imports qt), so a bare stand-in with the four base
  classes is registered before ``SegLens.py`` is imported; everything else is the real library.
- Real Qt: ``Resources/UI/SegLens.ui`` is loaded by PySide6's ``QUiLoader`` (offscreen). Slicer/CTK classes are
  unknown to PySide6, so they are registered as placeholders deriving from the Qt class they extend; their names
  and classes are checked from the .ui XML, and the members the module uses on them against the Qt base class or
  the Slicer/CTK headers' member lists below. Standard Qt widgets are checked against the real PySide6 classes.
- Real API names: every ``slicer.*`` name used by the module and ``SegLensLib`` (found with ``ast``) must resolve in
  the installed ``slicer-core`` or be listed in ``../shared/docs/slicer/slicer_api.json``.

The panel itself (``SegLensWidget``) is driven like a user in ``test_slicer_widget.py``.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install -e '.[test]') is needed for the Slicer module tests")

REPO = Path(__file__).resolve().parents[2]
EXTENSION = REPO / "SegLensExtension"
MODULE_FILE = EXTENSION / "SegLens.py"
UI_FILE = EXTENSION / "Resources" / "UI" / "SegLens.ui"
API_JSON = REPO.parent / "shared" / "docs" / "slicer" / "slicer_api.json"
SOURCES = [MODULE_FILE, *sorted((EXTENSION / "SegLensLib").glob("*.py"))]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- importing the module the way Slicer does --------------------------------------------------------------------------
def _install_scripted_module_stand_in() -> None:
    """Register ``slicer.ScriptedLoadableModule`` when the real one (which needs qt) is absent."""
    try:
        importlib.import_module("slicer.ScriptedLoadableModule")
        return
    except ImportError:
        pass
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    sys.modules[module.__name__] = module
    slicer.ScriptedLoadableModule = module


@pytest.fixture(scope="module")
def SegLens():
    """``SegLens.py`` imported as Slicer imports it (module folder on ``sys.path``), with no qt available."""
    _install_scripted_module_stand_in()
    if str(EXTENSION) not in sys.path:
        sys.path.insert(0, str(EXTENSION))
    module = importlib.import_module("SegLens")
    assert "qt" not in sys.modules and "ctk" not in sys.modules
    return module


@pytest.fixture
def scene():
    """A fresh MRML scene as ``slicer.mrmlScene``, with the default colour nodes and two slice views' composite nodes."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    colour_logic = slicer.vtkMRMLColorLogic()
    colour_logic.SetMRMLScene(scene)
    for name in ("Red", "Yellow"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    yield scene
    colour_logic.SetMRMLScene(None)


def load_volume(scene, path: Path, name: str):
    """Read an image file into a scalar volume node with Slicer's own volume reader."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node


# -- case_from_arrays --------------------------------------------------------------------------------------------------
def test_case_from_arrays_matches_reading_the_files(brats2018_case):
    from SegLensLogic.data import case_from_arrays, read_case

    from_files = read_case(brats2018_case)
    case = case_from_arrays({("flair" if m == "t2f" else m): a for m, a in from_files.images.items()}, from_files.affine,
                            "in-memory", label=from_files.label)
    assert case.case_id == "in-memory" and case.case.modalities == from_files.case.modalities
    assert case.shape == from_files.shape and np.array_equal(case.affine, from_files.affine)
    for modality in from_files.images:
        assert case.images[modality].dtype == np.float32
        assert np.array_equal(case.images[modality], from_files.images[modality])
    assert np.array_equal(case.label, from_files.label)


def test_case_from_arrays_names_the_problem():
    from SegLensLogic.data import case_from_arrays
    from SegLensLogic.errors import InputFileError

    good = np.zeros((4, 5, 6), np.float32)
    cases = [
        ({"t1": good, "t2": np.zeros((4, 5, 7))}, np.eye(4), "t2w: has shape (4, 5, 7)"),
        ({"t1": np.zeros((4, 5))}, np.eye(4), "2D array"),
        ({"t1": np.full((4, 5, 6), np.nan)}, np.eye(4), "NaN or Inf"),
        ({"pd": good}, np.eye(4), "unknown modality 'pd'"),
        ({"t1": good}, np.zeros((4, 4)), "invertible 4x4"),
        ({}, np.eye(4), "no image given"),
    ]
    for images, affine, message in cases:
        with pytest.raises(InputFileError, match=re.escape(message)) as info:
            case_from_arrays(images, affine, "node")
        assert str(info.value).startswith("node")


# -- the workflow on real MRML ---------------------------------------------------------------------------------------
def needs_steering_and_bundles() -> None:
    """Skip (with the reason) until the steering session and bundles are in this checkout."""
    pytest.importorskip("SegLensLogic.steering", reason="SegLensLogic.steering (SteeringSession) is not in this checkout")
    pytest.importorskip("SegLensLogic.bundle", reason="SegLensLogic.bundle is not in this checkout")


@pytest.fixture(scope="module")
def bundle_dir(real_pipeline, tmp_path_factory):
    needs_steering_and_bundles()
    from SegLensLogic.bundle import build_bundle

    return build_bundle(real_pipeline.model_dir, real_pipeline.sae_dir, tmp_path_factory.mktemp("bundle") / "adult", name="adult").root


def test_workflow_on_real_mrml(SegLens, scene, real_pipeline, bundle_dir, brats2018_dir, tmp_path):
    from SegLensLib import nodes
    from SegLensLogic.bundle import load_bundle
    from SegLensLogic.data import read_case
    from SegLensLogic.errors import OutputExistsError
    from SegLensLogic.segmentation.inference import predict_volume
    from SegLensLogic.steering import load_recipe

    from pipelines import REAL_TEST_CASES

    case_dir = brats2018_dir / REAL_TEST_CASES[0]  # held out from training
    name = case_dir.name
    files = {"t1n": f"{name}_t1.nii.gz", "t1c": f"{name}_t1ce.nii.gz", "t2w": f"{name}_t2.nii.gz", "t2f": f"{name}_flair.nii.gz"}
    volumes = {m: load_volume(scene, case_dir / f, f"{name}_{m}") for m, f in files.items()}
    originals = {m: nodes.volume_array(v) for m, v in volumes.items()}
    user_nodes = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    # Slicer's reader and SegLens's reader agree on voxels and geometry, so the arrays path is the file path.
    from_files = read_case(case_dir)
    assert np.allclose(nodes.ijk_to_ras(volumes["t1n"]), from_files.affine, atol=1e-4)
    assert np.array_equal(originals["t1n"], from_files.images["t1n"])

    logic = SegLens.SegLensLogic()
    case = logic.caseFromVolumes(volumes)
    logic.openSession(case, bundlePath=bundle_dir)
    bundle = load_bundle(bundle_dir)

    # Segment: a new node, one named, coloured segment per class, labels on the input grid.
    segmentation = logic.segment()
    labels = logic.session.labels
    expected = predict_volume(real_pipeline.model, from_files).labels
    assert np.array_equal(labels, expected)
    assert (labels > 0).sum() > 0
    summary = nodes.segment_summary(segmentation)
    assert [s["name"] for s in summary] == bundle.class_names[1:] == ["necrotic core", "edema", "enhancing tumour"]
    assert [s["id"] for s in summary] == [nodes.segment_id(v) for v in range(1, len(bundle.class_names))]
    for s, rgb in zip(summary, bundle.colours[1:]):
        assert np.allclose(s["color"], np.array(rgb) / 255.0, atol=1e-6)
    assert np.array_equal(nodes.labels_from_segmentation(segmentation, volumes["t1n"], logic.colourTableNode), labels)
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volumes["t1n"]
    geometry = segmentation.GetBinaryLabelmapInternalRepresentation(nodes.segment_id(2))
    import vtk

    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), nodes.ijk_to_ras(volumes["t1n"]), atol=1e-4)

    # Latent table and slice following: the Red view's centre at an input voxel maps to that voxel's RAS slice.
    tumour = np.argwhere(labels > 0)[0]
    ras = (from_files.affine @ np.array([*tumour, 1.0]))[:3]
    k = logic.sliceIndexOfPoint(ras)
    assert k == logic.session.slice_of_point(ras) and 0 <= k < logic.numberOfSlices() == logic.session.num_slices
    rows = logic.latentTable(k)
    assert rows and [r["slice_activation"] for r in rows] == sorted((r["slice_activation"] for r in rows), reverse=True)
    assert {"id", "label", "category", "status", "slice_activation", "volume_activation"} <= set(rows[0])
    latent = int(rows[0]["id"])
    assert rows[0]["slice_activation"] > 0

    # Heatmap layer: input geometry, the session's values, in the slice views' foreground with a threshold.
    heat_node = logic.showHeatmap(latent, threshold=0.2, opacity=0.4)
    assert nodes.same_geometry(heat_node, volumes["t1n"])
    heat = logic.session.heatmap(latent)
    assert np.array_equal(nodes.volume_array(heat_node), heat.astype(np.float32))
    display = heat_node.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.2 * heat.max(), rel=1e-6)
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert heat_node.GetName().startswith(f"SegLens latent {latent}")
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == heat_node.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.4)
    assert logic.showHeatmaps([latent]) == [heat_node]

    # Live preview of the current slice: what changes (1 added, 2 removed, 3 relabelled), only in slice k.
    edit = logic.makeEdit([latent], "zero", region="current slice", sliceIndex=k)
    preview_node = logic.previewEdit(edit, k)
    preview = logic.session.preview(edit, k)
    assert np.array_equal(nodes.volume_array(preview_node), nodes.change_map(labels, preview))
    assert preview_node.GetDisplayNode().GetColorNode().GetColorName(2) == "removed"
    prepared = logic.session.prepared
    changed = np.argwhere(prepared.orientation.apply(preview) != prepared.orientation.apply(labels))
    assert set(changed[:, 2].tolist()) <= {k}
    logic.clearPreview()
    assert logic.previewNode is None and scene.GetNodeByID(preview_node.GetID()) is None

    # Apply: a new corrected node; the original node and labels stay as they were.
    strong = logic.makeEdit([r["id"] for r in rows[:3]], "scale", alpha=4.0, region="whole volume")
    corrected = logic.applyEdit(strong)
    assert corrected is not segmentation and scene.GetNodeByID(segmentation.GetID()) is segmentation
    assert np.array_equal(nodes.labels_from_segmentation(segmentation, volumes["t1n"], logic.colourTableNode), labels)
    new_labels = logic.session.labels
    assert not np.array_equal(new_labels, labels)
    assert np.array_equal(nodes.labels_from_segmentation(corrected, volumes["t1n"], logic.colourTableNode), new_labels)
    assert logic.currentSegmentationNode is corrected and len(logic.session.edits) == 1

    # Export: .seg.nrrd and .nii.gz read back equal, with stable label values, names and colours; recipe JSON.
    paths = logic.export(tmp_path / "out" / "case_seglens")
    back = nodes.read_segmentation(scene, paths["seg_nrrd"])
    assert [s["name"] for s in nodes.segment_summary(back)] == bundle.class_names[1:]
    assert np.array_equal(nodes.labels_from_segmentation(back, volumes["t1n"], logic.colourTableNode), new_labels)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(paths["seg_nrrd"]))
    reader.ReadImageInformation()
    header = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    for index, (name, rgb) in enumerate(zip(bundle.class_names[1:], bundle.colours[1:])):
        assert header[f"Segment{index}_Name"] == name and header[f"Segment{index}_LabelValue"] == str(index + 1)
        assert np.allclose([float(v) for v in header[f"Segment{index}_Color"].split()], np.array(rgb) / 255, atol=1e-5)
    import nibabel as nib

    nifti = nib.load(str(paths["nifti"]))
    assert np.array_equal(np.asanyarray(nifti.dataobj), new_labels) and np.allclose(nifti.affine, from_files.affine, atol=1e-4)
    assert len(load_recipe(paths["recipe"]).edits) == 1
    assert paths["colour_table"].read_text().splitlines()[3].startswith("1 necrotic_core 255 0 0 255")
    with pytest.raises(OutputExistsError):
        logic.export(tmp_path / "out" / "case_seglens")

    # Undo: the corrected node goes, the original is current again.
    assert logic.undo() is segmentation and scene.GetNodeByID(corrected.GetID()) is None
    assert np.array_equal(logic.session.labels, labels) and not logic.session.edits

    # Load recipe: the exported recipe replays onto the case from the model's own mask, into a new node.
    replayed = logic.loadRecipe(paths["recipe"])
    assert replayed.GetAttribute("SegLens.Role") == "recipe" and len(logic.session.edits) == 1
    assert np.array_equal(logic.session.labels, new_labels) and logic.segmentationNodes == [segmentation, replayed]
    assert logic.undo() is segmentation and not logic.session.edits

    # The user's nodes were never modified or removed.
    assert user_nodes <= {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    for modality, volume in volumes.items():
        assert np.array_equal(nodes.volume_array(volume), originals[modality])


def test_module_self_test_runs_without_the_application(SegLens, scene):
    """``SegLensTest`` (what users run from Reload and Test) on a phantom and a tiny untrained bundle."""
    needs_steering_and_bundles()
    SegLens.SegLensTest().runTest()


def test_the_worker_reads_no_mrml(SegLens, scene):
    """Fault 9: what the Segment job runs on the worker (``caseFromArrays``) uses the arrays and names read on the
    main thread, never the nodes: here nodes that raise on any use, and grids that differ (the resampling note)."""
    from SegLensLib import nodes

    a = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a")
    nodes.set_volume_array(a, np.random.default_rng(0).normal(size=(20, 20, 16)).astype(np.float32) + 5.0)
    b = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "b")
    b.SetSpacing(2.0, 2.0, 2.0)
    nodes.set_volume_array(b, np.random.default_rng(1).normal(size=(10, 10, 8)).astype(np.float32) + 5.0)
    logic = SegLens.SegLensLogic()
    volumes = logic.readVolumes({"t1": a, "flair": b})

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the worker used the node ({name})")

    detached = {m: (array, affine, Untouchable(), name) for m, (array, affine, _node, name) in volumes.items()}
    case, notes = logic.caseFromArrays(detached)
    assert case.case_id == "a" and case.images["t2f"].shape == (20, 20, 16)
    assert notes == ["'b' (t2f) was on another grid: resampled onto the grid of 'a' (t1n) by linear interpolation."]


def test_the_self_test_installs_nothing_unattended(SegLens, scene, monkeypatch):
    """Fault 9: the self-test asks before installing, as the panel does; with no one to answer (no application, or
    Slicer run with --testing) it installs nothing and says what is missing."""
    from SegLensLib import dependencies as deps

    monkeypatch.setattr(deps, "missing_requirements", lambda requirements: ["seglens-not-a-real-package>=1"])
    with pytest.raises(deps.DependencyError, match="seglens-not-a-real-package>=1; installation was cancelled"):
        SegLens.SegLensTest().test_SegLensWorkflow()  # (answering yes would have run pip and failed otherwise)


def test_volumes_on_different_grids_are_resampled_with_a_note(SegLens, scene):
    from SegLensLib import nodes
    from SegLensLogic.errors import SegLensError

    i, j, k = np.meshgrid(np.arange(18), np.arange(16), np.arange(16), indexing="ij")  # b keeps >= 8 voxels an axis
    ramp = (i + 2.0 * j + 3.0 * k).astype(np.float32)  # linear: linear interpolation reproduces it exactly
    a = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a")
    a.SetOrigin(-5.0, 3.0, 7.0)
    nodes.set_volume_array(a, ramp)
    b = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "b")  # every second voxel of a: a 2 mm grid
    b.SetOrigin(-5.0, 3.0, 7.0)
    b.SetSpacing(2.0, 2.0, 2.0)
    nodes.set_volume_array(b, np.ascontiguousarray(ramp[::2, ::2, ::2]))
    logic = SegLens.SegLensLogic()
    case = logic.caseFromVolumes({"t1": a, "flair": b})
    assert logic.inputNotes == ["'b' (t2f) was on another grid: resampled onto the grid of 'a' (t1n) by linear interpolation."]
    resampled = case.images["t2f"]
    assert resampled.shape == ramp.shape and np.allclose(resampled[:17, :15, :15], ramp[:17, :15, :15], atol=1e-4)
    assert np.array_equal(case.images["t1n"], ramp) and np.allclose(case.affine, nodes.ijk_to_ras(a))
    assert resampled[17, 0, 0] == 0.0  # outside b's voxels
    with pytest.raises(SegLensError, match="select at least one input volume"):
        logic.caseFromVolumes({"t1": None})
    with pytest.raises(SegLensError, match="unknown modality 'pd'"):
        logic.caseFromVolumes({"pd": a})


def test_worker_runs_off_the_main_thread_and_cancels(real_pipeline):
    import threading

    needs_steering_and_bundles()

    from SegLensLib.worker import Progress, Worker
    from SegLensLogic.data.cases import read_case
    from SegLensLogic.segmentation.inference import PredictionCancelled
    from SegLensLogic.steering import SteeringSession

    from helpers import write_synthetic_case

    case = read_case(write_synthetic_case(Path(os.environ.get("TMPDIR", "/tmp")) / f"seglens-worker-{os.getpid()}", shape=(48, 40, 24)))
    worker = Worker()
    try:
        # One daemon thread: closing Slicer mid-job does not wait for the job.
        assert worker.thread.daemon and worker.run(threading.get_ident) == worker.thread.ident != threading.get_ident()
        session = SteeringSession(real_pipeline.model, real_pipeline.sae, case)
        progress = Progress()
        progress.cancel()
        with pytest.raises(PredictionCancelled):
            worker.run(session.segment, progress.callback)
        assert session.forward is None  # cancelled: nothing was kept
        progress = Progress()
        labels = worker.run(session.segment, progress.callback)
        assert labels.shape == case.shape and progress.total > 0 and 0 < progress.done <= progress.total
    finally:
        worker.shutdown()
    worker.thread.join(5)
    assert not worker.thread.is_alive()


def test_segmentation_progress_counts_each_phase_on_its_own(SegLens, real_pipeline):
    """Encoding, then decoding: each phase from 0 to its own total (the status never mixes their counts)."""
    needs_steering_and_bundles()
    from SegLensLogic.data.cases import read_case
    from SegLensLogic.steering import LatentEdit, SteeringSession

    from helpers import write_synthetic_case

    case = read_case(write_synthetic_case(Path(os.environ.get("TMPDIR", "/tmp")) / f"seglens-phases-{os.getpid()}", shape=(48, 40, 24)))
    session = SteeringSession(real_pipeline.model, real_pipeline.sae, case, batch_size=4)
    reports = []
    logic = SegLens.SegLensLogic()
    logic.segmentSession(session, lambda done, total, phase: reports.append((phase, done, total)) or True)
    phases = [phase for phase, _, _ in reports]
    assert phases == sorted(phases, key=SegLens.SEGMENT_PHASES.index) and set(phases) == set(SegLens.SEGMENT_PHASES)
    for phase in SegLens.SEGMENT_PHASES:
        steps = [(done, total) for p, done, total in reports if p == phase]
        assert all(0 < done <= total for done, total in steps) and steps[-1][0] == steps[-1][1]
    slices = len(session.forward.slices)
    assert [total for p, _, total in reports if p == SegLens.SEGMENT_PHASES[0]][0] == slices  # slices encoded
    # Apply reports the batches it decodes, in its own phase; cancelled, the session is as it was.
    logic.useSession(session)
    edit = LatentEdit((int(session.top_latents(1)[0][0]),), "scale", 3.0)
    steps = []
    logic.computeApply(edit, lambda done, total, phase: steps.append((phase, done, total)) or True)
    assert steps and all(p.startswith("Steering: re-segmenting") and 0 < d <= t for p, d, t in steps) and len(session.edits) == 1
    before = session.labels
    with pytest.raises(Exception, match="cancelled"):
        logic.computeApply([LatentEdit((1,), "scale", 2.0), edit], lambda done, total, phase: False)
    assert len(session.edits) == 1 and np.array_equal(session.labels, before)


# -- dependencies ------------------------------------------------------------------------------------------------------
# What the panel's code path imports when it runs: the Logic's imports of SegLensLogic, and the modules that session
# methods import when the panel calls them (suggestions import the plausibility criterion, for example).
PANEL_ENTRY_MODULES = ("SegLensLogic.steering", "SegLensLogic.steering.session", "SegLensLogic.steering.suggestions",
                       "SegLensLogic.steering.encoded", "SegLensLogic.steering.plausibility", "SegLensLogic.bundle",
                       "SegLensLogic.resources", "SegLensLogic.data.cases", "SegLensLogic.segmentation.inference", "SegLensLogic.errors",
                       "SegLensLogic.interpretation", "SegLensLogic.alignment")  # fmt: skip


def module_level_imports(entries) -> set[str]:
    """Third-party packages imported at module level by ``entries`` and every SegLensLogic module they import at
    module level (imports inside functions run only when called, and the panel's calls are the entries). A lazy
    package's module ``__getattr__`` (PEP 562) counts as module level: importing a name from the package runs it."""
    import importlib.util

    seen, found, todo = set(), set(), list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = importlib.util.find_spec(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        tree = ast.parse(Path(spec.origin).read_text())
        package = name if spec.origin.endswith("__init__.py") else name.rsplit(".", 1)[0]
        statements = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        statements += [n for t in tree.body if isinstance(t, (ast.If, ast.Try)) for n in ast.walk(t) if isinstance(n, (ast.Import, ast.ImportFrom))]
        statements += [n for t in tree.body if isinstance(t, ast.FunctionDef) and t.name == "__getattr__"
                       for n in ast.walk(t) if isinstance(n, (ast.Import, ast.ImportFrom))]  # fmt: skip
        # A package built with SegLensLogic.lazy.lazy_exports imports its _EXPORTS table's submodules on access.
        for assign in (t for t in tree.body if isinstance(t, ast.Assign) and isinstance(t.value, ast.Dict)):
            if any(getattr(target, "id", None) == "_EXPORTS" for target in assign.targets):
                todo += [f"{package}.{value.value}" for value in assign.value.values]
        for node in statements:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                todo.append(target)
                todo += [f"{target}.{a.name}" for a in node.names if importlib.util.find_spec(f"{target}.{a.name}") is not None] \
                    if importlib.util.find_spec(target).submodule_search_locations else []
                continue
            for target in ([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]):
                if target.split(".")[0] == "SegLensLogic":
                    todo.append(target)
                elif target.split(".")[0] not in sys.stdlib_module_names and target != "__future__":
                    found.add(target.split(".")[0])
    return found


def test_requirements_file_is_what_the_panel_imports(SegLens):  # SegLens: SegLensLib on the path, as Slicer puts it
    """The panel installs only what its code path imports (not what training, reports or the demo need), with the
    versions of pyproject.toml; torch comes from SlicerPyTorch."""
    import tomllib

    from SegLensLib.dependencies import _requirement_class, read_requirements

    Requirement = _requirement_class()
    project = {Requirement(r).name.lower(): r for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    panel = read_requirements()
    assert set(panel) <= set(project.values())
    imported = {"SimpleITK": "simpleitk", "PIL": "pillow"}
    used = {imported.get(m, m).lower() for m in module_level_imports(PANEL_ENTRY_MODULES)} & set(project)
    # Imported inside the functions the panel calls: weights (model, SAE) are read with safetensors.
    used |= {"safetensors"}
    assert {Requirement(r).name.lower() for r in panel} | {"torch"} == used | {"torch"}
    assert not {"matplotlib", "nilearn", "simpleitk"} & used


def test_dependency_install_asks_first_and_lets_pip_decide(SegLens):
    import subprocess

    from SegLensLib import dependencies as deps

    asked, installed = [], []
    confirm_yes = lambda text: asked.append(text) or True  # noqa: E731
    # Everything is installed here: nothing is asked, torch comes from the environment, the device is named.
    assert deps.ensure_requirements(confirm_yes, installed.append) == ([], [])
    assert deps.ensure_torch(confirm_yes) is False  # installed: not installed again, and not imported here
    status = deps.ensure_dependencies(confirm_yes, installed.append)
    assert asked == [] and installed == [] and status.installed == [] and status.restart_needed == []
    assert deps.device_description().startswith(("CPU", "GPU"))
    assert not hasattr(deps, "package_index_reachable")  # no network probe: pip decides
    missing = ["seglens-not-a-real-package>=1"]

    def offline(requirements):
        raise subprocess.CalledProcessError(1, ["pip", "install", *requirements])

    with pytest.raises(deps.DependencyError, match="could not install seglens-not-a-real-package>=1: pip failed") as info:
        deps.ensure_requirements(confirm_yes, offline, missing)
    assert "PythonSlicer -m pip install 'seglens-not-a-real-package>=1'" in str(info.value) and "--index-url" in str(info.value)
    with pytest.raises(deps.DependencyError, match="installation was cancelled"):
        deps.ensure_requirements(lambda text: False, installed.append, missing)
    assert installed == []
    with pytest.raises(deps.DependencyError, match="did not provide them"):
        deps.ensure_requirements(confirm_yes, installed.extend, missing)
    assert installed == missing and "seglens-not-a-real-package" in asked[-1]
    assert deps.missing_requirements(["numpy>=1", "numpy<1"]) == ["numpy<1"]
    assert deps.top_level_modules("scikit-learn>=1") == {"sklearn"} and deps.top_level_modules("numpy") == {"numpy"}
    assert deps.source_root() == REPO


def test_module_puts_seglenslogic_on_the_path_when_it_loads(tmp_path):
    """A source checkout: SegLensLogic is importable from the Python console before any button is pressed."""
    import subprocess

    code = ("import sys, importlib.util; sys.path.insert(0, sys.argv[1]); "
            "assert importlib.util.find_spec('SegLensLogic') is None; "
            "from SegLensLib.dependencies import add_source_to_path; add_source_to_path(); "
            "import SegLensLogic; print(SegLensLogic.__file__)")  # fmt: skip
    # -S: without site-packages, as a Slicer that has never installed SegLens (this environment has it installed).
    result = subprocess.run([sys.executable, "-S", "-c", code, str(EXTENSION)], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == REPO / "SegLensLogic" / "__init__.py"
    source = MODULE_FILE.read_text()
    assert "\nadd_source_to_path()\n" in source  # called at module level, when Slicer loads the module


def test_module_parses_on_old_slicer_and_says_it_needs_5_10(SegLens):
    """Slicer 5.8 (Python 3.9) must be able to read the module to show its message; 5.10 (Python 3.12) runs it."""
    for path in [MODULE_FILE] + [EXTENSION / "SegLensLib" / f"{n}.py" for n in ("__init__", "dependencies", "inputs", "latenttable", "nodes", "worker")]:
        ast.parse(path.read_text(), feature_version=(3, 9))
    assert SegLens.versionProblem((5, 10), (3, 12)) is None and SegLens.versionProblem((5, 12), (3, 12)) is None
    message = SegLens.versionProblem((5, 8), (3, 9))
    assert message.startswith("SegLens needs 3D Slicer 5.10 or later (Python 3.12); this is Slicer 5.8 with Python 3.9.")
    assert SegLens.versionProblem((5, 10), (3, 10)) is not None


def test_modalities_from_node_names():
    from SegLensLib.inputs import assign_modalities, guess_modality

    names = {"Brats18_TCIA02_370_1_t1": "t1n", "Brats18_TCIA02_370_1_t1ce": "t1c", "BraTS-GLI-00001-000-t2w": "t2w",
             "BraTS-GLI-00001-000-t2f": "t2f", "sub-01_FLAIR": "t2f", "T1 Gd": "t1c", "case_T2": "t2w",
             "MRHead": None, "scan": None, "t1 and flair": None, "SegLens latent 5": None}  # fmt: skip
    assert {n: guess_modality(n) for n in names} == names
    found = assign_modalities({"1": "x_t1", "2": "x_t1ce", "3": "x_flair", "4": "y_flair", "5": "x_t2"},
                              {"t1n": None, "t1c": None, "t2w": "9", "t2f": None})  # fmt: skip
    assert found == {"t1n": "1", "t1c": "2"}  # two FLAIRs: not clear; T2 is chosen already


def test_latent_table_filters_and_sorts(SegLens):
    from SegLensLib import latenttable  # importable once the module is, as in Slicer

    rows = [
        {"id": 3, "label": "b", "category": "edema", "status": "shared", "slice_activation": 1.0, "volume_activation": 9.0},
        {"id": 1, "label": "a", "category": "edema", "status": "specific", "slice_activation": 5.0, "volume_activation": 2.0},
        {"id": 2, "label": None, "category": "brain edge", "status": None, "slice_activation": 0.0, "volume_activation": 4.0},
    ]
    assert latenttable.choices(rows, "status") == ["all", "shared", "specific"]
    assert [r["id"] for r in latenttable.filter_rows(rows, category="edema", status="specific")] == [1]
    assert [r["id"] for r in latenttable.sort_rows(rows, "volume_activation")] == [3, 2, 1]
    assert [r["id"] for r in latenttable.sort_rows(rows, "label", descending=False)] == [1, 3, 2]
    with pytest.raises(ValueError, match="unknown column"):
        latenttable.sort_rows(rows, "colour")
    # "Holds %": the held-out share as a whole percentage, empty where unmeasured; sorts on the share
    rows[0]["holds"], rows[1]["holds"] = 0.444, 0.07
    assert latenttable.cell_text(rows[0], "holds") == "44" and latenttable.display_value(rows[1], "holds") == 7
    assert latenttable.cell_text(rows[2], "holds") == "" and latenttable.display_value(rows[2], "holds") is None
    assert [r["id"] for r in latenttable.sort_rows(rows, "holds")] == [3, 1, 2]
    # "Other seed": whether an SAE of another seed finds the latent again; empty where not compared
    rows[0]["replicates"], rows[1]["replicates"] = True, False
    assert [latenttable.cell_text(r, "replicates") for r in rows] == ["yes", "no", ""]
    # compared with several seeds: how many of them find it
    assert latenttable.cell_text({"replicates": 3, "replicas": 5}, "replicates") == "3 of 5"
    assert latenttable.cell_text({"replicates": 0, "replicas": 5}, "replicates") == "0 of 5"
    assert latenttable.HEADERS[latenttable.COLUMNS.index("replicates")] == "Other seed"


# -- the .ui file in a real Qt -------------------------------------------------------------------------------------------
# Members the module uses on Slicer/CTK widgets beyond their Qt base class, from the public headers
# (Q_PROPERTY / public slots / signals) of qMRMLNodeComboBox.h, ctkSliderWidget.h, ctkRangeWidget.h,
# ctkPathLineEdit.h, ctkDirectoryButton.h and ctkCollapsibleButton.h.
CUSTOM_MEMBERS = {
    "qMRMLNodeComboBox": {"setMRMLScene", "currentNode", "currentNodeID", "setCurrentNodeID", "setCurrentNode", "addNode",
                          "nodeTypes", "currentNodeChanged", "connect"},
    "ctkSliderWidget": {"value", "minimum", "maximum", "singleStep", "decimals", "valueChanged", "connect"},
    "ctkRangeWidget": {"minimumValue", "maximumValue", "minimum", "maximum", "singleStep", "decimals", "valuesChanged", "connect"},
    "ctkPathLineEdit": {"currentPath", "setCurrentPath", "filters", "nameFilters", "settingKey", "currentPathChanged", "connect"},
    "ctkDirectoryButton": {"directory", "setDirectory", "directoryChanged", "connect"},
    "ctkCollapsibleButton": {"collapsed", "text", "connect"},
}
CUSTOM_MEMBERS["qMRMLColorTableComboBox"] = CUSTOM_MEMBERS["qMRMLNodeComboBox"]  # a qMRMLNodeComboBox subclass


def _ui_widgets() -> tuple[dict[str, str], dict[str, str]]:
    """``({object name: class}, {custom class: Qt base class})`` from the .ui XML."""
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    customs = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    return widgets, customs


def _module_ui_usage() -> dict[str, set[str]]:
    """``{ui name: {members used on it}}`` for every ``self.ui.<name>`` in SegLens.py, plus the selectors it reaches
    with ``getattr(self.ui, name)`` through ``MODALITY_SELECTORS``."""
    tree = ast.parse(MODULE_FILE.read_text())
    usage: dict[str, set[str]] = {}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            members = usage.setdefault(node.attr, set())
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute):
                members.add(parent.attr)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODALITY_SELECTORS" for t in node.targets):
            for value in ast.literal_eval(node.value).values():
                usage.setdefault(value, set()).add("currentNode")
    return usage


def test_ui_loads_in_qt_and_has_every_widget_the_module_uses():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is needed to load the .ui file")
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader

    widgets, customs = _ui_widgets()
    assert widgets["SegLens"] == "qMRMLWidget" and ET.parse(UI_FILE).getroot().find("widget").get("class") == "qMRMLWidget"
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QUiLoader()

    def qt_base(cls):  # the Qt class a custom class extends, through other custom classes
        while not hasattr(QtWidgets, cls):
            cls = customs[cls]
        return cls

    # Placeholders with the Qt base class the .ui says they extend, kept referenced here: the loader does not keep
    # the Python types alive, and a type collected before load() crashed the interpreter (a segfault in QUiLoader).
    placeholders = [type(name, (getattr(QtWidgets, qt_base(name)),), {}) for name in customs]
    for placeholder in placeholders:
        loader.registerCustomWidget(placeholder)
    handle = QFile(str(UI_FILE))
    assert handle.open(QFile.ReadOnly)
    root = loader.load(handle)
    handle.close()
    assert root is not None, loader.errorString()
    assert type(root).__name__ == "qMRMLWidget"

    for name, members in sorted(_module_ui_usage().items()):
        assert name in widgets, f"SegLens.py uses ui.{name}, which SegLens.ui does not have"
        cls = widgets[name]
        child = root.findChild(QtWidgets.QWidget, name)
        assert child is not None and type(child).__name__ == cls, (name, type(child).__name__, cls)
        qt_class = getattr(QtWidgets, qt_base(cls))
        meta = qt_class.staticMetaObject
        for member in members:
            known = (hasattr(qt_class, member) or meta.indexOfProperty(member) >= 0  # PythonQt exposes properties
                     or member in CUSTOM_MEMBERS.get(cls, set()) or member in {"connect", "enabled", "text", "checked", "value"})
            assert known, f"ui.{name}.{member}: {cls} has no such member"
    # Each selector is connected to the scene through the root's mrmlSceneChanged signal.
    receivers = {c.findtext("receiver") for c in ET.parse(UI_FILE).getroot().iter("connection")}
    assert {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"} <= receivers
    root.deleteLater()
    del app


# -- Slicer API names ----------------------------------------------------------------------------------------------------
def slicer_names(source: str) -> set[str]:
    """Every dotted name ``slicer.a.b...`` in Python source, e.g. ``slicer.util.arrayFromVolume``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "slicer":
                names.add(".".join(["slicer", *reversed(parts)]))
    # Keep only the longest chains (slicer.util.x, not also slicer.util).
    return {n for n in names if not any(other.startswith(n + ".") for other in names)}


# Names of the running application that slicer_api.json does not list, each checked in Slicer's sources:
# qSlicerCoreApplication's Q_PROPERTY(int majorVersion / minorVersion) (Base/QTCore/qSlicerCoreApplication.h),
# read as attributes through PythonQt in many extensions (slicer.app.majorVersion * 100 + slicer.app.minorVersion).
EXTRA_DOCUMENTED = {"slicer.app.majorVersion", "slicer.app.minorVersion"}


def _documented_names() -> set[str]:
    api = json.loads(API_JSON.read_text())
    names = {f"slicer.util.{n}" for n in api["slicer.util"]}
    names |= {f"slicer.{cls}.{m}" for cls, methods in api["mrml_classes"].items() for m in methods}
    names |= {f"slicer.{cls}" for cls in api["mrml_classes"]}
    for entry in api["other"]:
        names.add(entry.split("(")[0])
    return names | EXTRA_DOCUMENTED


def unknown_slicer_names(source: str) -> list[str]:
    """Names that neither resolve in the installed slicer-core nor appear in slicer_api.json."""
    documented = _documented_names() if API_JSON.is_file() else set()
    missing = []
    for name in sorted(slicer_names(source)):
        # The scene singleton is a vtkMRMLScene: its members are the class's.
        resolved = name.replace("slicer.mrmlScene.", "slicer.vtkMRMLScene.", 1)
        target, ok = slicer, True
        for part in resolved.split(".")[1:]:
            if not hasattr(target, part):
                ok = False
                break
            target = getattr(target, part)
        if not ok and name not in documented:
            missing.append(name)
    return missing


def test_every_slicer_name_used_exists():
    used = set()
    for path in SOURCES:
        source = path.read_text()
        used |= slicer_names(source)
        assert unknown_slicer_names(source) == [], path
    # The module really is checked: it uses MRML, segmentation logic, storage and application names.
    assert {"slicer.util.arrayFromVolume", "slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode",
            "slicer.vtkMRMLSegmentationStorageNode", "slicer.app.layoutManager", "slicer.util.loadUI"} <= used
    # ... and a name that does not exist fails the check.
    assert unknown_slicer_names("slicer.util.arrayFromVolumeX(n)\nslicer.app.layoutManagr()") == [
        "slicer.app.layoutManagr", "slicer.util.arrayFromVolumeX"]


# -- extension files ---------------------------------------------------------------------------------------------------
def test_extension_cmake_lists_every_shipped_file():
    cmake = (EXTENSION / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+([\w/${}.]+\.(?:py|png|ui|txt))\s*$", cmake.replace("${MODULE_NAME}", "SegLens"), re.M))
    shipped = {str(p.relative_to(EXTENSION)) for p in EXTENSION.rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.suffix in (".py", ".png", ".ui", ".txt") and p.parts[len(EXTENSION.parts)] not in ("Testing",)
               and p.name != "CMakeLists.txt"}
    assert listed == shipped
    top = (REPO / "CMakeLists.txt").read_text()
    for needed in ('set(EXTENSION_DEPENDS "PyTorch")', "find_package(Slicer REQUIRED)", "add_subdirectory(SegLensExtension)",
                   "project(SegLens)"):
        assert needed in top
    assert not [p for p in EXTENSION.glob("*.py") if p.name != "SegLens.py"], "helpers must live in SegLensLib/"


# -- Slicer's conventions: who made it, where its documentation is, translatable strings -------------------------------
def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower())))
    return anchors


def test_module_metadata_names_its_makers_and_links_its_documentation(SegLens, monkeypatch):
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(majorVersion=5, minorVersion=10), raising=False)
    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    SegLens.SegLens(parent)
    assert parent.title == "SegLens" and parent.categories == ["Segmentation"]
    assert parent.contributors and not [c for c in parent.contributors if "developers" in c.lower()]
    assert parent.contributors == list(SegLens.CONTRIBUTORS)
    top = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CONTRIBUTORS "{", ".join(SegLens.CONTRIBUTORS)}")' in top  # the same names in the extension
    # The help links to the README's section on this module, in the repository the extension names as its homepage.
    assert f'<a href="{SegLens.DOCUMENTATION_URL}">' in parent.helpText
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"#]+)', top).group(1)
    url, anchor = SegLens.DOCUMENTATION_URL.split("#")
    assert url == homepage and anchor in github_anchors((REPO / "README.md").read_text())
    # The extension's description shows the panel's screenshot, from the same repository.
    shots = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', top).group(1).split()
    assert shots and all(s.startswith(homepage.replace("github.com", "raw.githubusercontent.com") + "/") for s in shots)
    assert [s.split("/main/", 1)[1] for s in shots] == ["docs/images/slicer-panel.png"]


# Calls and keywords whose string arguments the user reads, and attributes whose value the user reads.
USER_TEXT_CALLS = {"_error", "showError", "errorDisplay", "warningDisplay", "infoDisplay", "confirmOkCancelDisplay",
                   "confirmYesNoDisplay", "QLabel"}
USER_TEXT_KEYWORDS = {"phase", "windowTitle"}
USER_TEXT_ATTRIBUTES = {"text", "title", "helpText", "acknowledgementText"}


def _has_words(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]{2,}", re.sub(r"%[-+ #0]*\d*(?:\.\d+)?[sdfrx]", "", text)))


def _untranslated(expression) -> list[str]:
    """String literals with words in ``expression`` that do not go through ``_()`` (or ``translate()``)."""
    found = []

    def visit(node, inside):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "translate"):
            inside = True
        if isinstance(node, ast.JoinedStr) and not inside:
            found.append(ast.unparse(node))
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not inside and _has_words(node.value):
            found.append(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(expression, False)
    return found


def test_user_visible_strings_go_through_the_translator():
    """Slicer 5.x convention: every string the panel shows is wrapped in ``_()`` (``slicer.i18n.tr``) with a literal
    argument (placeholders filled by ``.format``), so that Qt's lupdate extracts it; category names use
    ``translate()``. The module still loads without ``slicer.i18n`` (the ``slicer-core`` wheel has none)."""
    tree = ast.parse(MODULE_FILE.read_text())
    problems = []
    for node in ast.walk(tree):
        values = []
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in USER_TEXT_CALLS and node.args:
                values.append(node.args[0])
            if name in ("confirmOkCancelDisplay", "confirmYesNoDisplay") and len(node.args) > 1:
                values.append(node.args[1])
            values += [k.value for k in node.keywords if k.arg in USER_TEXT_KEYWORDS]
            if name in ("_", "translate"):  # lupdate reads literals only
                text = node.args[-1] if node.args else None
                if not (isinstance(text, ast.Constant) and isinstance(text.value, str)):
                    problems.append(f"line {node.lineno}: {name}() of a non-literal: {ast.unparse(node)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr in USER_TEXT_ATTRIBUTES for t in targets):
                values.append(node.value)
            if any(isinstance(t, ast.Name) and t.id in ("NO_POPULATION", "ANY_TUMOUR", "JOB_TITLES", "SEGMENT_PHASES")
                   for t in targets):  # fmt: skip
                values += node.value.values if isinstance(node.value, ast.Dict) else [node.value]  # (keys are ids)
        for value in values:
            problems += [f"line {node.lineno}: {text!r}" for text in _untranslated(value)]
    assert not problems, "user-visible strings not wrapped in _():\n" + "\n".join(problems)
    source = MODULE_FILE.read_text()
    assert "from slicer.i18n import tr as _" in source and "from slicer.i18n import translate" in source
    assert "slicer.i18n" not in sys.modules or hasattr(sys.modules["slicer.i18n"], "tr")


# -- standard terminology of the tumour segments --------------------------------------------------------------------------
def test_tumour_segments_carry_snomed_ct_terminology(SegLens, scene, tmp_path):
    """Necrotic core, edema and enhancing tumour get the SNOMED CT codes SlicerMONAIAuto3DSeg gives its BraTS segments,
    in the "TerminologyEntry" tag Slicer reads (parsed here by Slicer's own terminology logic), and keep them in a
    saved .seg.nrrd; a class without a standard code gets no tag; names and colours stay the bundle's."""
    import vtk

    from SegLensLib import nodes
    from SegLensLogic.data.labels import HEALTHY_CLASSES, TUMOUR_CLASSES

    terminologies = slicer.vtkSlicerTerminologiesModuleLogic
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
    labels = np.zeros((12, 10, 9), dtype=np.uint8)
    labels[2:5, 2:5, 2:5], labels[5:8, 2:8, 2:7], labels[8:10, 3:6, 3:6] = 1, 2, 3
    nodes.set_volume_array(reference, labels.astype(np.float32))
    table = nodes.colour_table_node(scene, list(TUMOUR_CLASSES), [(0, 0, 0), (255, 0, 0), (0, 200, 0), (255, 220, 0)])
    segmentation = nodes.segmentation_from_labels(scene, labels, reference, table, "tumour")
    expected = {1: ("necrotic core", "6574001", "Necrosis"), 2: ("edema", "79654002", "Edema"),
                3: ("enhancing tumour", "86049000", "Neoplasm, Primary")}  # fmt: skip

    def terms(node):
        found = {}
        for value in expected:
            segment = node.GetSegmentation().GetSegment(nodes.segment_id(value))
            tag = vtk.reference("")
            assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag), segment.GetName()
            entry = slicer.vtkSlicerTerminologyEntry()
            assert terminologies.DeserializeTerminologyEntry(str(tag), entry)
            category, kind, region = entry.GetCategoryObject(), entry.GetTypeObject(), entry.GetRegionObject()
            found[value] = (segment.GetName(), kind.GetCodeValue(), kind.GetCodeMeaning(), kind.GetCodingSchemeDesignator(),
                            category.GetCodeValue(), category.GetCodingSchemeDesignator(), region.GetCodeValue(),
                            region.GetCodeMeaning(), entry.GetTerminologyContextName())  # fmt: skip
        return found

    found = terms(segmentation)
    for value, (name, code, meaning) in expected.items():
        assert found[value] == (name, code, meaning, "SCT", "49755003", "SCT", "12738006", "Brain",
                                "Segmentation category and type - DICOM master list")  # fmt: skip
        # The very string Slicer's own serializer makes from these codes.
        assert nodes.terminology_entry(name) == terminologies.SerializeTerminologyEntry(
            "Segmentation category and type - DICOM master list", "49755003", "SCT", "Morphologically Altered Structure",
            code, "SCT", meaning, "", "", "", "Anatomic codes - DICOM master list", "12738006", "SCT", "Brain", "", "", "")
        segment = segmentation.GetSegmentation().GetSegment(nodes.segment_id(value))
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    # Saved as .seg.nrrd and read back (by Slicer's segmentation storage): the codes travel with the file.
    path = nodes.write_segmentation(segmentation, tmp_path / "tumour.seg.nrrd")
    assert terms(nodes.read_segmentation(scene, path)) == found
    # Classes without a standard code here (a healthy-anatomy bundle's) keep Slicer's default entry, and their names.
    healthy = nodes.colour_table_node(scene, list(HEALTHY_CLASSES[:3]), [(0, 0, 0), (10, 200, 10), (200, 10, 10)], "healthy")
    anatomy = nodes.segmentation_from_labels(scene, np.clip(labels, 0, 2), reference, healthy, "anatomy")
    segment = anatomy.GetSegmentation().GetSegment(nodes.segment_id(1))
    tag = vtk.reference("")
    segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert segment.GetName() == HEALTHY_CLASSES[1] and "49755003" not in str(tag)
    assert nodes.terminology_entry("Enhancing  Tumor") == nodes.terminology_entry("enhancing tumour")


def test_the_module_offers_every_shipped_reference(SegLens):
    """The model list holds both shipped references, the SegFormer first, each titled by its architecture and hook."""
    from SegLensLogic.resources import resources_folder

    models = SegLens.shippedModels()
    folders = [folder.name for _title, folder in models]
    assert folders[0] == "adult-glioma-segformer" and "adult-glioma-unet" in folders
    titles = dict((folder.name, title) for title, folder in models)
    assert titles["adult-glioma-unet"] == "adult-glioma (unet, down_3)"
    assert titles["adult-glioma-segformer"].startswith("adult-glioma (segformer-")
    assert all(folder == (resources_folder() / folder.name).resolve() for _title, folder in models)
