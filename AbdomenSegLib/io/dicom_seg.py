"""DICOM Segmentation objects (SEG): organ label maps out to PACS, and SEG references in for `evaluate`.

Writing (`write_dicom_seg`): a BINARY Segmentation made with highdicom from the label map and the headers of the
DICOM series it was segmented from. Each frame references its source slice (Derivation Image Sequence) and carries
that slice's own Image Position (Patient); empty frames are left out (highdicom's `omit_empty_frames`), so a SEG is
about as large as the organs it holds. One segment per organ present, described as Slicer's terminology does
(organs.py): category SCT 123037004 "Anatomical Structure", the organ's SNOMED CT type code plus, for paired
organs, its laterality modifier; the organ's display name as the segment label and its colour as the recommended
display CIELab value. Every segment names the algorithm: family DCM 123110 "Artificial Intelligence", the model's
name, its card version (or the first 12 hex digits of its weights' sha256) and, as Algorithm Parameters,
`sha256=<full digest>`.

BINARY, not LABELMAP: LABELMAP segmentations are new (DICOM 2024) and readers such as dcmqi (3D Slicer's
QuantitativeReporting) do not take them; BINARY is what every SEG reader handles.

A label map with no organ has no SEG: the standard requires at least one segment (Segment Sequence, type 1, one or
more items), so the writer refuses instead of writing an invalid or misleadingly "empty-segment" file.

Reading (`read_dicom_seg`): segments are matched to our organs by their codes (any list that uses SNOMED CT's
anatomical structure codes: Slicer, DICOM master list, TotalSegmentator), then by segment label or code meaning
(so older SEGs coded in SNOMED RT, e.g. dcmqi's examples, are read too). Segments that are none of our organs
(tumours, bones) are left out. The label map spans the frames the SEG holds, in the SEG's own slice grid; give a
`reference` image (or the source series folder) to get it in that exact grid instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import ANATOMICAL_STRUCTURE, BY_LABEL, organ_from_name, organ_from_terminology

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
AI_FAMILY = ("123110", "DCM", "Artificial Intelligence")  # CID 7162 Surgical/Segmentation Algorithm Family
# Newer DICOM editions code "Anatomical Structure" as SCT 91723000; Slicer's lists (and ours) use 123037004.
_ANATOMICAL_CATEGORIES = {ANATOMICAL_STRUCTURE[1], "91723000"}
# A source slice may sit this far (in voxels) off the label map's grid: DS strings round positions.
_GRID_TOLERANCE = 0.05
NOT_DICOM_FIX = "write .nii.gz, .nrrd or .seg.nrrd instead"


def require_highdicom():
    try:
        import highdicom
    except ImportError:
        raise AbdomenSegError(
            "DICOM SEG files need the highdicom package, which is not installed",
            "install it (`pip install highdicom`), or use .nii.gz, .nrrd or .seg.nrrd",
        ) from None
    return highdicom


def is_dicom_file(path) -> bool:
    """A DICOM Part 10 file ("DICM" after the 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# --- writing ---------------------------------------------------------------------------------------------------


def write_dicom_seg(label_image: sitk.Image, source_folder, path, *, model=None, overwrite: bool = True) -> Path:
    """Write `label_image` (our organ labels, in the grid of the DICOM series in `source_folder`) as a DICOM SEG.

    `model`: the ModelCard (or card dict) that made the labels, for the algorithm identification. Atomic like every
    output (io.atomic_output); with `overwrite=False` an existing file is never replaced."""
    from AbdomenSegLib.io.files import atomic_output

    require_highdicom()
    path = Path(path)
    source_folder = Path(source_folder)
    array = np.asarray(sitk.GetArrayViewFromImage(label_image))
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise AbdomenSegError(
                f"the label map holds values outside 0-255 ({array.min()}..{array.max()})",
                f"only organ labels can go into a DICOM SEG; {NOT_DICOM_FIX}",
            )
        array = array.astype(np.uint8)
    present = [int(v) for v in np.flatnonzero(np.bincount(array.ravel(), minlength=1))] if array.size else []
    present = [v for v in present if v != 0]
    unknown = [v for v in present if v not in BY_LABEL]
    if unknown:
        raise AbdomenSegError(
            f"the label map holds values {unknown} that are no organ of AbdomenSeg's table",
            f"only organ labels can go into a DICOM SEG; {NOT_DICOM_FIX}",
        )
    if not present:
        raise AbdomenSegError(
            f"no organ was found in '{source_folder}', and a DICOM SEG must hold at least one segment, so "
            f"'{path.name}' was not written",
            "check the input (is it the abdomen, CT or MR as the model expects?); to keep the empty result, "
            "write .nii.gz, .nrrd or .seg.nrrd instead",
        )
    datasets = _source_datasets(source_folder)
    ordered = _order_by_slice(datasets, label_image, source_folder)
    segment_of = np.zeros(256, dtype=np.uint8)
    for number, value in enumerate(present, start=1):
        segment_of[value] = number
    pixels = segment_of[array]
    seg = _build(ordered, pixels, present, model, source_folder)
    with atomic_output(path, ".dcm", overwrite=overwrite) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
        _check_written(tmp, path, len(present))
    return path


def _series_files(folder: Path) -> list:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        raise AbdomenSegError(
            f"folder '{folder}' holds {len(series)} DICOM series, not one",
            "give the folder that holds the one series the labels were made from",
        )
    return list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _source_datasets(folder: Path) -> list:
    import pydicom

    datasets = []
    for name in _series_files(folder):
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, force=True)
        except Exception as exc:  # pydicom raises many types on damaged files
            raise AbdomenSegError(
                f"'{name}' could not be read as DICOM ({exc})", "copy the series again from the scanner or PACS"
            ) from None
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise AbdomenSegError(
                f"'{Path(name).name}' is a multi-frame (enhanced) DICOM image; DICOM SEG output is made for series "
                "of single-frame slices",
                NOT_DICOM_FIX,
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SOPInstanceUID", "FrameOfReferenceUID"):
            if keyword not in ds:
                raise AbdomenSegError(
                    f"'{Path(name).name}' lacks {keyword}, which a DICOM SEG must reference", NOT_DICOM_FIX
                )
        # An empty Specific Character Set means the default repertoire; highdicom refuses the empty value.
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
        datasets.append(ds)
    return datasets


def _order_by_slice(datasets: list, label_image: sitk.Image, folder: Path) -> list:
    """The source datasets in the label map's slice order, each checked to be exactly one slice of its grid."""
    size = label_image.GetSize()
    direction = np.array(label_image.GetDirection()).reshape(3, 3)
    by_slice = {}
    for ds in datasets:
        name = Path(str(ds.filename)).name if getattr(ds, "filename", None) else ds.SOPInstanceUID
        if (int(ds.Columns), int(ds.Rows)) != tuple(size[:2]):
            raise AbdomenSegError(
                f"slice '{name}' is {ds.Columns}x{ds.Rows} pixels but the labels are " f"{size[0]}x{size[1]}",
                "give the DICOM folder the labels were segmented from",
            )
        cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
        index = label_image.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])
        k = int(round(index[2]))
        if (
            not np.allclose(cosines[:3], direction[:, 0], atol=1e-3)
            or not np.allclose(cosines[3:], direction[:, 1], atol=1e-3)
            or max(abs(index[0]), abs(index[1]), abs(index[2] - k)) > _GRID_TOLERANCE
            or not 0 <= k < size[2]
        ):
            raise AbdomenSegError(
                f"slice '{name}' of '{folder}' does not lie on the label map's grid",
                "give the DICOM folder the labels were segmented from",
            )
        if k in by_slice:
            raise AbdomenSegError(
                f"two files of '{folder}' lie on slice {k} of the label map",
                "give a folder holding one series, each slice once",
            )
        by_slice[k] = ds
    if len(by_slice) != size[2]:
        raise AbdomenSegError(
            f"'{folder}' holds {len(by_slice)} slices but the labels have {size[2]}",
            "give the DICOM folder the labels were segmented from",
        )
    return [by_slice[k] for k in range(size[2])]


