"""Issue 31, round two: the intensity checks before any work (preprocessing/pipeline.py) on every real scan in
../shared/data: none refused, every one of them refused once inverted, every CT refused by an MR model. Read and
check only (no model), so the whole set takes seconds."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.images import read_image
from AbdomenSegLib.preprocessing.pipeline import (
    INVERTED_RANK,
    _side_rank,
    check_ct_for_mr_model,
    check_input,
    check_intensity_polarity,
)
from helpers import shared


def _real_scans():
    """(name, image, modality, input intensity) of every real scan: the 24 BTCV CTs (0-255 windowed), the 16
    CHAOS T2 MRs, TotalSegmentator's example CT and MR, dcmqi's 3-slice CT series."""
    scans = []
    for folder, modality, intensity in (("btcv_ct", "CT", "btcv_uint8"), ("chaos_mr_t2", "MR", "native")):
        for path in sorted(shared(folder, "images").glob("*.nii.gz")):
            scans.append((path.name, sitk.ReadImage(str(path)), modality, intensity))
    example = shared("totalseg_example")
    scans.append(("example_ct", sitk.ReadImage(str(example / "example_ct.nii.gz")), "CT", "native"))
    scans.append(("example_mr", sitk.ReadImage(str(example / "example_mr_sm.nii.gz")), "MR", "native"))
    scans.append(("dcmqi ct-3slice", read_image(shared("dcmqi_ct3slice", "ct-3slice")), "CT", "native"))
    assert len(scans) == 43
    return scans


@pytest.fixture(scope="module")
def real_scans():
    return _real_scans()


def _inverted(image: sitk.Image, how: str) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(-array if how == "negated" else array.max() + array.min() - array)
    out.CopyInformation(image)
    return out


def test_no_real_scan_is_refused_by_the_intensity_checks(real_scans):
    for name, image, modality, intensity in real_scans:
        check_intensity_polarity(image, modality, name)
        check_ct_for_mr_model(image, modality, intensity, name)
        if name != "dcmqi ct-3slice":  # 3 slices: the extent checks refuse it, rightly, whatever its values
            check_input(image, modality, input_intensity=intensity, name=name)


def test_the_air_around_every_real_ct_is_its_darkest_and_inverted_its_brightest(real_scans):
    """The threshold's margin on the data: every real CT well below INVERTED_RANK (measured 0.17-0.30), every
    inverted one well above (0.70-0.83)."""
    cts = [(name, image) for name, image, modality, _ in real_scans if modality == "CT"]
    assert len(cts) == 26
    for name, image in cts:
        assert _side_rank(image)[0] <= INVERTED_RANK - 0.25, name
        for how in ("negated", "max + min - value"):
            assert _side_rank(_inverted(image, how))[0] >= INVERTED_RANK + 0.05, (name, how)


@pytest.mark.parametrize("how", ["negated", "max + min - value"])
def test_every_real_ct_inverted_is_refused_as_inverted(real_scans, how):
    for name, image, modality, _ in real_scans:
        if modality != "CT":
            continue
        with pytest.raises(AbdomenSegError, match="values look inverted") as refused:
            check_intensity_polarity(_inverted(image, how), "CT", name)
        if how == "negated" and name != "dcmqi ct-3slice" and not name.startswith("btcv"):
            assert "multiply them by -1" in refused.value.fix, name  # air at +1000: said to be negated


def test_every_real_ct_in_hu_is_refused_by_an_mr_model_and_no_mr_is(real_scans):
    for name, image, modality, intensity in real_scans:
        if modality == "MR":
            check_ct_for_mr_model(image, "MR", "native", name)
            continue
        with pytest.raises(AbdomenSegError, match="a windowed CT|looks like a CT in HU") as refused:
            check_ct_for_mr_model(image, "MR", intensity, name)
        assert "--model btcv-ct-3d-unet" in refused.value.fix, name
