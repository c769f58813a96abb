"""MRML nodes <-> numpy arrays, on the exact voxel grid of the input volume.

Conventions:

- SegLensLogic arrays are indexed ``[i, j, k]`` (file order, nibabel's convention) with a 4x4 IJK -> RAS affine.
  Slicer's ``arrayFromVolume`` arrays are ``[k, j, i]``; :func:`volume_array` and :func:`set_volume_array`
  transpose between the two, so callers only ever see ``[i, j, k]``.
- Every node created here takes its geometry from a reference volume with ``CopyOrientation`` (origin, spacing,
  directions), so heatmaps, previews and segmentations overlay the input voxel for voxel.
- Segmentations are written through one colour table (class index = label value, class name, RGB), so label values
  and colours survive export (``.seg.nrrd``, labelmaps, NIfTI) unchanged.

Only static MRML / segmentation-logic calls and the ``slicer.util`` array helpers that work without the
application are used, so this module runs inside Slicer and, in tests, on the ``slicer-core`` wheel.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import slicer
import vtk

# Segment IDs are fixed per class so that a corrected segmentation lines up with the original one.
SEGMENT_ID_PREFIX = "SegLens_class_"
# Colour maps for heatmap layers, most preferred first; the file-based ones exist in the application, the
# procedural ones in any scene whose colour logic is set up.
HEATMAP_COLOUR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileViridis.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeRainbow",
)
# Two grids are the same when their IJK->RAS matrices differ by less than this (mm).
GEOMETRY_TOLERANCE = 1e-4


# -- geometry and voxels --------------------------------------------------------------------------------------------
def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's IJK -> RAS matrix as a ``(4, 4)`` float64 array (mm)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_shape(volume_node) -> tuple[int, int, int]:
    """``(I, J, K)``: voxel counts along the volume's index axes."""
    return tuple(int(n) for n in volume_node.GetImageData().GetDimensions())  # type: ignore[return-value]


def same_geometry(a, b, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    """True when two volume nodes have the same dimensions and (to ``tolerance`` mm) the same IJK->RAS matrix."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    return volume_shape(a) == volume_shape(b) and np.allclose(ijk_to_ras(a), ijk_to_ras(b), atol=tolerance)


def volume_array(volume_node, dtype=None) -> np.ndarray:
    """A copy of the node's voxels indexed ``[i, j, k]`` (shape ``(I, J, K)``)."""
    if volume_node.GetImageData() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data")
    array = slicer.util.arrayFromVolume(volume_node).transpose(2, 1, 0)
    return np.array(array, dtype=dtype or array.dtype, copy=True)


def to_vtk_order(array_ijk: np.ndarray) -> np.ndarray:
    """``array_ijk`` ``(I, J, K)`` as VTK stores voxels: C-contiguous ``(K, J, I)``. The strided copy is the slow part
    of putting an array into a node, so a worker thread makes it (:func:`add_volume_like` takes it as it is)."""
    array = np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0))
    return array.astype(np.int32) if array.dtype == np.int64 else array  # VTK rejects "long long" on some platforms


class VtkOrder:
    """An array already in VTK order (:func:`to_vtk_order`): ``add_volume_like`` and ``set_volume_array`` copy it
    into the node without reordering it on the main thread."""

    def __init__(self, array_ijk: np.ndarray):
        self.shape = tuple(np.asarray(array_ijk).shape)
        self.kji = to_vtk_order(array_ijk)


def set_volume_array(volume_node, array_ijk) -> None:
    """Replace the node's voxels with ``array_ijk`` (shape ``(I, J, K)``, indexed ``[i, j, k]``, or a :class:`VtkOrder`)."""
    array = array_ijk.kji if isinstance(array_ijk, VtkOrder) else to_vtk_order(array_ijk)
    slicer.util.updateVolumeFromArray(volume_node, array)


def unique_name(scene, name: str) -> str:
    """``name`` itself when no node has it, else the scene's next unique variant. (The scene's GenerateUniqueName
    counts every name it ever gave: a node made again after its namesake was removed would be "name_1".)"""
    return name if scene.GetFirstNodeByName(name) is None else scene.GenerateUniqueName(name)