def _model_identity(model) -> tuple:
    """(name, version, sha256) of the model that made the labels."""
    from AbdomenSegLib.core.version import __version__

    if model is None:
        return "AbdomenSeg", __version__, ""
    data = model.data if hasattr(model, "data") else dict(model)
    sha = str(data.get("sha256") or "")
    version = str(data.get("version") or (sha[:12] if sha else "unknown"))
    return str(data.get("name") or "AbdomenSeg"), version, sha


def _build(datasets: list, pixels: np.ndarray, present: list, model, folder: Path):
    hd = require_highdicom()
    from highdicom.sr import CodedConcept

    from AbdomenSegLib.core.version import __version__

    name, version, sha = _model_identity(model)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=name[:64],
        family=CodedConcept(*AI_FAMILY),
        version=version[:64],
        source="AbdomenSeg",
        parameters={"sha256": sha} if sha else None,
    )
    descriptions = []
    for number, value in enumerate(present, start=1):
        organ = BY_LABEL[value]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=organ.display_name,
                segmented_property_category=CodedConcept(
                    ANATOMICAL_STRUCTURE[1], ANATOMICAL_STRUCTURE[0], ANATOMICAL_STRUCTURE[2]
                ),
                segmented_property_type=CodedConcept(organ.snomed_type[1], organ.snomed_type[0], organ.snomed_type[2]),
                algorithm_type="AUTOMATIC",
                algorithm_identification=algorithm,
                tracking_id=organ.name,
                tracking_uid=hd.UID(),
                display_color=hd.color.CIELabColor.from_rgb(*organ.color),
            )
        )
    first = datasets[0]
    try:
        series_number = int(first.get("SeriesNumber") or 0) % 1_000_000 + 1000
    except (TypeError, ValueError):
        series_number = 1000
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # highdicom's remarks on the source's person names
            seg = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=pixels,
                segmentation_type="BINARY",
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="AbdomenSeg",
                manufacturer_model_name=name[:64],
                software_versions=f"AbdomenSeg {__version__}",
                device_serial_number=(sha[:16] or "none"),
                content_label="ABDOMENSEG",
                content_description=f"Abdominal organs, AbdomenSeg model {name}"[:64],
                series_description=f"AbdomenSeg {name}"[:64],
                omit_empty_frames=True,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise AbdomenSegError(
            f"the DICOM SEG could not be built from the headers of '{folder}' ({exc})", NOT_DICOM_FIX
        ) from None
    for item, value in zip(seg.SegmentSequence, present):
        modifier = BY_LABEL[value].snomed_modifier
        if modifier[1]:
            item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                CodedConcept(modifier[1], modifier[0], modifier[2])
            ]
    return seg


