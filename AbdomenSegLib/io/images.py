"""Reading and writing images: NIfTI, NRRD, MHA and DICOM series via SimpleITK.

Everything returns/accepts `SimpleITK.Image`, which carries the geometry (origin, spacing, direction)
that every output must reproduce exactly. Writes are atomic (temp file + rename) so an interrupted run
never leaves a half-written file that a later `--overwrite`-less run would skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core import limits
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_LABEL
from AbdomenSegLib.core.untrusted import require_regular_file
from AbdomenSegLib.io import integrity
from AbdomenSegLib.io.files import atomic_output

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_suffix(path) -> str:
    name = str(path).lower()
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return ""


def case_name(path) -> str:
    """File name without its image suffix ('case01.nii.gz' -> 'case01'); folder name for DICOM."""
    path = Path(path)
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def read_image(path, *, segmentation_ok: bool = True) -> sitk.Image:
    """Read a 3D image file or a DICOM series folder. Raises AbdomenSegError with a fix.

    The header is read and checked first (dimensions, size, spacing: `limits`), then the file's
    completeness (`integrity`), and only then the pixels, so a corrupt or absurd file costs no memory.
    A single DICOM file that is a Segmentation (SEG) is read as our organ label map (dicom_seg.py), in the
    grid of the frames it holds; `segmentation_ok=False` (inputs to segment) refuses it. A multi-frame
    (enhanced) DICOM image, given as the file or as the folder holding just it, is read frame by frame with
    its geometry checked (dicom_multiframe.py).
    """
    path = Path(path)
    if not path.exists():
        raise AbdomenSegError(f"input '{path}' does not exist", "check the path and spelling")
    if not path.is_dir():  # a FIFO would block the reader forever, a device or socket is no image
        require_regular_file(path, "input", "give an image file or a DICOM series folder")
    try:
        if path.is_dir():
            image = _read_dicom_series(path, segmentation_ok)
        elif path.name.lower().endswith(".dcm") or (not image_suffix(path) and _is_dicom_file(path)):
            image = _read_dicom_file(path, segmentation_ok)
        else:
            _check_known_type(path)
            integrity.check_readable(path)  # NIfTI-2 and a gzipped .nii named as such, not "could not be read"
            _check_header(path)
            image = _read_checked(path)
            _check_nifti_finite(path, image)
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    image = _squeeze_to_3d(image, path)
    limits.check_geometry(image.GetSize(), image.GetSpacing(), f"'{path}'")
    return image


def _unreadable(path: Path, exc: RuntimeError) -> AbdomenSegError:
    return AbdomenSegError(
        f"'{path}' could not be read as an image ({str(exc).strip().splitlines()[-1][:200]})",
        "give a NIfTI (.nii/.nii.gz), NRRD, MHA file or a folder holding one DICOM series",
    )


def check_input_header(path) -> None:
    """What an image file's header alone shows (its type, a NIfTI variant ITK cannot read, complex voxels, size and
    spacing), checked before any work such as loading the model: milliseconds, no voxel data read. Anything else,
    including what is no regular image file, is left to `read_image`."""
    path = Path(path)
    if not path.is_file() or path.name.lower().endswith(".dcm") or not image_suffix(path):
        return
    try:
        _check_known_type(path)
        integrity.check_readable(path)
        _check_header(path)
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None


def _is_dicom_file(path: Path) -> bool:
    from AbdomenSegLib.io.dicom_seg import is_dicom_file

    return is_dicom_file(path)


def _read_dicom_file(path: Path, segmentation_ok: bool) -> sitk.Image:
    """One DICOM file: a SEG is a label map, a multi-frame image a volume; a single slice is refused (a series is
    read from its folder)."""
    from AbdomenSegLib.io.dicom_multiframe import is_multiframe, read_multiframe
    from AbdomenSegLib.io.dicom_seg import is_dicom_file, is_dicom_seg, read_dicom_seg, require_highdicom

    require_highdicom()  # and with it pydicom
    if not is_dicom_file(path) and not is_dicom_seg(path):
        raise AbdomenSegError(
            f"'{path.name}' is not a DICOM file",
            "give a DICOM series folder, a DICOM SEG file or a NIfTI/NRRD/MHA image",
        )
    if not is_dicom_seg(path) and is_multiframe(path):
        return read_multiframe(path)
    if not is_dicom_seg(path):
        raise AbdomenSegError(
            f"'{path.name}' is a single DICOM file, not a DICOM segmentation (SEG)",
            "give the folder holding all slices of the DICOM series",
        )
    if not segmentation_ok:
        raise AbdomenSegError(
            f"'{path.name}' is a DICOM segmentation (SEG), not a scan",
            "give the CT or MR series folder (or image file) to segment",
        )
    return read_dicom_seg(path)


def _check_known_type(path: Path) -> None:
    """Only the formats whose completeness is checked (integrity.py) or whose readers refuse damage themselves:
    ITK also reads NIfTI/Analyze pairs (.hdr + .img) and others, and zero-fills a cut .img without a word."""
    if not image_suffix(path):
        raise AbdomenSegError(
            f"'{path.name}' is not a supported file type",
            "give a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage "
            "(.mha/.mhd) file or a folder holding one DICOM series; convert .hdr/.img pairs to .nii.gz first",
        )


def _read_checked(path: Path) -> sitk.Image:
    """ITK's pixel read with the integrity check running beside it: both decompress the file and both release
    the GIL while they do (0.29 s together instead of 0.55 s for a 512x512x200 .nii.gz). The pixels are handed
    on only after the check has passed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        check = pool.submit(integrity.check_complete, path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            check.result()  # a damaged file: its own clear message first
            raise
        check.result()  # raises AbdomenSegError: the image is dropped
    return image


def _check_nifti_finite(path: Path, image: sitk.Image) -> None:
    """A floating-point NIfTI file's NaN and infinite voxels: ITK's NIfTI reader returns them as 0 (water in HU,
    background in a label map) without a word, so a scan padded with NaN outside its field of view would be
    segmented with a block of water around it. nibabel reads the stored values, in one pass (slab by slab it
    decompresses a .nii.gz again for every slab: 25 s instead of 0.3 s for 256x256x200), for float files only (CT
    and label maps are integers almost always)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")) or image.GetPixelID() not in (
        sitk.sitkFloat32,
        sitk.sitkFloat64,
    ):
        return
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - ITK read it; a file nibabel cannot open is left to ITK's reading
        return
    if not np.issubdtype(proxy.dtype, np.floating) or len(proxy.shape) < 3:
        return
    bad = ~np.isfinite(np.asarray(proxy))
    count = int(np.count_nonzero(bad))
    if count:
        first = tuple(int(v[0]) for v in np.nonzero(bad)[:3])  # i j k in the file's order, as ITK's index
        raise AbdomenSegError(
            f"'{path}' holds {count:,} NaN or infinite voxel{'s' if count > 1 else ''} (the first at voxel index "
            f"{first}, i j k from 0), which ITK's NIfTI reader would silently read as 0",
            "replace them with the background value (about -1024 for CT air, 0 for MR or a label map) and try again",
        )


_COMPLEX = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


def _check_header(path: Path) -> None:
    """Size and spacing from the header alone (no pixels read): refuse before allocating."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetPixelID() in _COMPLEX:  # its pixels crashed the intensity checks further on
        kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        raise AbdomenSegError(
            f"'{path}' holds complex-valued voxels ({kind}), which neither a scan nor a label map has",
            "give a real-valued image: for a complex MR reconstruction, its magnitude (the absolute value of each "
            "voxel)",
        )
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) == 3:
        limits.check_geometry(size, reader.GetSpacing()[:3], f"'{path}'")  # the voxel count included


