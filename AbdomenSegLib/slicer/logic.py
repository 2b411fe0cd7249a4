"""Everything the Slicer module does, on MRML nodes only (no Qt): tested against slicer-core.

Volume nodes become SimpleITK images (RAS -> LPS), the engine segments them, and the label map comes
back as a segmentation node with one segment per organ (name, colour, SNOMED terminology) whose
reference geometry is the input volume. Reference comparison, review segments, organ volumes,
model comparison tables and plots live here too, so the widget only wires buttons to calls.
"""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import vtk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import (  # noqa: F401  (the panel's choices)
    FROM_COLOR_NAMES,
    REFERENCE_CONVENTIONS,
    CancelCallback,
    LogCallback,
    ProgressCallback,
)
from AbdomenSegLib.core.organs import BY_LABEL, BY_NAME, organ_from_name, organ_from_terminology
from AbdomenSegLib.evaluation.metrics import METRIC_UNITS, evaluate

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
QC_ATTRIBUTE = "AbdomenSeg.qc"
TERMINOLOGY_TAG = "TerminologyEntry"


def _slicer():
    import slicer

    return slicer


# -- geometry ---------------------------------------------------------------------------------
def scalar_volume_node_from_image(scene, image: sitk.Image, name):
    node = labelmap_node_from_image(scene, image, name, "vtkMRMLScalarVolumeNode")
    node.CreateDefaultDisplayNodes()
    return node