def _check_written(tmp, path: Path, segments: int) -> None:
    """Read the written file's header back before it takes its name."""
    import pydicom

    try:
        ds = pydicom.dcmread(tmp, stop_before_pixels=True)
        ok = ds.SOPClassUID == SEG_SOP_CLASS and len(ds.SegmentSequence) == segments and int(ds.NumberOfFrames) > 0
    except Exception:  # noqa: BLE001 - any failure to read it back is a broken file
        ok = False
    if not ok:
        raise AbdomenSegError(f"the DICOM SEG written to '{path}' does not read back", "report this as a bug")


# --- reading ---------------------------------------------------------------------------------------------------


def is_dicom_seg(path) -> bool:
    import pydicom

    try:
        return (
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID == SEG_SOP_CLASS
        )
    except Exception:  # noqa: BLE001
        return False


def _code(item, keyword) -> tuple:
    sequence = item.get(keyword)
    if not sequence:
        return ("", "", "")
    code = sequence[0]
    return (
        str(code.get("CodingSchemeDesignator", "")),
        str(code.get("CodeValue", "")),
        str(code.get("CodeMeaning", "")),
    )


def organ_of_segment(item):
    """Our organ for a SEG's Segment Sequence item, or None: by codes first, then by name."""
    category = _code(item, "SegmentedPropertyCategoryCodeSequence")
    type_code = _code(item, "SegmentedPropertyTypeCodeSequence")
    types = item.get("SegmentedPropertyTypeCodeSequence") or [{}]
    modifier = _code(types[0], "SegmentedPropertyTypeModifierCodeSequence") if types[0] else ("", "", "")
    if category[0] == "SCT" and category[1] in _ANATOMICAL_CATEGORIES:
        entry = "~".join(["", "^".join(ANATOMICAL_STRUCTURE), "^".join(type_code), "^".join(modifier), "", "^^", "^^"])
        organ = organ_from_terminology(entry)
        if organ is not None:
            return organ
    for name in (str(item.get("SegmentLabel", "")), f"{modifier[2]} {type_code[2]}".strip()):
        organ = organ_from_name(name) if name else None
        if organ is not None:
            return organ
    return None