def _read_dicom_series(folder: Path, segmentation_ok: bool = True) -> sitk.Image:
    from AbdomenSegLib.io.dicom_series import check_read_spacing, check_series_geometry

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise AbdomenSegError(
            f"folder '{folder}' holds no DICOM image series",
            "point to the folder that contains the .dcm slices of one series",
        )
    if len(series) > 1:
        raise AbdomenSegError(
            f"folder '{folder}' holds {len(series)} DICOM series",
            "put each series in its own folder and segment one at a time",
        )
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    # GDCM silently drops unreadable slices and re-spaces the rest; refuse gaps, duplicates and tilt first.
    spacing = check_series_geometry(folder, files)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    if len(files) == 1 and first.GetDimension() > 2 and first.GetSize()[2] > 1:
        # One multi-frame object: GDCM places its frames only when they are stored in order (dicom_multiframe.py).
        return _read_dicom_file(Path(files[0]), segmentation_ok)
    limits.check_voxel_count((*first.GetSize()[:2], len(files)), f"'{folder}'")
    reader.SetFileNames(files)
    image = reader.Execute()
    check_read_spacing(image, spacing, Path(folder))
    if first.HasMetaDataKey("0008|0060"):  # Modality: an MR series gets the MR model (models/choice.py)
        image.SetMetaData("0008|0060", first.GetMetaData("0008|0060").strip())
    return image


