"""DICOM series geometry checks: damaged series are refused by name, not silently re-spaced.

Each damaged case also shows what plain SimpleITK does with it (a volume with a wrong slice count or
spacing, or slices placed where they are not), i.e. the silent failure the check guards against.
Synthetic series are written with SimpleITK itself (tags as in its "DICOM series from array" example).
"""

import locale
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.dicom_series import check_read_spacing, check_series_geometry
from helpers import shared

SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.1"
OTHER_SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.2"
STUDY_UID = "1.2.826.0.1.3680043.2.1125.7"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SLICES, SPACING, PIXEL = 20, 3.0, 0.8
FIRST_POSITION = (-25.0, -25.0, -100.0)


# --- writing realistic series ----------------------------------------------------------------------------


def _ds(values) -> str:
    return "\\".join(f"{v:g}" for v in values)


def write_ct_series(
    folder: Path, *, slices: int = SLICES, spacing: float = SPACING, series_uid: str = SERIES_UID
) -> list[Path]:
    """One axial CT series, one file per slice, `spacing` mm apart along +z; returns the files in z order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 20, (slices, 64, 64)).astype(np.int16)  # soft-tissue-like HU
    hu[:, :8, :] = -1000  # air above the body
    volume = sitk.GetImageFromArray(hu)
    volume.SetSpacing((PIXEL, PIXEL, spacing))  # ITK writes PixelSpacing from the image, not from the tag
    volume.SetOrigin(FIRST_POSITION)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # else ITK invents new SOP/series UIDs and the slices split up
    files = []
    for k in range(slices):
        image = volume[:, :, k]
        position = (FIRST_POSITION[0], FIRST_POSITION[1], FIRST_POSITION[2] + k * spacing)
        tags = {
            "0008|0060": "CT",
            "0008|0016": CT_IMAGE_STORAGE,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": STUDY_UID,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": _ds(position),
            "0020|0037": _ds(AXIAL),
            "0028|0030": _ds((PIXEL, PIXEL)),
            "0018|0050": f"{spacing:g}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        _execute(writer, image)
        files.append(path)
    return files


def _execute(writer: sitk.ImageFileWriter, image: sitk.Image) -> None:
    """GDCM's DICOM writer switches the whole process to the C locale, after which every text file opened
    without an explicit encoding in the same test run is read as ASCII; put the user's locale back."""
    writer.Execute(image)
    locale.setlocale(locale.LC_ALL, "")


def rewrite_tag(path: Path, key: str, value: str) -> None:
    """Change one header field of a slice in place (pixels and UIDs kept)."""
    image = sitk.ReadImage(str(path))
    image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    _execute(writer, image)


def position_of(path: Path) -> np.ndarray:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])