def volume_node_to_image(node, world: bool = False) -> sitk.Image:
    """A scalar or labelmap volume node as a SimpleITK image with the node's exact geometry.

    With `world`, the geometry includes the node's parent transforms (where the volume is shown): a
    volume moved or flipped by a transform must be segmented where it lies. A non-linear transform has no
    voxel grid to express it, so it is refused with the fix (harden it first).
    """
    slicer = _slicer()
    if node is None or node.GetImageData() is None:
        raise AbdomenSegError("the input volume is empty or missing", "select a loaded volume")
    array = slicer.util.arrayFromVolume(node)
    if array.ndim != 3:
        raise AbdomenSegError(
            f"the volume '{node.GetName()}' is not a single 3D scalar volume", "select a scalar (grayscale) volume"
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, origin, direction = volume_node_geometry(node, world)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volume_node_geometry(node, world: bool = False) -> tuple:
    """(spacing, origin, direction) of a volume node in LPS, as SimpleITK sets them; no pixels are copied."""
    to_ras = _matrix(node.GetIJKToRASMatrix)
    if world:
        to_ras = _to_world(node) @ to_ras
    columns = to_ras[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = _LPS @ (columns / spacing)
    return spacing.tolist(), (_LPS @ to_ras[:3, 3]).tolist(), direction.ravel().tolist()


def _matrix(getter) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    getter(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_world(node) -> np.ndarray:
    """The node's parent transform to world as a 4x4 matrix (identity without one)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise AbdomenSegError(
            f"the volume '{node.GetName()}' is under the non-linear transform '{transform.GetName()}'",
            "harden the transform on the volume first (Data module: right-click the volume, 'Harden transform')",
        )
    return _matrix(transform.GetMatrixTransformToWorld)


def ijk_to_ras(image: sitk.Image) -> vtk.vtkMatrix4x4:
    """The IJK-to-RAS matrix of a volume node that holds `image` with its exact geometry."""
    direction = _LPS @ np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    origin = _LPS @ np.array(image.GetOrigin())
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c])
        matrix.SetElement(r, 3, origin[r])
    return matrix


def labelmap_node_from_image(
    scene, image: sitk.Image, name="AbdomenSeg labels", node_class="vtkMRMLLabelMapVolumeNode"
):
    """A volume node (labelmap by default, or `node_class`) holding `image` with its exact geometry."""
    slicer = _slicer()
    node = scene.AddNewNodeByClass(node_class, name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    node.SetIJKToRASMatrix(ijk_to_ras(image))
    return node


# -- segmentation nodes -----------------------------------------------------------------------
def slicer_translate():
    """slicer.i18n.translate where Slicer's application runs (it calls slicer.app.translate), else None (English)."""
    try:
        from slicer import app  # noqa: F401  (absent outside the application, e.g. slicer-core)
        from slicer.i18n import translate
    except ImportError:
        return None
    return translate


def display_name(organ) -> str:
    """The organ's segment name in the user's language (organs.translated_display_names)."""
    from AbdomenSegLib.core.organs import translated_display_names

    return translated_display_names(slicer_translate())[organ.name]


def _color_table(scene, entries, name):
    """A colour table whose names Slicer uses for the imported segments ((value, name, rgb) entries)."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.HideFromEditorsOn()
    table.SetNumberOfColors(max(v for v, _, _ in entries) + 1)
    table.SetColor(0, "Background", 0, 0, 0, 0)
    for value, label, rgb in entries:
        table.SetColor(value, label, *rgb, 1.0)
    return table


def import_labels(scene, labels: sitk.Image, segmentation_node, reference_volume=None, prefix=""):
    """Add one segment per organ present in `labels` (our organ table) to `segmentation_node`."""
    slicer = _slicer()
    array = sitk.GetArrayViewFromImage(labels)
    present = np.flatnonzero(np.bincount(array.ravel(), minlength=1)) if array.dtype.kind == "u" else np.unique(array)
    values = [int(v) for v in present if int(v) in BY_LABEL]
    if not values:
        return []  # nothing to import; creating the helper nodes would only leave strays behind
    # Only the organs' bounding box travels to Slicer: it lies on the same voxel grid (an index shift of the
    # origin), so the import is exact and several times faster than importing a mostly empty 512x512xN map.
    filled = [np.flatnonzero(array.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]  # z, y, x
    start = [int(f[0]) for f in reversed(filled)]
    size = [int(f[-1]) + 1 - s for f, s in zip(reversed(filled), start)]
    labelmap = labelmap_node_from_image(scene, sitk.RegionOfInterest(labels, size, start), "AbdomenSeg import")
    if reference_volume is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segmentation = segmentation_node.GetSegmentation()
    representation = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    source = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    if source() != representation:  # a node whose segments are made of surfaces: Slicer's import converts
        try:
            return _import_through_slicer(scene, labelmap, values, segmentation_node, prefix)
        finally:
            _remove_with_display(scene, labelmap)
    # One labelmap shared by the organs' segments, each its own label value: the layout Slicer's
    # ImportLabelmapToSegmentationNode makes, built directly (that call took 0.65 s for a 512x512x200 CT's organs,
    # this a fraction of it; the voxels are the same, Testing/test_slicer_logic.py checks the round trip).
    shared_map = slicer.vtkOrientedImageData()
    shared_map.ShallowCopy(labelmap.GetImageData())
    to_world = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(to_world)
    shared_map.SetImageToWorldMatrix(to_world)
    _remove_with_display(scene, labelmap)
    new_ids = []
    for value in values:
        organ = BY_LABEL[value]
        segment = slicer.vtkSegment()
        segment.SetName(prefix + display_name(organ))
        segment.SetColor(*organ.color_float)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetLabelValue(value)
        segment.AddRepresentation(representation, shared_map)
        segment.SetTag(segment.GetTerminologyEntryTagName(), organ.terminology_entry())
        segment_id = segmentation.GenerateUniqueSegmentID(prefix + display_name(organ))
        if not segmentation.AddSegment(segment, segment_id):
            raise AbdomenSegError("Slicer could not add the organ segments", "see the Python console for details")
        new_ids.append(segment_id)
    return new_ids


def _import_through_slicer(scene, labelmap, values, segmentation_node, prefix) -> list:
    """Slicer's own labelmap import (names from a colour table), then our names, colours and terminology."""
    slicer = _slicer()
    table = _color_table(
        scene, [(v, prefix + BY_LABEL[v].display_name, BY_LABEL[v].color_float) for v in values], "AbdomenSeg organs"
    )
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    before = set(segment_ids(segmentation_node))
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise AbdomenSegError("Slicer could not import the organ label map", "see the Python console for details")
    finally:
        scene.RemoveNode(table)
    new_ids = [i for i in segment_ids(segmentation_node) if i not in before]
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in new_ids:
        segment = segmentation.GetSegment(segment_id)
        organ = organ_from_name(segment.GetName()[len(prefix) :])
        if organ is None:
            continue
        segment.SetName(prefix + display_name(organ))
        segment.SetColor(*organ.color_float)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(segment.GetTerminologyEntryTagName(), organ.terminology_entry())
    return new_ids


def dicom_modality(volume_node) -> str:
    """The DICOM Modality (0008,0060) of a volume loaded from Slicer's DICOM database ("" when not from DICOM):
    the volume's "DICOM.instanceUIDs" attribute, looked up in the database; a "DICOM.Modality" attribute wins."""
    direct = volume_node.GetAttribute("DICOM.Modality") if volume_node is not None else None
    if direct:
        return direct.strip()
    uids = ((volume_node.GetAttribute("DICOM.instanceUIDs") if volume_node is not None else None) or "").split()
    if not uids:
        return ""
    try:
        import slicer

        database = slicer.dicomDatabase
        return (database.fileValue(database.fileForInstance(uids[0]), "0008,0060") or "").strip()
    except Exception:  # noqa: BLE001 - no database (a script, a test), a removed file: unknown
        return ""


def segment_ids(segmentation_node) -> list:
    """The segment IDs of a segmentation node, in order."""
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def terminology_entry_of(segment) -> str:
    """The segment's terminology entry string, "" if none. The tag's name comes from
    vtkSegment::GetTerminologyEntryTagName() (vtkSegment.h:52 at Slicer v5.6.2 and v5.10.0); GetTerminology()
    exists only from 5.10."""
    entry = vtk.reference("")
    if segment.GetTag(segment.GetTerminologyEntryTagName(), entry):
        return str(entry)
    return ""


def segment_organ(segment):
    """Our organ for a Slicer segment: by terminology code first, then by name."""
    return organ_from_terminology(terminology_entry_of(segment)) or organ_from_name(segment.GetName())


ORGANS_ATTRIBUTE = "AbdomenSeg.organs"


def _source_organs(segmentation_node) -> list:
    """The organs a segmentation's source segments: its model's (our nodes name their model), else its segments'
    organs (a TotalSegmentator or manual segmentation), in our organ table's order."""
    from AbdomenSegLib.core.organs import ORGANS

    name = segmentation_node.GetAttribute("AbdomenSeg.model")
    organs = set(filter(None, (segmentation_node.GetAttribute(ORGANS_ATTRIBUTE) or "").split(",")))
    if name and not organs:
        from AbdomenSegLib.models.packages import find_model

        try:
            organs = {o for part in name.split("+") for o in find_model(part.split(">")[0])["labels"].values()}
        except AbdomenSegError:
            organs = set()
    if not organs:
        segmentation = segmentation_node.GetSegmentation()
        for segment_id in segment_ids(segmentation_node):
            organ = segment_organ(segmentation.GetSegment(segment_id))
            if organ is not None:
                organs.add(organ.name)
    return [o.name for o in ORGANS if o.name in organs]


def segmentation_to_labels(scene, segmentation_node, reference_volume) -> sitk.Image:
    """Matched segments of any segmentation node as one label map (our table) in the reference grid."""
    slicer = _slicer()
    organ_ids = {}
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segment_ids(segmentation_node):
        organ = segment_organ(segmentation.GetSegment(segment_id))
        if organ is not None and organ.label not in organ_ids:
            organ_ids[organ.label] = segment_id
    out = np.zeros(slicer.util.arrayFromVolume(reference_volume).shape, dtype=np.uint8)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AbdomenSeg export")
    try:
        for label, segment_id in organ_ids.items():
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
            )
            mask = slicer.util.arrayFromVolume(labelmap) > 0
            out[mask & (out == 0)] = label
    finally:
        _remove_with_display(scene, labelmap)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(volume_node_to_image(reference_volume))
    return image


def _remove_with_display(scene, labelmap) -> None:
    """Remove a helper labelmap with the display and colour nodes made for it. ExportSegmentsToLabelmapNode gives a
    labelmap without a User colour table a new one, '<segmentation>_ColorTable' (made unique), with the attribute
    Category=Segmentations, added to the scene (Modules/Loadable/Segmentations/Logic/
    vtkSlicerSegmentationsModuleLogic.cxx:1235-1245, :1044-1075 @ v5.10.0): left there, each comparison or batch case
    would leave one behind."""
    display = labelmap.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    if colors is not None and colors.GetType() == colors.User and colors.GetAttribute("Category") == "Segmentations":
        scene.RemoveNode(colors)
    if display is not None:
        scene.RemoveNode(display)
    scene.RemoveNode(labelmap)


def reference_to_labels(scene, reference_node, geometry_volume, convention=FROM_COLOR_NAMES) -> sitk.Image:
    """A reference in our organ table: a segmentation node in the geometry volume's grid, a labelmap in its own grid
    (checked to overlap the volume's), so that `evaluate` scores it inside its field of view only (issue 31: a
    labelmap over part of the volume, resampled here, made the prediction's voxels outside it false positives).

    Segmentation nodes are matched segment by segment (terminology, then name). A labelmap's numbers
    mean nothing by themselves: BTCV's 1 is the spleen, ours the liver. They are read by the names in
    its colour table (`FROM_COLOR_NAMES`, the default), or in the dataset convention the user names; where the
    table names no organ, the convention its values and organs' places fit (evaluation/conventions.py), refused when
    none or several fit. Values the convention does not define are refused.
    """
    from AbdomenSegLib.core.organs import convert_labels
    from AbdomenSegLib.evaluation.metrics import _check_label_map, align_reference

    if reference_node.IsA("vtkMRMLSegmentationNode"):
        return segmentation_to_labels(scene, reference_node, geometry_volume)
    if reference_node.GetTransformNodeID() != geometry_volume.GetTransformNodeID():
        raise AbdomenSegError(
            f"the reference '{reference_node.GetName()}' and the volume '{geometry_volume.GetName()}' are under "
            "different transforms, so a voxel of one is not the same place in the other",
            "harden the transforms (Data module: right-click, 'Harden transform') or put both under the same one",
        )
    image = volume_node_to_image(reference_node)
    raw = sitk.GetArrayViewFromImage(image)
    array = _labels_by_color_names(reference_node, raw) if convention == FROM_COLOR_NAMES else None
    if array is None:  # named, or detected from its values and organs' places (evaluation/conventions.py)
        from AbdomenSegLib.evaluation.conventions import resolve_convention

        convention = resolve_convention(
            image, None if convention == FROM_COLOR_NAMES else convention, "reference", "the reference labels choice"
        )
        _check_label_map(image, "reference", convention)
        array = convert_labels(raw, convention)
    converted = sitk.GetImageFromArray(array)
    converted.CopyInformation(image)
    align_reference(converted, volume_node_to_image(geometry_volume))  # refuses a reference elsewhere in space
    return converted


def _labels_by_color_names(labelmap_node, raw: np.ndarray) -> np.ndarray | None:
    display = labelmap_node.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    values = [int(v) for v in np.unique(raw) if v > 0]
    lut = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint8)
    named = {}
    for value in values:
        organ = organ_from_name(colors.GetColorName(value)) if colors is not None else None
        if organ is not None:
            lut[value] = organ.label
            named[value] = organ.name
    if not named:  # the colour table names no organ: the caller names or detects the convention
        return None
    out = np.zeros(raw.shape, dtype=np.uint8)
    inside = (raw > 0) & (raw < len(lut))
    out[inside] = lut[raw[inside].astype(np.int64)]
    return out


# -- tables and plots -------------------------------------------------------------------------
COLUMN_TITLES = {
    "organ": "Organ",
    "status": "Status",
    "dice": "Dice",
    "iou": "IoU",
    "hd95_mm": "HD95",
    "assd_mm": "ASSD",
    "surface_dice": "Surface Dice",
    "volume_pred_ml": "Volume",
    "volume_ref_ml": "Reference volume",
    "volume_diff_ml": "Volume difference",
    "outside_reference_ml": "Outside reference",
    "model": "Model",
    "confidence": "Confidence",
    "mean": "Mean",
    "sd": "SD",
    "median": "Median",
    "pieces": "Pieces",
    "at_border": "At image border",
    "flags": "Result check",
}


INTENSITY_DESCRIPTIONS = {
    "mean": "Mean intensity of the volume under the organ (HU for CT), as Segment Statistics gives it",
    "sd": "Standard deviation of the intensity under the organ",
    "median": "Median intensity under the organ",
}


def rows_to_table(scene, rows, name, columns=None):
    """A vtkMRMLTableNode with one row per entry; numeric columns typed, units and descriptions set."""
    columns = columns or [
        "organ",
        "status",
        "dice",
        "iou",
        "hd95_mm",
        "assd_mm",
        "surface_dice",
        "volume_pred_ml",
        "volume_ref_ml",
        "volume_diff_ml",
        "outside_reference_ml",
    ]
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    for key in columns:
        # None: no value (an organ outside the region both grids cover has no Dice): NaN in a numeric column
        present = [row.get(key) for row in rows if row.get(key) is not None]
        numeric = bool(present) and isinstance(present[0], (int, float)) and not isinstance(present[0], bool)
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(COLUMN_TITLES.get(key, key))
        for row in rows:
            value = row.get(key)
            array.InsertNextValue(
                (float("nan") if value is None else float(value)) if numeric else ("" if value is None else str(value))
            )
        table.AddColumn(array)
    for key in columns:
        unit, description = METRIC_UNITS.get(key, ("", ""))
        title = COLUMN_TITLES.get(key, key)
        if unit:
            table_node.SetColumnUnitLabel(title, unit)
        if description:
            table_node.SetColumnDescription(title, description)
    table_node.Modified()
    return table_node


def table_column(table_node, title):
    array = table_node.GetTable().GetColumnByName(title)
    if array is None:
        return None
    return [array.GetValue(i) for i in range(array.GetNumberOfValues())]


def save_table(scene, table_node, path):
    """Write a table node with Slicer's own storage node (.csv or .tsv by extension)."""
    storage = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    storage.SetFileName(str(path))
    try:
        if not storage.WriteData(table_node):
            raise AbdomenSegError(f"could not write the table to '{path}'", "check that the folder is writable")
    finally:
        scene.RemoveNode(storage)


def dice_bar_chart(scene, comparison_rows, name="Dice per organ"):
    """Bar chart: Dice per organ, one series per model (rows from compare_models)."""
    models = sorted({r["model"] for r in comparison_rows})
    organs = [o for o in BY_NAME if any(r["organ"] == o for r in comparison_rows)]
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name + " data")
    table = table_node.GetTable()
    index = vtk.vtkDoubleArray()
    index.SetName("Index")
    labels = vtk.vtkStringArray()
    labels.SetName("Organ")
    for i, organ in enumerate(organs):
        index.InsertNextValue(i)
        labels.InsertNextValue(organ)
    table.AddColumn(index)
    table.AddColumn(labels)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle(name)
    chart.SetXAxisTitle("Organ")
    chart.SetYAxisTitle("Dice")
    for model in models:
        column = vtk.vtkDoubleArray()
        column.SetName(model)
        by_organ = {r["organ"]: r["dice"] for r in comparison_rows if r["model"] == model}
        for organ in organs:
            column.InsertNextValue(float(by_organ.get(organ, 0.0)))
        table.AddColumn(column)
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", model)
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("Index")
        series.SetYColumnName(model)
        series.SetLabelColumnName("Organ")
        series.SetPlotType(series.PlotTypeBar)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    table_node.Modified()
    return chart, table_node