def _squeeze_to_3d(image: sitk.Image, path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AbdomenSegError(
            f"'{path}' is a multi-component (e.g. RGB or vector) image", "give a single-channel CT or MR volume"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim == 2:
        raise AbdomenSegError(
            f"'{path}' is a 2D image, not a volume",
            "give a 3D volume (for a DICOM series, give the folder holding all slices)",
        )
    if dim != 3:
        raise AbdomenSegError(
            f"'{path}' is a {dim}D image (size {image.GetSize()})",
            "give a single 3D volume; split 4D/time series into 3D volumes first",
        )
    return image


DICOM_SEG_SUFFIX = ".dcm"


def is_dicom_seg_output(path) -> bool:
    return str(path).lower().endswith(DICOM_SEG_SUFFIX)


def check_output_type(path, inputs=None) -> None:
    """The output's file type must be one we write; checked before any work.

    `.dcm` (a DICOM SEG) references the slices of the DICOM series it was segmented from, so every input
    (`inputs`) must be a DICOM series folder, and the output must not go into one (the folder would then hold
    two series)."""
    if is_dicom_seg_output(path):
        _check_dicom_seg_inputs(path, inputs)
        return
    if image_suffix(path) not in (".seg.nrrd", *IMAGE_SUFFIXES):
        raise AbdomenSegError(
            f"unsupported output type '{Path(path).name}'",
            "use .nii.gz, .nii, .nrrd, .seg.nrrd, .mha, or .dcm (DICOM SEG) for a DICOM series input",
        )


def _check_dicom_seg_inputs(path, inputs) -> None:
    from AbdomenSegLib.io.dicom_seg import require_highdicom

    require_highdicom()  # installed? checked before any work
    inputs = [Path(p) for p in (inputs or [])]
    not_series = [p for p in inputs if not p.is_dir()]
    if not inputs or not_series:
        named = (
            f" ('{not_series[0]}'{f' and {len(not_series) - 1} more' if len(not_series) > 1 else ''})"
            if not_series
            else ""
        )
        raise AbdomenSegError(
            f"a DICOM SEG output ('{Path(path).name}') must reference the DICOM series it was made from, and the "
            f"input is not a DICOM series folder{named}",
            "give the folder holding the CT/MR slices, or write .nii.gz, .nrrd or .seg.nrrd",
        )
    parent = Path(path).parent.resolve()
    for src in inputs:
        if src.resolve() == parent:
            raise AbdomenSegError(
                f"output '{path}' would go into the DICOM series folder '{src}', which would then hold two series",
                "write the DICOM SEG beside the series folder (e.g. into its parent folder)",
            )
        multiframe = _multiframe_file_in(src)
        if multiframe is not None:
            raise AbdomenSegError(
                f"a DICOM SEG output ('{Path(path).name}') references the slice files of a series, and '{src}' holds "
                f"a multi-frame (enhanced) DICOM image ('{multiframe.name}')",
                "write .nii.gz, .nrrd or .seg.nrrd instead",
            )


def _multiframe_file_in(folder: Path) -> Path | None:
    """The folder's first DICOM file if it is a multi-frame image (the folder then holds just it, or is refused
    when read): one header read per case, so that a DICOM SEG output is refused before any work."""
    from AbdomenSegLib.io.dicom_multiframe import is_multiframe
    from AbdomenSegLib.io.dicom_seg import is_dicom_file

    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(".") and entry.is_file() and is_dicom_file(entry):
            return entry if is_multiframe(entry) else None
    return None


def check_output_can_hold(direction, path) -> None:
    """NIfTI stores orientation as a rotation (qform quaternion): a sheared direction matrix, as a gantry
    tilt gives, cannot be written exactly, and the output would no longer match the input's grid."""
    if not image_suffix(path).startswith(".nii"):
        return
    matrix = np.array(direction, dtype=float).reshape(3, 3)
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-4):
        raise AbdomenSegError(
            f"the input's axes are not perpendicular (sheared direction matrix, e.g. a gantry tilt), which "
            f"NIfTI ('{Path(path).name}') cannot store exactly",
            "write .nrrd, .seg.nrrd or .mha instead",
        )


def _same_geometry(a, b) -> bool:
    return (
        tuple(a.GetSize()) == tuple(b.GetSize())
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-6)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-6, atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    )