def add_volume_like(scene, reference, array_ijk, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding ``array_ijk`` on ``reference``'s grid (origin, spacing, directions copied).

    Args:
        scene: the MRML scene.
        reference: the input volume node whose geometry the new node takes.
        array_ijk: ``(I, J, K)`` array, the shape of ``reference`` (or a :class:`VtkOrder` of one, made on a worker).
        name: node name (made unique in the scene when a node already has it).
        class_name: ``vtkMRMLScalarVolumeNode`` for maps, ``vtkMRMLLabelMapVolumeNode`` for labels.
    """
    if tuple(array_ijk.shape) != volume_shape(reference):
        raise ValueError(f"array of shape {array_ijk.shape} does not match '{reference.GetName()}' {volume_shape(reference)}")
    node = scene.AddNewNodeByClass(class_name, unique_name(scene, name))
    node.CopyOrientation(reference)
    set_volume_array(node, array_ijk)
    node.CreateDefaultDisplayNodes()
    return node


def slice_centre_ras(slice_node) -> tuple[float, float, float]:
    """RAS position (mm) of the centre of what a slice view shows: the last column of its SliceToRAS matrix."""
    matrix = slice_node.GetSliceToRAS()
    return tuple(float(matrix.GetElement(row, 3)) for row in range(3))  # type: ignore[return-value]


def slice_plane_point(slice_node, reference) -> tuple[float, float, float]:
    """The point of a slice view's plane nearest the centre of ``reference``'s voxel grid (RAS, mm).

    Panning moves the view's centre within its plane but not the plane: this point depends only on which slice is
    shown, so the current slice does not change (nor leave the volume) when the user pans.
    """
    matrix = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    normal = matrix[:3, 2] / max(float(np.linalg.norm(matrix[:3, 2])), 1e-12)
    origin = matrix[:3, 3]
    shape = np.array(volume_shape(reference), dtype=np.float64)
    centre = (ijk_to_ras(reference) @ np.array([*((shape - 1) / 2.0), 1.0]))[:3]
    point = centre - float(np.dot(centre - origin, normal)) * normal
    return tuple(float(v) for v in point)  # type: ignore[return-value]


def resample_to_grid(array_ijk: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], reference_affine: np.ndarray,
                     order: int = 1) -> np.ndarray:
    """``array_ijk`` (on the grid of ``affine``) resampled onto the grid ``(shape, reference_affine)``, ``float32``.

    Linear interpolation (``order`` 1) in world (RAS) coordinates; voxels of the new grid outside the source volume
    are 0. Done one slice of the new grid at a time, so memory stays near one slice of coordinates.
    """
    from scipy import ndimage

    to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(reference_affine, dtype=np.float64)
    source = np.asarray(array_ijk, dtype=np.float32)
    out = np.zeros(tuple(int(n) for n in shape), dtype=np.float32)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    plane = np.stack([i.ravel(), j.ravel(), np.zeros(i.size), np.ones(i.size)]).astype(np.float64)
    for k in range(shape[2]):
        plane[2] = k
        coords = (to_source @ plane)[:3]
        out[:, :, k] = ndimage.map_coordinates(source, coords, order=order, mode="constant", cval=0.0).reshape(i.shape)
    return out


# -- steering previews ------------------------------------------------------------------------------------------------
# What a preview shows: only the voxels an edit changes, by kind (label value, name, RGB 0-255).
CHANGE_CLASSES = (
    (0, "unchanged", (0, 0, 0)),
    (1, "added", (0, 200, 0)),  # background becomes tumour
    (2, "removed", (230, 0, 230)),  # tumour becomes background
    (3, "relabelled", (255, 200, 0)),  # one tumour class becomes another
)


def change_map(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``uint8`` map of what changes from ``before`` to ``after`` labels: 0 nothing, 1 added, 2 removed, 3 relabelled."""
    before, after = np.asarray(before), np.asarray(after)
    out = np.zeros(before.shape, dtype=np.uint8)
    out[(before == 0) & (after > 0)] = 1
    out[(before > 0) & (after == 0)] = 2
    out[(before > 0) & (after > 0) & (before != after)] = 3
    return out


def change_colour_table(scene, name: str = "SegLens changes"):
    """The colour table of :data:`CHANGE_CLASSES` (unchanged voxels transparent)."""
    names = [entry[1] for entry in CHANGE_CLASSES]
    colours = [entry[2] for entry in CHANGE_CLASSES]
    return colour_table_node(scene, names, colours, name)


# -- colour tables and segmentations ----------------------------------------------------------------------------------
def ensure_segmentation_converters() -> None:
    """Register the binary-labelmap <-> closed-surface converter rules when none are registered.

    The application's Segmentations module registers them at startup (so this does nothing in Slicer); a scene
    built from the MRML libraries alone (``slicer-core``) needs them before a segment can be created empty.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def colour_table_node(scene, class_names: list[str], colours: list[tuple[int, int, int]], name: str = "SegLens classes"):
    """A user colour table with one entry per class: index = label value, class name, RGB (0-255).

    Background (index 0) is transparent. The table is what keeps label values stable through export.
    """
    if len(class_names) != len(colours):
        raise ValueError(f"{len(class_names)} class names but {len(colours)} colours")
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", unique_name(scene, name))
    table.SetTypeToUser()
    table.SetNumberOfColors(len(class_names))
    for index, (class_name, rgb) in enumerate(zip(class_names, colours)):
        r, g, b = (float(c) / 255.0 for c in rgb)
        table.SetColor(index, class_name, r, g, b, 0.0 if index == 0 else 1.0)
    table.SetHideFromEditors(False)
    return table


# Standard terminology of the tumour classes, as SlicerMONAIAuto3DSeg labels its BraTS models' segments: SNOMED CT
# codes from Slicer's DICOM master lists (category "Morphologically Altered Structure", the brain as anatomic
# region). Slicer reads a segment's meaning from its "TerminologyEntry" tag (shown in the Segment Editor, written into
# .seg.nrrd and DICOM SEG); names and colours stay the bundle's (not generated from the terminology).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TUMOUR_CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")
BRAIN = ("SCT", "12738006", "Brain")
CLASS_TERMS = {
    "necrotic core": ("SCT", "6574001", "Necrosis"),
    "edema": ("SCT", "79654002", "Edema"),
    "enhancing tumour": ("SCT", "86049000", "Neoplasm, Primary"),
}
CLASS_TERM_ALIASES = {"necrosis": "necrotic core", "necrotic tumour core": "necrotic core", "oedema": "edema",
                      "peritumoral edema": "edema", "enhancing tumor": "enhancing tumour"}  # fmt: skip


def terminology_entry(class_name: str) -> str | None:
    """Slicer's serialized terminology entry (``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``'s
    format: context~category~type~modifier~anatomic context~region~region modifier, each code as
    scheme^value^meaning) for a tumour class name, or None for a class without a standard code here."""
    name = " ".join(str(class_name).lower().split())
    code = CLASS_TERMS.get(CLASS_TERM_ALIASES.get(name, name))
    if code is None:
        return None
    return "~".join([TERMINOLOGY_CONTEXT, "^".join(TUMOUR_CATEGORY), "^".join(code), "^^", ANATOMIC_CONTEXT, "^".join(BRAIN), "^^"])


def segment_id(class_index: int) -> str:
    return f"{SEGMENT_ID_PREFIX}{class_index}"


def segmentation_from_labels(scene, labels_ijk: np.ndarray, reference, colour_table, name: str, node=None):
    """A new segmentation node (or ``node``, its segments replaced) with one named, coloured segment per class of
    ``colour_table``.

    Every class (but background) gets a segment, empty or not, with ID ``SegLens_class_<value>``, the class name
    and colour, and for the tumour classes their standard terminology (:func:`terminology_entry`); label value ``v``
    of ``labels_ijk`` fills segment ``v``. The segmentation's reference geometry is ``reference``'s grid.

    Args:
        labels_ijk: ``(I, J, K)`` integer labels on ``reference``'s grid, values < number of colours.
    """
    labels = np.asarray(labels_ijk)
    count = colour_table.GetNumberOfColors()
    if labels.size and int(labels.max()) >= count:
        raise ValueError(f"label value {int(labels.max())} has no class in '{colour_table.GetName()}' ({count} colours)")
    ensure_segmentation_converters()
    if node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", unique_name(scene, name))
    else:  # the user chose this node as the output (and confirmed replacing what it held)
        segmentation_node = node
        segmentation_node.GetSegmentation().RemoveAllSegments()
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    rgba = [0.0, 0.0, 0.0, 0.0]
    for value in range(1, count):
        colour_table.GetColor(value, rgba)
        segmentation.AddEmptySegment(segment_id(value), colour_table.GetColorName(value), rgba[:3])
        segment = segmentation.GetSegment(segment_id(value))
        segment.SetColor(*rgba[:3])  # some builds ignore AddEmptySegment's colour
        # Our names and colours are the class scheme's: Slicer must not regenerate them from terminology.
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        entry = terminology_entry(colour_table.GetColorName(value))
        if entry is not None:
            segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
        ids.InsertNextValue(segment_id(value))
    update_segmentation(segmentation_node, labels, reference, ids)
    return segmentation_node


def update_segmentation(segmentation_node, labels_ijk: np.ndarray, reference, ids=None) -> None:
    """Replace the contents of a SegLens segmentation's segments with ``labels_ijk`` (value v -> segment v)."""
    scene = segmentation_node.GetScene()
    if ids is None:
        ids = vtk.vtkStringArray()
        segmentation = segmentation_node.GetSegmentation()
        value = 1
        while segmentation.GetSegment(segment_id(value)) is not None:
            ids.InsertNextValue(segment_id(value))
            value += 1
    labelmap = add_volume_like(scene, reference, np.asarray(labels_ijk, dtype=np.uint8), "SegLens import", "vtkMRMLLabelMapVolumeNode")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids)
    finally:
        scene.RemoveNode(labelmap)
    if not ok:
        raise RuntimeError(f"could not import labels into segmentation '{segmentation_node.GetName()}'")
    segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), reference.GetID())