def qc_report(segmentation_node) -> dict | None:
    """The result check stored on a segmentation node by AbdomenSeg, or None."""
    text = segmentation_node.GetAttribute(QC_ATTRIBUTE)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def qc_messages(report: dict | None) -> tuple:
    """(warnings, notes) of a stored report as '<problem>. <fix>' texts, for the panel."""
    if not report:
        return [], []
    text = lambda f: f"{f['problem']}. {f['fix']}"  # noqa: E731
    return [text(f) for f in report.get("warnings", [])], [text(f) for f in report.get("notes", [])]


def _place_beside(scene, node, volume_node):
    """Put `node` under the same Data-tree parent (patient/study) as the volume, as TotalSegmentator does."""
    hierarchy = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    parent = hierarchy.GetItemParent(volume_item) if volume_item else 0
    if not parent:
        return
    # Real Slicer gives every new data node an item (its subject hierarchy plugins do); bare MRML does not.
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)


# -- the logic the module exposes ---------------------------------------------------------------
class AbdomenSegCore:
    """Blocking, popup-free operations on a MRML scene; the Slicer logic class delegates here."""

    def __init__(self, scene, log: LogCallback = print):
        self.scene, self.log = scene, log

    def segment(
        self,
        volume_node,
        model=None,
        device="auto",
        organs=None,
        segmentation_node=None,
        replace_existing=False,
        largest_component="model",
        fill_holes=False,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        tta=False,
        quality="standard",
    ):
        """Segment `volume_node` in this process (blocking; scripts and tests); returns the segmentation
        node (a new one unless one is given). The panel runs the same steps with the network in a
        background process (`background.SegmentationProcess`): `prepare`, then `import_result`.
        `quality` "high": the model's fine second stage re-segments the small organs' region (cascade.py).

        An existing segmentation's segments are never replaced unless `replace_existing` is True.
        """
        from AbdomenSegLib.inference.cascade import made_by
        from AbdomenSegLib.inference.predictor import get_segmenter
        from AbdomenSegLib.inference.segmenter import Options
        from AbdomenSegLib.models.choice import resolve
        from AbdomenSegLib.qc.outputs import assess_result
        from AbdomenSegLib.qc.statistics import intensity_unit

        image = self.prepare(volume_node, organs, segmentation_node, replace_existing)
        if model is None:  # no model named: an MR volume gets the recommended MR model, said on one line
            model, line = self.model_for_volume(volume_node, image)
            if line:
                self.log(line)
        card = resolve(model, tta, quality=quality)  # a choice the engine refuses fails before any network loads
        segmenter = get_segmenter(card, device, log=self.log, quality=quality)
        options = Options(organs=organs, largest_component=largest_component, fill_holes=fill_holes, tta=tta)
        labels = segmenter.segment(image, options, progress=progress, cancel=cancel)
        name = made_by(segmenter)[0]  # a two-stage run: "first>fine"
        report = assess_result(segmenter, labels, options, image).as_dict(
            model=name, modality=segmenter.card["modality"], intensity_unit=intensity_unit(segmenter.card["modality"])
        )
        self.last_labels = labels
        node = self.import_result(
            volume_node,
            labels,
            segmentation_node,
            model=name,
            device=segmenter.device,
            organs=organs,
            qc=report,
        )
        # what the run segments (found or not): a comparison scores these (`_source_organs`)
        node.SetAttribute(ORGANS_ATTRIBUTE, ",".join(organs or segmenter.card["labels"].values()))
        return node

    def model_for_volume(self, volume_node, image=None) -> tuple:
        """(model name, line to show) for a volume when the user has not chosen a model: an MR volume (its DICOM
        Modality, or values that fail the CT check the way MR does) gets the recommended MR model, anything else
        the default; the same rule as the command line (models/choice.py)."""
        from AbdomenSegLib.models.choice import model_for_image

        image = image if image is not None else volume_node_to_image(volume_node, world=False)
        return model_for_image(image, dicom_modality(volume_node))

    def prepare(self, volume_node, organs=None, segmentation_node=None, replace_existing=False) -> sitk.Image:
        """Check what a run needs before any work and return the volume as an image where it lies (its
        parent transform applied)."""
        if volume_node is None:
            raise AbdomenSegError("no input volume selected", "select the CT or MR volume to segment")
        if organs is not None and not list(organs):
            raise AbdomenSegError("no organ is selected", "check at least one organ to segment")
        if (
            segmentation_node is not None
            and segmentation_node.GetSegmentation().GetNumberOfSegments()
            and not replace_existing
        ):
            raise AbdomenSegError(
                f"segmentation '{segmentation_node.GetName()}' already has segments",
                "choose a new segmentation, or confirm replacing its segments",
            )
        return volume_node_to_image(volume_node, world=True)

    def import_result(
        self,
        volume_node,
        labels: sitk.Image,
        segmentation_node=None,
        *,
        model: str,
        device: str,
        organs=None,
        qc: dict | None = None,
    ):
        """The engine's label map as segments of a segmentation node beside the volume.

        The labels lie on the volume's own voxel grid; the node gets the volume's parent transform and its
        place in the Data tree (the volume's study), so both are shown and stored together. An empty
        result changes nothing and raises the message the result check gives.
        """
        from AbdomenSegLib.qc.check import assess

        if not np.any(sitk.GetArrayViewFromImage(labels)):
            flag = assess(labels, asked=organs).warnings[0]
            raise AbdomenSegError(flag.problem, flag.fix)
        local = sitk.Image(labels)
        spacing, origin, direction = volume_node_geometry(volume_node)
        local.SetSpacing(spacing)
        local.SetOrigin(origin)
        local.SetDirection(direction)
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{volume_node.GetName()} organs ({model})"
            )
        else:
            segmentation_node.GetSegmentation().RemoveAllSegments()
        # The import maps the labelmap (no transform) into the segmentation's frame: with a transform still on a
        # reused node it would apply the inverse, and the result would land where the volume is stored, not shown.
        segmentation_node.SetAndObserveTransformNodeID(None)
        segmentation_node.CreateDefaultDisplayNodes()
        import_labels(self.scene, local, segmentation_node, reference_volume=volume_node)
        segmentation_node.SetNodeReferenceID(
            segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID()
        )
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation_node.SetAttribute("AbdomenSeg.model", model)
        segmentation_node.SetAttribute("AbdomenSeg.device", device)
        if qc is not None:  # the result check travels with the node (and is saved with the scene)
            segmentation_node.SetAttribute(QC_ATTRIBUTE, json.dumps(qc))
        _place_beside(self.scene, segmentation_node, volume_node)
        return segmentation_node

    def organ_volumes(self, segmentation_node, volume_node, name=None):
        """Table of organ volumes (mL) with the result check's columns (confidence, pieces, image border,
        flags), counted in the volume's grid; a segmentation without a stored report is checked now."""
        from AbdomenSegLib.qc.check import assess

        # The engine's report (stored on the node at import) already holds every column; exporting the
        # segments back to a label map costs seconds on a 512x512x300 scan and is done only without one.
        report = qc_report(segmentation_node)
        organs = (report or {}).get("organs", {})
        if not report or any(o.get("mean") is None for o in organs.values()):
            # No stored report, or one from before the intensity statistics: the check (and the statistics
            # under each organ, in the volume's grid) now.
            labels = segmentation_to_labels(self.scene, segmentation_node, volume_node)
            image = volume_node_to_image(volume_node)
            fresh = assess(labels, image=image).as_dict()
            if report:
                for organ_name, organ in organs.items():
                    for stat in ("mean", "sd", "median"):
                        organ[stat] = fresh["organs"].get(organ_name, {}).get(stat)
            else:
                report = fresh
        flags = {}
        for flag in report.get("warnings", []) + report.get("notes", []):
            flags.setdefault(flag.get("organ"), []).append(flag["code"])
        nan = float("nan")
        rows = []
        for organ_name, organ in report.get("organs", {}).items():
            confidence = organ.get("confidence")
            rows.append(
                {
                    "organ": organ_name,
                    "volume_pred_ml": float(organ["volume_ml"]),
                    "mean": nan if organ.get("mean") is None else float(organ["mean"]),
                    "sd": nan if organ.get("sd") is None else float(organ["sd"]),
                    "median": nan if organ.get("median") is None else float(organ["median"]),
                    "confidence": nan if confidence is None else float(confidence),
                    "pieces": float(organ.get("pieces", 1)),
                    "at_border": ", ".join(organ.get("at_border", [])),
                    "flags": ", ".join(flags.get(organ_name, [])),
                }
            )
        order = list(BY_NAME)
        rows.sort(key=lambda r: order.index(r["organ"]))
        table = rows_to_table(
            self.scene,
            rows,
            name or f"{segmentation_node.GetName()} volumes",
            ["organ", "volume_pred_ml", "mean", "sd", "median", "confidence", "pieces", "at_border", "flags"],
        )
        unit = report.get("intensity_unit")
        if unit is None:  # a report from before the unit was stored: HU when the volume holds CT values
            unit = "HU" if str(report.get("modality", "")).upper() == "CT" else ""
        for key in ("mean", "sd", "median"):
            if unit:
                table.SetColumnUnitLabel(COLUMN_TITLES[key], unit)
            table.SetColumnDescription(COLUMN_TITLES[key], INTENSITY_DESCRIPTIONS[key])
        return table

    def compare_with_reference(
        self,
        segmentation_node,
        reference_node,
        volume_node=None,
        tolerance_mm=2.0,
        reference_convention=FROM_COLOR_NAMES,
        review=False,
        name=None,
    ):
        """Per-organ metrics table (all organs at once); optional TP/FP/FN review segments."""
        volume_node = volume_node or self._geometry_volume(segmentation_node)
        prediction = segmentation_to_labels(self.scene, segmentation_node, volume_node)
        reference = reference_to_labels(self.scene, reference_node, volume_node, reference_convention)
        organs = sorted(
            {int(v) for v in np.unique(sitk.GetArrayViewFromImage(reference)) if v}
            | {int(v) for v in np.unique(sitk.GetArrayViewFromImage(prediction)) if v}
        )
        if not organs:
            raise AbdomenSegError(
                "neither the segmentation nor the reference holds a known organ",
                "name reference segments like the organs (e.g. 'liver', 'Right kidney')",
            )
        rows = evaluate(
            prediction,
            reference,
            organs=[BY_LABEL[v].name for v in organs],
            tolerance_mm=tolerance_mm,
            case=volume_node.GetName(),
            model=segmentation_node.GetAttribute("AbdomenSeg.model") or "",
        )
        table = rows_to_table(self.scene, rows, name or f"{segmentation_node.GetName()} vs {reference_node.GetName()}")
        if review:  # voxel by voxel in the volume's grid, inside the reference's field of view only
            from AbdomenSegLib.evaluation.metrics import align_reference, field_of_view

            covered = field_of_view(reference, prediction)
            shown = prediction
            if covered is not None:
                shown = sitk.GetImageFromArray(np.where(covered, sitk.GetArrayViewFromImage(prediction), 0))
                shown.CopyInformation(prediction)
            reference = align_reference(reference, prediction)
            self.review_segments(shown, reference, volume_node, f"{segmentation_node.GetName()} review")
        return table

    def review_segments(self, prediction: sitk.Image, reference: sitk.Image, volume_node, name):
        """Per-organ true positive (yellow), false positive (green), false negative (red) segments."""
        p, r = sitk.GetArrayViewFromImage(prediction), sitk.GetArrayViewFromImage(reference)
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        kinds = (
            ("true positive", (1.0, 1.0, 0.0)),
            ("false positive", (0.0, 0.8, 0.0)),
            ("false negative", (1.0, 0.0, 0.0)),
        )
        for value in sorted({int(v) for v in np.unique(p) if v} | {int(v) for v in np.unique(r) if v}):
            organ = BY_LABEL[value]
            masks = ((p == value) & (r == value), (p == value) & (r != value), (p != value) & (r == value))
            for (kind, color), mask in zip(kinds, masks):
                if not mask.any():
                    continue
                image = sitk.GetImageFromArray(mask.astype(np.uint8))
                image.CopyInformation(prediction)
                labelmap = labelmap_node_from_image(self.scene, image, "review")
                table = _color_table(self.scene, [(1, f"{display_name(organ)} {kind}", color)], "review colours")
                labelmap.CreateDefaultDisplayNodes()
                labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
                _slicer().vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
                _remove_with_display(self.scene, labelmap)
                self.scene.RemoveNode(table)
        # The masks lie on the volume's own grid (segmentation_to_labels): the node must sit under the volume's
        # transform, as the organ segments do (import_result), or a moved volume's review lands beside its organs.
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        _place_beside(self.scene, node, volume_node)
        return node

    def compare_models(
        self,
        volume_node,
        models,
        device="auto",
        reference_node=None,
        reference_convention=FROM_COLOR_NAMES,
        tolerance_mm=2.0,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        existing: dict | None = None,
    ):
        """Run several models on one volume: segmentation per model, one table, a Dice bar chart. `existing`
        {column name: segmentation node} adds segmentations already in the scene (a TotalSegmentator result, a
        manual one) as more columns, scored the same way."""
        segmentations = {}
        for index, model in enumerate(models):

            def step(fraction, message, _i=index, _m=model):
                if progress:
                    progress((_i + fraction) / len(models), f"{_m}: {message}")

            node = self.segment(volume_node, model=model, device=device, progress=step, cancel=cancel)
            segmentations[node.GetAttribute("AbdomenSeg.model")] = node  # the card's name, also for a path
        for name, node in (existing or {}).items():
            if name in segmentations:
                raise AbdomenSegError(f"two columns are named '{name}'", "give the existing segmentation another name")
            segmentations[name] = node
        table, chart = self.model_comparison(
            volume_node, segmentations, reference_node, reference_convention, tolerance_mm
        )
        return segmentations, table, chart

    def model_comparison(
        self,
        volume_node,
        segmentations: dict,
        reference_node=None,
        reference_convention=FROM_COLOR_NAMES,
        tolerance_mm=2.0,
    ):
        """Table (and, with a reference, a Dice bar chart) of model name -> segmentation node results."""
        rows = []
        reference = (
            reference_to_labels(self.scene, reference_node, volume_node, reference_convention)
            if reference_node is not None
            else None
        )
        in_reference = (
            {BY_LABEL[int(v)].name for v in np.unique(sitk.GetArrayViewFromImage(reference)) if v}
            if reference is not None
            else set()
        )
        for model, node in segmentations.items():
            if reference is not None:
                from AbdomenSegLib.evaluation.reports import case_check

                prediction = segmentation_to_labels(self.scene, node, volume_node)
                # scored on the organs its source segments and the reference holds: an organ the model or tool
                # does not segment is no miss (issue 27: TotalSegmentator's bladder against our models)
                organs = [o for o in _source_organs(node) if o in in_reference]
                warnings = case_check(prediction, "abdomenseg", organs)[0]  # every column gets the result check
                rows += [
                    dict(row, flags=" | ".join(warnings))
                    for row in evaluate(prediction, reference, tolerance_mm=tolerance_mm, model=model, organs=organs)
                ]
            else:
                table = self.organ_volumes(node, volume_node)
                names, volumes = table_column(table, "Organ"), table_column(table, "Volume")
                self.scene.RemoveNode(table)
                rows += [
                    {"model": model, "organ": o, "volume_pred_ml": v, "dice": float("nan")}
                    for o, v in zip(names, volumes)
                ]
        columns = (
            [
                "model",
                "organ",
                "status",
                "dice",
                "iou",
                "hd95_mm",
                "surface_dice",
                "volume_pred_ml",
                "volume_ref_ml",
                "volume_diff_ml",
                "flags",
            ]
            if reference is not None
            else ["model", "organ", "volume_pred_ml"]
        )
        table = rows_to_table(self.scene, rows, f"{volume_node.GetName()} model comparison", columns)
        chart = dice_bar_chart(self.scene, rows)[0] if reference is not None else None
        return table, chart

    def _geometry_volume(self, segmentation_node):
        node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
        if node is None:
            raise AbdomenSegError(
                f"segmentation '{segmentation_node.GetName()}' has no reference volume",
                "pass the volume the segmentation belongs to",
            )
        return node