def write_non_image_dicom(path: Path, sop_class: str) -> None:
    """A minimal pixel-less DICOM object (e.g. an RT structure set), as PACS exports put beside a series."""

    def explicit(element: int, vr: bytes, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        if vr == b"OB":
            return struct.pack("<HH", 2, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", 2, element) + vr + struct.pack("<H", len(value)) + value

    def implicit(group: int, element: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HHI", group, element, len(value)) + value

    instance = f"{OTHER_SERIES_UID}.1".encode()
    meta = (
        explicit(1, b"OB", b"\0\1")
        + explicit(2, b"UI", sop_class.encode())
        + explicit(3, b"UI", instance)
        + explicit(0x10, b"UI", b"1.2.840.10008.1.2")
    )
    meta = explicit(0, b"UL", struct.pack("<I", len(meta))) + meta
    data = (
        implicit(8, 0x16, sop_class.encode())
        + implicit(8, 0x18, instance)
        + implicit(8, 0x60, b"RTSTRUCT")
        + implicit(0x20, 0xD, STUDY_UID.encode())
        + implicit(0x20, 0xE, OTHER_SERIES_UID.encode())
    )
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + data)


# --- reading the way io._read_dicom_series does ----------------------------------------------------------


def gdcm_files(folder: Path, series_uid: str = SERIES_UID) -> list[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def check(folder: Path) -> float | None:
    return check_series_geometry(folder, gdcm_files(folder))


def plain_itk_read(folder: Path) -> sitk.Image:
    """What the tool did before the check: trust GDCM's list and ITK's spacing."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(gdcm_files(folder))
    return reader.Execute()


# --- damage done to an intact series ---------------------------------------------------------------------


def delete(k: int) -> Callable:
    return lambda folder, files: files[k].unlink()


def truncate_to_half(k: int) -> Callable:
    """As the issue reproduces it: `head -c $((size/2))`, e.g. an interrupted copy."""

    def damage(folder, files):
        data = files[k].read_bytes()
        files[k].write_bytes(data[: len(data) // 2])

    return damage


def copy_as(k: int, name: str) -> Callable:
    return lambda folder, files: shutil.copyfile(files[k], folder / name)


def move_along_z(k: int, mm: float) -> Callable:
    def damage(folder, files):
        rewrite_tag(files[k], "0020|0032", _ds(position_of(files[k]) + (0, 0, mm)))

    return damage


def reorient(k: int, degrees: float) -> Callable:
    def damage(folder, files):
        a = np.radians(degrees)
        rewrite_tag(files[k], "0020|0037", _ds((1, 0, 0, 0, np.cos(a), np.sin(a))))

    return damage


def shear_y(mm_per_slice: float) -> Callable:
    """Gantry tilt as CT writes it: each slice's position also steps in y."""

    def damage(folder, files):
        for k, path in enumerate(files):
            rewrite_tag(path, "0020|0032", _ds(position_of(path) + (0, k * mm_per_slice, 0)))

    return damage


def add_other_series_file(name: str) -> Callable:
    def damage(folder, files):
        other = write_ct_series(folder.parent / "other", slices=3, series_uid=OTHER_SERIES_UID)
        shutil.copyfile(other[1], folder / name)

    return damage


# --- how plain ITK gets each damaged case wrong ----------------------------------------------------------


def wrong_grid(image: sitk.Image, files: list[Path]) -> bool:
    return image.GetSize()[2] != SLICES or abs(image.GetSpacing()[2] - SPACING) > 1e-6


def misplaces(k: int) -> Callable:
    """Right count and spacing, but slice k sits where ITK's regular grid says, not where its header says."""

    def wrong(image, files):
        placed = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        return not wrong_grid(image, files) and np.linalg.norm(placed - position_of(files[k])) > 0.5

    return wrong


def ignores_orientation_of(k: int) -> Callable:
    """ITK stacks the tilted slice as if parallel: one direction for the volume, no complaint."""

    def wrong(image, files):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(files[k]))
        reader.ReadImageInformation()
        tilted = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        column = np.array(image.GetDirection()).reshape(3, 3)[:, 1]
        return image.GetSize()[2] == SLICES and np.abs(column - tilted[3:]).max() > 0.05

    return wrong


def reads_without_complaint(image: sitk.Image, files: list[Path]) -> bool:
    """The reader picks one series and never mentions the stray file."""
    return image.GetSize()[2] == SLICES


DAMAGED = [
    pytest.param(
        delete(10),
        [
            "1 slice missing",
            "'slice009.dcm' (z=-73.0)",
            "'slice011.dcm' (z=-67.0)",
            "step 6.0 mm where the series has 3.0 mm",
        ],
        wrong_grid,
        id="slice-deleted",
    ),
    pytest.param(truncate_to_half(10), ["'slice010.dcm'", "truncated or corrupt"], wrong_grid, id="slice-truncated"),
    pytest.param(
        copy_as(10, "slice010 copy.dcm"),
        ["same position", "'slice010.dcm'", "'slice010 copy.dcm'"],
        wrong_grid,
        id="slice-duplicated",
    ),
    pytest.param(
        move_along_z(10, 1.0),
        ["'slice010.dcm' lies 1.0 mm off", "steps 4.0 and 2.0 mm"],
        misplaces(10),
        id="slice-moved-1mm",
    ),
    pytest.param(
        reorient(10, 5.0), ["orientations", "'slice010.dcm'"], ignores_orientation_of(10), id="slice-other-orientation"
    ),
    pytest.param(
        shear_y(0.5), ["gantry tilt", "9.5 degrees", "'slice019.dcm'", "regularization"], wrong_grid, id="gantry-tilt"
    ),
    pytest.param(
        add_other_series_file("other.dcm"),
        ["another series", "'other.dcm'", "own folder"],
        reads_without_complaint,
        id="other-series-file",
    ),
]


@pytest.fixture
def series(tmp_path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "ct"
    return folder, write_ct_series(folder)


def test_intact_series_passes_with_exact_spacing(series):
    folder, _ = series
    spacing = check(folder)
    assert spacing == pytest.approx(SPACING, abs=1e-9)
    image = plain_itk_read(folder)
    assert image.GetSize() == (64, 64, SLICES)
    assert image.GetSpacing() == pytest.approx((PIXEL, PIXEL, SPACING))
    check_read_spacing(image, spacing, folder)


def test_series_listed_from_top_to_bottom_passes(series):
    folder, _ = series
    assert check_series_geometry(folder, gdcm_files(folder)[::-1]) == pytest.approx(SPACING)


@pytest.mark.parametrize("damage, words, itk_goes_wrong", DAMAGED)
def test_damaged_series_is_refused_by_name(series, damage, words, itk_goes_wrong):
    folder, files = series
    damage(folder, files)
    assert itk_goes_wrong(plain_itk_read(folder), files), "plain ITK should have failed silently here"
    with pytest.raises(AbdomenSegError) as refused:
        check(folder)
    message = str(refused.value)
    for word in words:
        assert word in message, message
    assert refused.value.fix


def test_issue_reproduction_112_slices_one_halved(tmp_path):
    """The issue: one of 112 files halved -> ITK reads 111 slices at 3.027 mm. Refused, quickly."""
    folder = tmp_path / "ct"
    files = write_ct_series(folder, slices=112)
    truncate_to_half(56)(folder, files)
    image = plain_itk_read(folder)
    assert image.GetSize()[2] == 111 and image.GetSpacing()[2] == pytest.approx(333 / 110)
    start = time.perf_counter()
    with pytest.raises(AbdomenSegError, match="'slice056.dcm' cannot be read"):
        check(folder)
    assert time.perf_counter() - start < 1.0


def test_gap_is_named_when_the_dropped_file_is_gone_too(series):
    """Without the corrupt file to point at, the gap it leaves is what gets named."""
    folder, files = series
    truncate_to_half(10)(folder, files)
    listed = gdcm_files(folder)
    files[10].unlink()
    with pytest.raises(AbdomenSegError, match="1 slice missing between 'slice009.dcm'"):
        check_series_geometry(folder, listed)


def test_slice_list_out_of_position_order_is_refused(series):
    """ITK stacks files in list order; a list that is not monotonic along the normal would scramble slices."""
    folder, _ = series
    listed = gdcm_files(folder)
    listed[4], listed[5] = listed[5], listed[4]
    with pytest.raises(AbdomenSegError, match="out of position order"):
        check_series_geometry(folder, listed)


def test_localizer_listed_first_is_the_one_named(series):
    """The majority orientation is the reference, so the odd file is named, not the 19 good ones."""
    folder, files = series
    reorient(0, 90.0)(folder, files)
    odd_one_named = r"'slice000.dcm' is not parallel to the 19 slice\(s\) like 'slice001.dcm'"
    with pytest.raises(AbdomenSegError, match=odd_one_named):
        check_series_geometry(folder, [str(f) for f in files])


def test_unreadable_listed_file_is_named(series):
    folder, files = series
    listed = gdcm_files(folder)
    files[3].write_bytes(b"\0" * 10)
    with pytest.raises(AbdomenSegError, match="slice 'slice003.dcm' .* cannot be read"):
        check_series_geometry(folder, listed)


def test_bystanders_in_the_folder_are_ignored(series):
    """Hidden files, DICOMDIR, notes and pixel-less objects (RT structures) are not slices that went missing."""
    folder, _ = series
    (folder / ".DS_Store").write_bytes(b"\0" * 200)
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (folder / "notes.txt").write_text("patient moved?\n")
    (folder / "README").write_text("no DICOM here\n")
    write_non_image_dicom(folder / "rtstruct.dcm", RT_STRUCTURE_SET_STORAGE)
    assert len(gdcm_files(folder)) == SLICES  # GDCM itself skips the RT structure set
    assert check(folder) == pytest.approx(SPACING)


def test_slices_without_position_are_refused_but_one_multiframe_file_is_not(series):
    folder, files = series
    # Renaming the ImagePositionPatient tag (implicit VR, so the bytes are just group/element) drops it.
    data = files[5].read_bytes()
    tag = data.index(b"\x20\x00\x32\x00")
    assert tag < data.index(b"\xe0\x7f\x10\x00")  # in the header, not a pixel value
    files[5].write_bytes(data[:tag] + b"\x20\x00\x33\x00" + data[tag + 4 :])
    with pytest.raises(AbdomenSegError, match="'slice005.dcm' has no valid slice position"):
        check_series_geometry(folder, [str(f) for f in files])
    single = folder.parent / "single"
    single.mkdir()
    shutil.copyfile(files[5], single / "frames.dcm")
    assert check_series_geometry(single, [str(single / "frames.dcm")]) is None


def test_read_spacing_must_agree_with_checked_spacing(series):
    folder, _ = series
    image = plain_itk_read(folder)
    with pytest.raises(AbdomenSegError, match="read with 3.0 mm between slices but its slice positions are 2.5"):
        check_read_spacing(image, 2.5, folder)
    check_read_spacing(image, None, folder)


def test_real_three_slice_ct_series_passes():
    folder = shared("dcmqi_ct3slice", "ct-3slice")
    (series_uid,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    assert [os.path.basename(f) for f in files] == ["03.dcm", "02.dcm", "01.dcm"]  # GDCM lists it top-down
    spacing = check_series_geometry(folder, files)
    assert spacing == pytest.approx(1.0, abs=1e-5)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    check_read_spacing(reader.Execute(), spacing, folder)


# --- every per-slice attribute that sets the grid (issue 31) ---------------------------------------------


def set_pixel_spacing(path: Path, spacing: tuple[float, float]) -> None:
    """PixelSpacing edited in place with pydicom: ITK's writer would write the image's spacing instead."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelSpacing = list(spacing)
    ds.save_as(path)


def crop_rows(path: Path, rows: int) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:rows]).tobytes()
    ds.Rows = rows
    ds.save_as(path)


def test_one_slice_with_another_pixel_spacing_is_named(series):
    folder, files = series
    set_pixel_spacing(files[10], (3.5, 0.8))
    image = plain_itk_read(folder)
    assert image.GetSpacing()[:2] == pytest.approx((PIXEL, PIXEL)), "plain ITK takes the first slice's for all"
    with pytest.raises(AbdomenSegError) as refused:
        check(folder)
    message = str(refused.value)
    assert (
        "mixes PixelSpacing values: 'slice010.dcm' has PixelSpacing 3.5\\0.8 mm where the 19 slices like "
        "'slice000.dcm' have 0.8\\0.8 mm" in message
    ), message
    assert "copy the complete series again" in refused.value.fix


def test_pixel_spacing_rounded_differently_passes(series):
    """DS strings written with fewer digits by another writer are the same spacing, not a damaged slice."""
    folder, files = series
    for path in files:
        set_pixel_spacing(path, (0.703125, 0.703125))
    set_pixel_spacing(files[3], (0.70312, 0.70312))
    assert check(folder) == pytest.approx(SPACING)


def test_one_slice_with_other_rows_is_named(series):
    folder, files = series
    crop_rows(files[4], 48)
    with pytest.raises(RuntimeError):  # plain ITK fails, but only after reading, with an ITK region message
        plain_itk_read(folder)
    with pytest.raises(AbdomenSegError, match=r"'slice004.dcm' has image size 64x48 \(columns x rows\) where the 19"):
        check(folder)
