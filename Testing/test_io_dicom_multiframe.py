"""Multi-frame (enhanced) DICOM images are read frame by frame with their geometry checked like a series.

Every multi-frame object here is made honestly from a classic series (`write_ct_series`) with highdicom's
Legacy Converted Enhanced CT Image, then damaged the way the audit of issue 31 did: frames reordered, one
removed, one with another pixel spacing. Each damaged case also shows what plain SimpleITK (GDCM) reads from
it: the silent failure the checks guard against.
"""

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from test_io_dicom_series import PIXEL, SLICES, SPACING, write_ct_series

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.dicom_multiframe import is_multiframe, read_multiframe
from AbdomenSegLib.io.images import check_output_type, read_image
from helpers import shared

FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.2.1125.7.9"


# --- making multi-frame objects --------------------------------------------------------------------------


def convert_to_multiframe(files, path: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.7.3") -> Path:
    """A Legacy Converted Enhanced CT Image (highdicom) holding the slices of a classic CT series."""
    hd = pytest.importorskip("highdicom")
    datasets = []
    for name in files:
        ds = pydicom.dcmread(name)
        ds.setdefault("FrameOfReferenceUID", FRAME_OF_REFERENCE_UID)  # ITK's writer leaves these out
        ds.setdefault("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"])
        if datasets and "StudyTime" in datasets[0]:  # ITK's writer stamps each slice with its own time
            ds.StudyTime = datasets[0].StudyTime
        datasets.append(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = hd.legacy.LegacyConvertedEnhancedCTImage(
            datasets,
            series_instance_uid=series_uid,
            series_number=2,
            sop_instance_uid=series_uid + ".1",
            instance_number=1,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path)
    return path


def rewrite_frames(path: Path, frames: list[int], edit: Callable | None = None) -> Path:
    """Keep `frames` (0-based, in this order; repeats copy a frame) of a multi-frame file, pixels and
    per-frame functional groups together; `edit(dataset)` may change the result before it is saved."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    ds.PerFrameFunctionalGroupsSequence = Sequence([ds.PerFrameFunctionalGroupsSequence[k] for k in frames])
    ds.PixelData = np.ascontiguousarray(pixels[frames]).tobytes()
    ds.NumberOfFrames = len(frames)
    if edit is not None:
        edit(ds)
    ds.save_as(path)
    return path


def move_to_per_frame(ds: Dataset, keyword: str) -> None:
    """A functional group the converter shared between all frames, given to each frame instead."""
    item = ds.SharedFunctionalGroupsSequence[0].get(keyword)[0]
    del ds.SharedFunctionalGroupsSequence[0][keyword]
    for groups in ds.PerFrameFunctionalGroupsSequence:
        copy = Dataset()
        copy.update(item)
        setattr(groups, keyword, Sequence([copy]))


def frame_position(ds: Dataset, frame: int) -> float:
    return float(ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient[2])


def same_image(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
        and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    )


@pytest.fixture
def series(tmp_path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "series"
    return folder, write_ct_series(folder)


@pytest.fixture
def multiframe(tmp_path, series) -> Path:
    return convert_to_multiframe(series[1], tmp_path / "enhanced" / "ct.dcm")


# --- read right --------------------------------------------------------------------------------------------


def test_intact_multiframe_reads_as_the_series_it_was_made_from(series, multiframe):
    assert is_multiframe(multiframe) and not is_multiframe(series[1][0])
    from_series = read_image(series[0])
    assert from_series.GetSpacing() == pytest.approx((PIXEL, PIXEL, SPACING))
    assert same_image(read_image(multiframe), from_series)
    assert same_image(read_image(multiframe.parent), from_series)  # the folder holding just it
    assert read_image(multiframe).GetMetaData("0008|0060") == "CT"


def test_shuffled_frames_read_as_the_series(series, multiframe):
    rewrite_frames(multiframe, list(np.random.default_rng(3).permutation(SLICES)))
    plain = sitk.ReadImage(str(multiframe))
    assert plain.GetSpacing() == pytest.approx((1.0, 1.0, 1.0)), "plain GDCM should have lost the geometry here"
    assert same_image(read_image(multiframe, segmentation_ok=False), read_image(series[0]))


def test_rescale_of_each_frame_is_applied(series, multiframe):
    """Stored values shifted by a frame's own intercept (Pixel Value Transformation per frame) give back the HU."""

    def store_shifted(ds):
        move_to_per_frame(ds, "PixelValueTransformationSequence")
        pixels = ds.pixel_array.astype(np.int32)
        for k, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
            shift = 1024 + 10 * k
            groups.PixelValueTransformationSequence[0].RescaleIntercept = -shift
            pixels[k] += shift
        ds.PixelData = pixels.astype(np.int16).tobytes()

    rewrite_frames(multiframe, list(range(SLICES))[::-1], store_shifted)
    assert same_image(read_image(multiframe), read_image(series[0]))


# --- refused by name ---------------------------------------------------------------------------------------


def without(k: int) -> list[int]:
    return [i for i in range(SLICES) if i != k]


def test_missing_frame_is_named_between_its_neighbours(multiframe):
    rewrite_frames(multiframe, without(7))
    assert sitk.ReadImage(str(multiframe)).GetSpacing() == pytest.approx((1.0, 1.0, 1.0))  # the audit's reading
    with pytest.raises(AbdomenSegError) as refused:
        read_image(multiframe)
    message = str(refused.value)
    assert "multi-frame DICOM file" in message and "is not evenly spaced: 1 frame missing between frame" in message
    assert "step 6.0 mm where the frames are 3.0 mm apart" in message, message
    assert refused.value.fix.startswith("export the complete volume again")


def test_missing_middle_of_three_frames_is_found_by_the_in_stack_numbers(tmp_path, series):
    """Two frames left evenly spaced: only the in-stack position numbers show the hole."""
    path = convert_to_multiframe(series[1][:3], tmp_path / "three.dcm")
    rewrite_frames(path, [0, 2])
    with pytest.raises(
        AbdomenSegError,
        match=r"skips in-stack position numbers between frame 2 \(#3\) and frame 1 \(#1\): 1 frame missing",
    ):
        read_multiframe(path)


def test_a_frame_with_another_pixel_spacing_is_named(multiframe):
    def widen_frame_5(ds):
        move_to_per_frame(ds, "PixelMeasuresSequence")
        ds.PerFrameFunctionalGroupsSequence[4].PixelMeasuresSequence[0].PixelSpacing = [0.95, 0.95]

    rewrite_frames(multiframe, list(range(SLICES)), widen_frame_5)
    with pytest.raises(AbdomenSegError) as refused:
        read_image(multiframe)
    message = str(refused.value)
    assert "mixes PixelSpacing values: frame 5 has PixelSpacing 0.95\\0.95 mm where the 19 frames like" in message
    assert "0.8\\0.8 mm" in message


def test_a_frame_with_another_orientation_is_named(multiframe):
    def tilt_frame_3(ds):
        move_to_per_frame(ds, "PlaneOrientationSequence")
        a = np.radians(5)
        ds.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence[0].ImageOrientationPatient = [
            1,
            0,
            0,
            0,
            float(np.cos(a)),
            float(np.sin(a)),
        ]

    rewrite_frames(multiframe, list(range(SLICES)), tilt_frame_3)
    with pytest.raises(AbdomenSegError, match=r"mixes frame orientations: frame 3 is not parallel to the 19 frame"):
        read_image(multiframe)


def test_a_frame_twice_is_refused(multiframe):
    rewrite_frames(multiframe, [*range(SLICES), 4])
    with pytest.raises(AbdomenSegError, match="two frames at the same position: frame 5 and frame 21"):
        read_image(multiframe)


def test_frames_without_positions_are_refused(multiframe):
    def drop_position_of_frame_2(ds):
        del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence

    rewrite_frames(multiframe, list(range(SLICES)), drop_position_of_frame_2)
    with pytest.raises(AbdomenSegError, match=r"frame 2 has no valid position \(Plane Position Sequence\)"):
        read_image(multiframe)


def test_two_multiframe_files_in_one_folder_are_named_as_such(tmp_path, series, multiframe):
    shutil.copyfile(multiframe, multiframe.parent / "ct copy.dcm")
    with pytest.raises(AbdomenSegError) as refused:
        read_image(multiframe.parent)
    message = str(refused.value)
    assert "holds 2 multi-frame DICOM objects ('ct copy.dcm', 'ct.dcm')" in message, message
    assert "screenshot" not in message and "give one multi-frame file as the input" in refused.value.fix


def test_dicom_seg_output_for_a_multiframe_input_is_refused_before_any_work(tmp_path, series, multiframe):
    """A SEG references single-frame source slices (dicom_seg.py); it was refused only when written."""
    with pytest.raises(AbdomenSegError, match=r"holds a multi-frame \(enhanced\) DICOM image \('ct.dcm'\)"):
        check_output_type(tmp_path / "seg.dcm", [multiframe.parent])
    check_output_type(tmp_path / "seg.dcm", [series[0]])  # a series of slice files still may


# --- MONOCHROME1 ---------------------------------------------------------------------------------------------


def retag_monochrome1(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)


def test_gdcm_negates_monochrome1_values(series):
    """Why MONOCHROME1 is refused: the values stay CT numbers by the standard, GDCM (under ITK) negates them."""
    folder, files = series
    stored = pydicom.dcmread(files[0]).pixel_array
    retag_monochrome1(files[0])
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0])))[0]
    assert np.array_equal(read, -stored.astype(np.int32) - 1)  # air -1000 -> +999


def test_monochrome1_series_is_refused_by_name(series):
    folder, files = series
    for path in files:
        retag_monochrome1(path)
    with pytest.raises(AbdomenSegError, match=r"stores its pixels as MONOCHROME1 .*'slice000.dcm'"):
        read_image(folder)


def test_monochrome1_multiframe_is_refused_by_name(multiframe):
    retag_monochrome1(multiframe)
    with pytest.raises(AbdomenSegError, match="MONOCHROME1"):
        read_image(multiframe)


# --- real data -----------------------------------------------------------------------------------------------


def test_real_three_slice_series_as_multiframe_reads_as_the_series(tmp_path):
    folder = shared("dcmqi_ct3slice", "ct-3slice")
    path = convert_to_multiframe(sorted(folder.glob("*.dcm")), tmp_path / "ct3.dcm")
    rewrite_frames(path, [1, 2, 0])
    assert same_image(read_image(path), read_image(folder))
