"""Issue 31, round two: correct results of oblique scans and of crops through the liver are not called mirrored,
mixed up or misplaced by the result check (qc/check.py with qc/cuts.py), while mirrored headers still are.

A correct result is stood in for by the reference labels, resampled or cropped as the scan would be: TotalSegmentator's
labels of its example CT (in our numbering), and the 24 BTCV reference label maps with their true direction.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core.organs import BY_NAME, ORGANS, convert_labels
from AbdomenSegLib.io.phantom import rotation
from AbdomenSegLib.qc.check import assess
from helpers import shared

BTCV_DIRECTION = [1, 0, 0, 0, -1, 0, 0, 0, 1]
# The organs the default model segments: those a result of it could be missing.
DEFAULT_ORGANS = [o.name for o in ORGANS if o.name != "urinary_bladder"]
# Warnings about where organs lie: what a correct result must not get, whatever its grid or field of view.
POSITION = ("flipped_", "inconsistent_", "liver_spleen_mixed_up", "misplaced_organ", "missing_organ")


def _position_warnings(labels):
    report = assess(labels, expected=DEFAULT_ORGANS)
    return sorted((f.code, f.organ or "") for f in report.warnings if f.code.startswith(POSITION))


def _ours(path, convention, direction=None):
    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(image), convention).astype(np.uint8))
    out.CopyInformation(image)
    if direction is not None:
        out.SetDirection(direction)
    return out


@pytest.fixture(scope="module")
def example_labels():
    return _ours(shared("totalseg_example", "example_seg_fast_force_split.nii.gz"), "totalseg")


def _oblique(labels, axis, degrees):
    """`labels` on a grid turned `degrees` about the LPS `axis` through its centre, covering all of it (nearest)."""
    centre = np.array(labels.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in labels.GetSize()]))
    old = np.array(labels.GetDirection()).reshape(3, 3)
    direction = rotation("xyz"[axis], degrees) @ old
    spacing, size = np.array(labels.GetSpacing()), np.array(labels.GetSize())
    new_size = np.ceil(np.abs(direction.T @ old @ np.diag(spacing * size)).sum(axis=1) / spacing).astype(int)
    grid = sitk.Image([int(n) for n in new_size], labels.GetPixelID())
    grid.SetSpacing(tuple(spacing))
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(tuple(centre - direction @ (spacing * (new_size - 1) / 2)))
    return sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def _mirrored_left_right(labels):
    """The header mirrored left-right: every organ on the other side in patient coordinates."""
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    out = sitk.Image(labels)
    out.SetDirection((np.diag([-1.0, 1.0, 1.0]) @ direction).ravel().tolist())
    return out


def _crop(labels, axis, start, stop):
    """`labels` keeping image indices [start, stop) along image axis `axis` (0 x, 1 y, 2 z)."""
    index, size = [0, 0, 0], list(labels.GetSize())
    index[axis], size[axis] = start, stop - start
    return sitk.RegionOfInterest(labels, size, index)


@pytest.mark.parametrize("axis,degrees", [(2, 45.0), (0, 45.0), (2, -30.0)], ids=["head-feet", "left-right", "hf-30"])
def test_oblique_correct_result_raises_no_position_warning_and_mirrored_it_does(example_labels, axis, degrees):
    oblique = _oblique(example_labels, axis, degrees)
    assert _position_warnings(oblique) == []
    assert ("flipped_left-right", "") in _position_warnings(_mirrored_left_right(oblique))


def _liver_extent(labels, axis):
    index = np.argwhere(sitk.GetArrayViewFromImage(labels) == BY_NAME["liver"].label)[:, 2 - axis]
    return int(index.min()), int(index.max())


def test_half_liver_crops_raise_no_position_warning(example_labels):
    """The example's liver spans z 69-111, x 37-104 (x grows towards the patient's right): crops keeping its
    lower half, the body's right half, its left half (liver cut, spleen whole: called mixed up before) and the
    back (the spleen cut less than the liver: the same)."""
    size = example_labels.GetSize()
    low, high = _liver_extent(example_labels, 2)
    x_low, x_high = _liver_extent(example_labels, 0)
    middle_x = (x_low + x_high) // 2
    crops = {
        "lower half of the liver": _crop(example_labels, 2, 0, (low + high) // 2),
        "right half of the body": _crop(example_labels, 0, size[0] // 2, size[0]),
        "liver cut in half from the left": _crop(example_labels, 0, 0, middle_x),
        "left half of the body": _crop(example_labels, 0, 0, 50),
        "the back only": _crop(example_labels, 1, 0, 40),
    }
    for what, crop in crops.items():
        assert crop.GetSize() != size
        assert "liver" in assess(crop).organs and assess(crop).organs["liver"].at_border, what
        assert _position_warnings(crop) == [], what


def test_a_crop_mirrored_is_still_flagged(example_labels):
    low, high = _liver_extent(example_labels, 2)
    crop = _crop(example_labels, 2, 0, (low + high) // 2 + 8)
    assert ("flipped_left-right", "") in _position_warnings(_mirrored_left_right(crop))


# -- synthetic: the cut that excuses a small liver, and the one that does not ------------------------------------
def _paint(array, organ, centre, radius):
    z, y, x = np.indices(array.shape)
    inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
    array[inside] = BY_NAME[organ].label


def _abdomen(array, spacing=3.0):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    return image


def test_a_small_liver_beside_a_larger_spleen_is_a_mix_up_only_when_the_cut_can_not_explain_it():
    """Voxel units, 3 mm, LPS: liver on the right (low x), spleen 55 voxels (166 mm) to the left at its level,
    kidneys below. Cut by the image's right side (a crop through the body's middle), the liver may be any size:
    no warning. Cut at the top with the spleen, and the atlas (from the kidneys) putting both centres inside
    the image, a 330 mL liver beside a 600 mL spleen is a mix-up."""
    side = np.zeros((80, 70, 110), np.uint8)  # z, y, x
    _paint(side, "liver", (0, 30, 50), 16)  # centred on the right border: half of it (230 mL) cut off
    _paint(side, "spleen", (55, 45, 50), 16)  # 460 mL
    _paint(side, "kidney_right", (10, 46, 27), 8)
    _paint(side, "kidney_left", (47, 47, 30), 8)
    flags = {f.code for f in assess(_abdomen(side), expected=DEFAULT_ORGANS[:4]).warnings}
    assert "liver_spleen_mixed_up" not in flags

    top = np.zeros((62, 70, 110), np.uint8)
    _paint(top, "liver", (30, 30, 61), 18)  # cut by the top face (z = 61): 330 mL left
    _paint(top, "spleen", (85, 45, 61), 22)  # cut by it too: 600 mL left
    _paint(top, "kidney_right", (30, 46, 34), 8)
    _paint(top, "kidney_left", (77, 47, 36), 8)
    report = assess(_abdomen(top), expected=DEFAULT_ORGANS[:4])
    assert {"superior"} == set(report.organs["liver"].at_border) == set(report.organs["spleen"].at_border)
    assert "liver_spleen_mixed_up" in {f.code for f in report.warnings}


# -- the 24 BTCV reference label maps, each cropped to half its extent from each of its six faces -------------
# The three crops still warned about, each for a reason the border gives no sign of: the anterior halves of
# btcv_img0003 and 0010 hold only the aortic arch (in front of the pancreas's remnant) and no cut aorta; btcv_img0009's
# lower half holds its 3 L spleen (true splenomegaly) beside the liver's tip, with the left kidney whole. Before
# this check knew about cuts, 47 of the 144 crops got such warnings.
KNOWN = {
    ("btcv_img0003", 1, "last"): [("flipped_anterior-posterior", "")],
    ("btcv_img0010", 1, "last"): [("flipped_anterior-posterior", "")],
    ("btcv_img0009", 2, "first"): [("liver_spleen_mixed_up", "")],
}


def test_btcv_references_cropped_in_half_from_every_side_raise_no_position_warning():
    found = {}
    paths = sorted(shared("btcv_ct", "labels").glob("*.nii.gz"))
    assert len(paths) == 24
    for path in paths:
        labels = _ours(path, "btcv", BTCV_DIRECTION)
        assert _position_warnings(labels) == [], path.name
        for axis in range(3):
            n = labels.GetSize()[axis]
            for end, (start, stop) in (("first", (0, n // 2)), ("last", (n - n // 2, n))):
                warnings = _position_warnings(_crop(labels, axis, start, stop))
                if warnings:
                    found[(path.name[:12], axis, end)] = warnings
    assert found == KNOWN


# -- a scan whose head end cuts the kidneys or the pancreas lacks the upper abdomen ----------------------------------
def _upper_abdomen_warnings(labels):
    return [f for f in assess(labels, expected=DEFAULT_ORGANS).warnings if f.code == "upper_abdomen_cut"]


def test_no_whole_btcv_reference_and_no_feet_end_crop_lacks_the_upper_abdomen():
    """The 24 BTCV references whole and with their lower half cut away (head end kept) get no such warning; with their
    upper part cut away down to the kidneys' middle, each does."""
    paths = sorted(shared("btcv_ct", "labels").glob("*.nii.gz"))
    assert len(paths) == 24
    for path in paths:
        labels = _ours(path, "btcv", BTCV_DIRECTION)
        n = labels.GetSize()[2]  # z grows towards the head (direction +1)
        assert _upper_abdomen_warnings(labels) == [], path.name
        assert _upper_abdomen_warnings(_crop(labels, 2, n - n // 2, n)) == [], path.name
        kidneys = np.nonzero(
            np.isin(sitk.GetArrayViewFromImage(labels), [BY_NAME["kidney_right"].label, BY_NAME["kidney_left"].label])
        )[0]
        middle = int((kidneys.min() + kidneys.max()) // 2)
        warned = _upper_abdomen_warnings(_crop(labels, 2, 0, middle + 1))
        assert len(warned) == 1 and "kidney" in str(warned[0]), path.name