def labels_from_segmentation(segmentation_node, reference, colour_table) -> np.ndarray:
    """The segmentation as one ``uint8`` label array ``(I, J, K)`` on ``reference``'s grid.

    Label values come from ``colour_table`` by segment name (Slicer's export rule), not from segment order.
    """
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for index in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(index))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("SegLens export"))
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colour_table
        )
        if not ok:
            raise RuntimeError(f"could not export segmentation '{segmentation_node.GetName()}' to a labelmap")
        return volume_array(labelmap, np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def segment_summary(segmentation_node) -> list[dict]:
    """``[{"id", "name", "color": (r, g, b) 0-1}]`` per segment, in segmentation order."""
    segmentation = segmentation_node.GetSegmentation()
    rows = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        rows.append({"id": segmentation.GetNthSegmentID(index), "name": segment.GetName(), "color": tuple(segment.GetColor())})
    return rows


# -- heatmap layers and slice views -----------------------------------------------------------------------------------
def heatmap_colour_node_id(scene) -> str | None:
    """The first of :data:`HEATMAP_COLOUR_NODE_IDS` present in the scene."""
    for node_id in HEATMAP_COLOUR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    return None


def style_heatmap(volume_node, upper: float, threshold: float, colour_node_id: str | None = None) -> None:
    """Fixed window ``[0, upper]``, a colour map, and voxels below ``threshold`` transparent."""
    display = volume_node.GetDisplayNode()
    colour_node_id = colour_node_id or heatmap_colour_node_id(volume_node.GetScene())
    if colour_node_id:
        display.SetAndObserveColorNodeID(colour_node_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, max(float(upper), 1e-6))
    display.SetApplyThreshold(1)
    display.SetLowerThreshold(float(threshold))
    display.SetUpperThreshold(max(float(upper), float(threshold)) + 1.0)
    display.SetInterpolate(0)


# Index of the first layer after background (0), foreground (1) and label (2) in a slice composite node (Slicer 5.10+).
FIRST_ADDITIONAL_LAYER = 3


def supports_additional_layers(scene) -> bool:
    """Whether slice views have layers beyond background, foreground and label (Slicer 5.10 and later)."""
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    return composite is not None and hasattr(composite, "SetNthLayerVolumeID")


def show_heatmap_layers(scene, background, heatmaps: list, opacity: float) -> int:
    """Show heatmap volumes in every slice view: the first as the foreground, the others in the extra layers of
    Slicer 5.10+ (one each), all at ``opacity``; extra layers SegLens no longer needs are emptied.

    Returns:
        How many heatmaps are shown (1 on a Slicer without extra layers).
    """
    extra = supports_additional_layers(scene)
    shown = len(heatmaps) if extra else min(len(heatmaps), 1)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(heatmaps[0].GetID() if heatmaps else None)
        composite.SetForegroundOpacity(float(opacity))
        if not extra:
            continue
        for n, node in enumerate(heatmaps[1:]):
            composite.SetNthLayerVolumeID(FIRST_ADDITIONAL_LAYER + n, node.GetID())
            composite.SetNthLayerOpacity(FIRST_ADDITIONAL_LAYER + n, float(opacity))
        # Last first: emptying an extra layer removes it (the layers after it move down one).
        for layer in reversed(range(FIRST_ADDITIONAL_LAYER + max(len(heatmaps) - 1, 0), FIRST_ADDITIONAL_LAYER + composite.GetNumberOfAdditionalLayers())):
            volume_id = composite.GetNthLayerVolumeID(layer)
            volume = scene.GetNodeByID(volume_id) if volume_id else None
            if volume is None or volume.GetAttribute("SegLens.Latent") is not None:
                composite.SetNthLayerVolumeID(layer, None)
    return shown


def set_heatmap_opacity(scene, heatmaps: list, opacity: float) -> None:
    """Opacity of the layers that show ``heatmaps`` (display only; the voxels are not touched)."""
    ids = {node.GetID() for node in heatmaps}
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() in ids:
            composite.SetForegroundOpacity(float(opacity))
        if hasattr(composite, "GetNumberOfAdditionalLayers"):
            for layer in range(FIRST_ADDITIONAL_LAYER, FIRST_ADDITIONAL_LAYER + composite.GetNumberOfAdditionalLayers()):
                if composite.GetNthLayerVolumeID(layer) in ids:
                    composite.SetNthLayerOpacity(layer, float(opacity))


def show_layers(scene, background=None, foreground=None, foreground_opacity: float | None = None, label=None,
                label_opacity: float | None = None) -> None:
    """Put volumes in every slice view's background / foreground / label layer (None leaves a layer as it is)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foreground_opacity is not None:
            composite.SetForegroundOpacity(float(foreground_opacity))
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
        if label_opacity is not None:
            composite.SetLabelOpacity(float(label_opacity))


# -- files ----------------------------------------------------------------------------------------------------------
def _atomic_write(node, storage_class, path: Path, suffix: str, overwrite: bool) -> Path:
    """Write ``node`` with a storage node to a temporary file beside ``path``, then rename it into place."""
    from SegLensLogic.errors import refuse_existing

    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        storage = storage_class()
        storage.SetFileName(tmp)
        if not storage.WriteData(node):
            raise OSError(f"{path}: Slicer could not write {node.GetName()}")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_segmentation(segmentation_node, path: str | Path, overwrite: bool = False) -> Path:
    """Write a ``.seg.nrrd`` (segment names, colours and label values in its header), atomically."""
    if not str(path).endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation file must end in .seg.nrrd")
    return _atomic_write(segmentation_node, slicer.vtkMRMLSegmentationStorageNode, Path(path), ".seg.nrrd", overwrite)


def write_colour_table(colour_table, path: str | Path, overwrite: bool = False) -> Path:
    """Write Slicer's colour-table file (``.ctbl``: ``value name r g b a``) for a labelmap's label values."""
    return _atomic_write(colour_table, slicer.vtkMRMLColorTableStorageNode, Path(path), ".ctbl", overwrite)


def read_segmentation(scene, path: str | Path, name: str | None = None):
    """Read a ``.seg.nrrd`` into a new segmentation node."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or Path(path).name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise OSError(f"{path}: Slicer could not read it as a segmentation")
    return node
