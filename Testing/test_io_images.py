import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_LABEL
from AbdomenSegLib.io.images import read_image, write_image, write_labels
from AbdomenSegLib.io.phantom import make_phantom
from helpers import shared


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry(tmp_path, suffix):
    ct, _ = make_phantom(size=(20, 18, 10), spacing=(1.5, 2.0, 3.0))
    path = write_image(ct, tmp_path / f"ct{suffix}")
    back = read_image(path)
    assert back.GetSize() == ct.GetSize()
    assert np.allclose(back.GetSpacing(), ct.GetSpacing()) and np.allclose(back.GetOrigin(), ct.GetOrigin())
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct))
    assert not list(tmp_path.glob(".part-*"))  # atomic write left no temp file


def test_dicom_series_folder():
    folder = shared("dcmqi_ct3slice", "ct-3slice")
    image = read_image(folder)
    assert image.GetSize() == (512, 512, 3)
    assert np.allclose(image.GetSpacing()[:2], 0.8, atol=0.05)
    assert sitk.GetArrayViewFromImage(image).min() < -500  # HU after rescale


def _write_raw(tmp_path, array, name):
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("text", "could not be read as an image"),
        ("2d", "2D image"),
        ("4d", "4D image"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, case, message):
    if case == "missing":
        path = tmp_path / "nope.nii.gz"
    elif case == "text":
        path = tmp_path / "notes.nii.gz"
        path.write_text("not an image")
    elif case == "2d":
        path = _write_raw(tmp_path, np.zeros((32, 32), np.int16), "slice.nii.gz")
    else:
        path = tmp_path / "series.nii.gz"
        sitk.WriteImage(sitk.JoinSeries([sitk.Image(8, 8, 8, sitk.sitkInt16)] * 3), str(path))
    with pytest.raises(AbdomenSegError, match=message) as info:
        read_image(path)
    assert info.value.fix  # every error says what to do


def test_outputs_get_ordinary_file_permissions_and_failures_leave_nothing(tmp_path):
    import os

    from AbdomenSegLib.evaluation.metrics import write_csv
    from AbdomenSegLib.io.files import atomic_output

    old = os.umask(0o022)
    try:
        image = write_image(make_phantom(size=(10, 10, 6))[0], tmp_path / "ct.nii.gz")
        table = write_csv([{"case": "a", "organ": "liver", "dice": 0.5}], tmp_path / "m.csv")
    finally:
        os.umask(old)
    for path in (image, table):  # not mkstemp's owner-only 0600: a shared results folder stays readable
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "keep.txt") as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "keep.txt").read_text() == "user data" and not list(tmp_path.glob(".part-*"))


def test_write_refuses_to_replace_the_input(tmp_path):
    ct, _ = make_phantom(size=(10, 10, 6))
    src = write_image(ct, tmp_path / "ct.nii.gz")
    before = src.read_bytes()
    with pytest.raises(AbdomenSegError, match="is the input"):
        write_image(ct, src, protect=[src])
    assert src.read_bytes() == before


def test_seg_nrrd_is_read_by_slicer_with_names_colours_terminology(tmp_path):
    slicer = pytest.importorskip("slicer")
    _, labels = make_phantom(size=(40, 36, 20), spacing=(4.0, 4.0, 6.0))
    path = write_labels(labels, tmp_path / "organs.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v)
    assert seg.GetNumberOfSegments() == len(present)
    for value in present:
        organ = BY_LABEL[value]
        segment = seg.GetSegment(organ.name)
        assert segment is not None and segment.GetName() == organ.display_name
        assert np.allclose(segment.GetColor(), organ.color_float, atol=1e-3)
        tag = vtk_string_tag(segment, "TerminologyEntry")
        assert organ.snomed_type[1] in tag
        assert segment.GetLabelValue() == value
    # Geometry: Slicer's labelmap covers the same voxels as ours (IJK->RAS from LPS origin/spacing).
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(BY_LABEL[1].name, labelmap)
    assert np.allclose(labelmap.GetSpacing(), labels.GetSpacing())


def vtk_string_tag(segment, name):
    import vtk

    value = vtk.reference("") if hasattr(vtk, "reference") else None
    segment.GetTag(name, value)
    return str(value)