def write_image(image: sitk.Image, path, *, protect=(), overwrite: bool = True, what: str = "the image") -> Path:
    """Write atomically; refuse to write over any path in `protect` (e.g. the input), and (without
    `overwrite`) over any file that exists by the time the output is complete.

    The written header is read back before the file takes its name: every output must sit in the
    input's exact grid, and a format that cannot hold that grid must fail, not round it.
    """
    path = Path(path)
    for other in protect:
        if other is not None and Path(other).exists() and path.exists() and path.resolve() == Path(other).resolve():
            raise AbdomenSegError(f"output '{path}' is the input file", "choose another output path")
    check_output_type(path)
    check_output_can_hold(image.GetDirection(), path)
    suffix = image_suffix(path)
    with atomic_output(path, suffix if suffix != ".seg.nrrd" else ".nrrd", overwrite=overwrite, what=what) as tmp:
        _write_whole(image, tmp, path, what)
        reader = sitk.ImageFileReader()
        reader.SetFileName(tmp)
        reader.ReadImageInformation()
        if not _same_geometry(reader, image):
            raise AbdomenSegError(
                f"'{path.name}' cannot hold the input's exact grid (written origin {reader.GetOrigin()}, "
                f"direction {reader.GetDirection()})",
                "write .nrrd, .seg.nrrd or .mha instead",
            )
    return path


def _write_whole(image: sitk.Image, tmp: str, path: Path, what: str) -> None:
    """ITK's write, checked to be complete: on a full disk its NIfTI writer fills the free space, says nothing and
    the cut file reads back zero-filled; its NRRD and MetaImage writers raise. Either way the space is probed by
    writing (while the cut file still holds it), so that a full disk or quota is named as such."""
    from AbdomenSegLib.io.files import no_space_error, space_left_error

    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        integrity.check_complete(tmp, written=True)  # its compressed length records, not a second gunzip
    except (RuntimeError, AbdomenSegError) as exc:
        full = space_left_error(Path(tmp).parent)
        if full is not None:
            raise no_space_error(what, path, full) from None
        reason = exc.problem if isinstance(exc, AbdomenSegError) else str(exc).strip().splitlines()[-1][:200]
        raise AbdomenSegError(
            f"{what} '{path}' could not be written completely ({reason})",
            "check that the output folder is writable and has space, then run again",
        ) from None


def label_image_like(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a (z, y, x) label array in the reference image's exact geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8)))
    out.CopyInformation(reference)
    return out


def add_segmentation_metadata(label_image: sitk.Image, labels=None) -> sitk.Image:
    """Add the header fields 3D Slicer reads from a .seg.nrrd: one segment per organ present.

    Slicer's format (vtkMRMLSegmentationStorageNode): `SegmentN_*` key/value pairs, one shared
    labelmap layer, each segment with its label value, name, colour and terminology tag.
    """
    array = sitk.GetArrayViewFromImage(label_image)
    present = labels if labels is not None else [int(v) for v in np.unique(array) if v in BY_LABEL]
    image = sitk.Image(label_image)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    size = label_image.GetSize()
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    for index, value in enumerate(present):
        organ = BY_LABEL[value]
        key = f"Segment{index}_"
        image.SetMetaData(key + "ID", organ.name)
        image.SetMetaData(key + "Name", organ.display_name)
        image.SetMetaData(key + "NameAutoGenerated", "0")
        image.SetMetaData(key + "Color", " ".join(f"{c:.6f}" for c in organ.color_float))
        image.SetMetaData(key + "ColorAutoGenerated", "0")
        image.SetMetaData(key + "LabelValue", str(value))
        image.SetMetaData(key + "Layer", "0")
        image.SetMetaData(key + "Extent", extent)
        image.SetMetaData(key + "Tags", f"TerminologyEntry:{organ.terminology_entry()}|")
    return image


def write_labels(label_image: sitk.Image, path, *, protect=(), overwrite: bool = True, source=None, model=None) -> Path:
    """Write a label map; `.seg.nrrd` gets Slicer segment names, colours and terminology.

    `.dcm` writes a DICOM SEG (dicom_seg.py): `source` is the DICOM series folder the labels were segmented from
    (its slices are referenced), `model` the ModelCard that made them (the algorithm identification)."""
    if is_dicom_seg_output(path):
        from AbdomenSegLib.io.dicom_seg import write_dicom_seg

        path = Path(path)
        check_output_type(path, [source] if source is not None else None)
        for other in protect:
            if other is not None and Path(other).exists() and path.exists() and path.resolve() == Path(other).resolve():
                raise AbdomenSegError(f"output '{path}' is the input file", "choose another output path")
        return write_dicom_seg(label_image, source, path, model=model, overwrite=overwrite)
    if str(path).lower().endswith(".seg.nrrd"):
        label_image = add_segmentation_metadata(label_image)
    return write_image(label_image, path, protect=protect, overwrite=overwrite, what="the label map")
