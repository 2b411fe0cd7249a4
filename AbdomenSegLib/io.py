"""Reading and writing images: NIfTI, NRRD, MHA and DICOM series via SimpleITK.

Everything returns/accepts `SimpleITK.Image`, which carries the geometry (origin, spacing, direction)
that every output must reproduce exactly. Writes are atomic (temp file + rename) so an interrupted run
never leaves a half-written file that a later `--overwrite`-less run would skip.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import AbdomenSegError
from .organs import BY_LABEL

# The umask can only be read by setting it; do that once at import, not during writes that may run on a
# worker thread (Slicer) while other threads create files.
_UMASK = os.umask(0)
os.umask(_UMASK)

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


def read_image(path) -> sitk.Image:
    """Read a 3D image file or a DICOM series folder. Raises AbdomenSegError with a fix."""
    path = Path(path)
    if not path.exists():
        raise AbdomenSegError(f"input '{path}' does not exist", "check the path and spelling")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise AbdomenSegError(
            f"'{path}' could not be read as an image ({str(exc).strip().splitlines()[-1][:200]})",
            "give a NIfTI (.nii/.nii.gz), NRRD, MHA file or a folder holding one DICOM series",
        ) from None
    return _squeeze_to_3d(image, path)


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise AbdomenSegError(f"folder '{folder}' holds no DICOM image series",
                              "point to the folder that contains the .dcm slices of one series")
    if len(series) > 1:
        raise AbdomenSegError(f"folder '{folder}' holds {len(series)} DICOM series",
                              "put each series in its own folder and segment one at a time")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    return reader.Execute()


def _squeeze_to_3d(image: sitk.Image, path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AbdomenSegError(f"'{path}' is a multi-component (e.g. RGB or vector) image",
                              "give a single-channel CT or MR volume")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim == 2:
        raise AbdomenSegError(f"'{path}' is a 2D image, not a volume",
                              "give a 3D volume (for a DICOM series, give the folder holding all slices)")
    if dim != 3:
        raise AbdomenSegError(f"'{path}' is a {dim}D image (size {image.GetSize()})",
                              "give a single 3D volume; split 4D/time series into 3D volumes first")
    return image


@contextlib.contextmanager
def atomic_output(path, suffix=""):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, else it is removed.

    mkstemp creates files readable by their owner only; outputs get the permissions any new file would
    (0666 minus the umask) so colleagues sharing a results folder can read them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(data, path) -> Path:
    """A JSON file (cards, catalogs) written whole or not at all."""
    with atomic_output(path, ".json") as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def write_image(image: sitk.Image, path, *, protect=()) -> Path:
    """Write atomically; refuse to write over any path in `protect` (e.g. the input)."""
    path = Path(path)
    for other in protect:
        if other is not None and Path(other).exists() and path.exists() and path.resolve() == Path(other).resolve():
            raise AbdomenSegError(f"output '{path}' is the input file", "choose another output path")
    suffix = image_suffix(path)
    if suffix not in (".seg.nrrd", *IMAGE_SUFFIXES):
        raise AbdomenSegError(f"unsupported output type '{path.name}'",
                              "use .nii.gz, .nii, .nrrd, .seg.nrrd or .mha")
    with atomic_output(path, suffix if suffix != ".seg.nrrd" else ".nrrd") as tmp:
        sitk.WriteImage(image, tmp, useCompression=True)
    return path


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


def write_labels(label_image: sitk.Image, path, *, protect=()) -> Path:
    """Write a label map; `.seg.nrrd` gets Slicer segment names, colours and terminology."""
    if str(path).lower().endswith(".seg.nrrd"):
        label_image = add_segmentation_metadata(label_image)
    return write_image(label_image, path, protect=protect)