def read_dicom_seg(path, reference=None) -> sitk.Image:
    """A DICOM SEG as a uint8 label map of our organs.

    Without `reference`: in the SEG's own grid, spanning its frames (the slices it holds organs in). With
    `reference` (a SimpleITK image: read a source DICOM folder with io.images.read_image first): in that image's exact grid; every
    organ voxel must land on one of its voxels, or the SEG does not belong to it (refused)."""
    hd = require_highdicom()
    path = Path(path)
    fix = "give a DICOM Segmentation (SEG) file, or a label map (.nii.gz, .nrrd, .seg.nrrd)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types on damaged files
        raise AbdomenSegError(f"'{path}' could not be read as a DICOM SEG ({str(exc)[:200]})", fix) from None
    kind = str(seg.SegmentationType)
    if kind not in ("BINARY", "LABELMAP"):
        raise AbdomenSegError(
            f"'{path.name}' is a {kind} segmentation (probabilities, not organ masks)",
            "give a BINARY DICOM SEG or a label map",
        )
    to_label = {}
    for item in seg.SegmentSequence:
        organ = organ_of_segment(item)
        if organ is not None:
            to_label[int(item.SegmentNumber)] = organ.label
    if not to_label:
        names = ", ".join(str(item.get("SegmentLabel", "?")) for item in seg.SegmentSequence)
        raise AbdomenSegError(
            f"none of the segments of '{path.name}' ({names}) is an organ AbdomenSeg knows",
            "give a segmentation of abdominal organs (the README lists them)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            volume = seg.get_volume(
                segment_numbers=sorted(to_label), combine_segments=True, relabel=False, dtype=np.uint16
            )
    except Exception as exc:  # noqa: BLE001
        raise AbdomenSegError(
            f"the frames of '{path.name}' do not form one volume ({str(exc)[:200]})",
            "give a SEG whose organs do not overlap and whose frames lie on one slice grid",
        ) from None
    lut = np.zeros(max(max(to_label), int(volume.array.max())) + 1, dtype=np.uint8)
    for number, label in to_label.items():
        lut[number] = label
    image = _volume_to_image(lut[volume.array], np.asarray(volume.affine, dtype=float))
    if reference is None:
        return image
    return _into_reference(image, reference, path)


def _volume_to_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """highdicom's (slice, row, column) array and affine as an ITK image, slices along the right-handed normal."""
    matrix = affine[:3, :3]
    steps = [matrix[:, 2], matrix[:, 1], matrix[:, 0]]  # x: along a row, y: down the rows, z: across slices
    spacing = [float(np.linalg.norm(s)) for s in steps]
    axes = [s / n for s, n in zip(steps, spacing)]
    origin = affine[:3, 3].astype(float)
    if array.shape[0] > 1 and float(np.dot(np.cross(axes[0], axes[1]), axes[2])) < 0:
        origin = origin + steps[2] * (array.shape[0] - 1)
        axes[2] = -axes[2]
        array = array[::-1]
    if array.shape[0] == 1:
        axes[2] = np.cross(axes[0], axes[1])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(np.stack(axes, axis=1).ravel()))
    return image


def _into_reference(image: sitk.Image, reference, path: Path) -> sitk.Image:
    placed = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    before = np.bincount(sitk.GetArrayViewFromImage(image).ravel(), minlength=256)
    after = np.bincount(sitk.GetArrayViewFromImage(placed).ravel(), minlength=256)
    if not np.array_equal(before[1:], after[1:]):
        raise AbdomenSegError(
            f"the frames of '{path.name}' do not lie on the reference image's grid",
            "give the DICOM series (or image) the segmentation was made from",
        )
    return placed
