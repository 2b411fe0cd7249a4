"""The one-call Python API (AbdomenSegLib.segment, evaluate, compare, list_models): the same results as the command
line, its checks before work, and `import AbdomenSegLib` without torch."""

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import AbdomenSegLib
from AbdomenSegLib.cli import main
from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT


@pytest.fixture
def phantom(tmp_path):
    ct, labels = make_phantom(size=(48, 40, 24), spacing=(8.0, 8.0, 10.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "ref.nii.gz"))
    return tmp_path


def test_segment_matches_the_command_line_voxel_for_voxel(phantom, tiny_package, capsys):
    model = str(tiny_package.path)
    assert main(["segment", str(phantom / "ct.nii.gz"), str(phantom / "cli.nii.gz"), "--model", model]) in (0, 3)
    labels = AbdomenSegLib.segment(phantom / "ct.nii.gz", phantom / "api.nii.gz", model=model, log=lambda m: None)
    cli = sitk.ReadImage(str(phantom / "cli.nii.gz"))
    written = sitk.ReadImage(str(phantom / "api.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(cli))
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(cli))
    ct = sitk.ReadImage(str(phantom / "ct.nii.gz"))
    for image in (labels, written):  # the input's exact grid
        assert image.GetSize() == ct.GetSize() and image.GetSpacing() == ct.GetSpacing()
        assert image.GetOrigin() == ct.GetOrigin() and image.GetDirection() == ct.GetDirection()


def test_segment_takes_an_image_and_refuses_before_work(phantom, tiny_package):
    ct = sitk.ReadImage(str(phantom / "ct.nii.gz"))
    labels = AbdomenSegLib.segment(ct, model=str(tiny_package.path), organs=["liver"], log=lambda m: None)
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1}
    (phantom / "taken.nii.gz").write_bytes(b"mine")
    with pytest.raises(AbdomenSegLib.AbdomenSegError, match="exists"):
        AbdomenSegLib.segment(ct, phantom / "taken.nii.gz", model=str(tiny_package.path))
    assert (phantom / "taken.nii.gz").read_bytes() == b"mine"  # never overwritten unasked
    with pytest.raises(AbdomenSegLib.AbdomenSegError, match="does not segment"):
        AbdomenSegLib.segment(ct, model=str(tiny_package.path), organs=["aorta"])
    with pytest.raises(AbdomenSegLib.AbdomenSegError, match="is the input"):
        AbdomenSegLib.segment(phantom / "ct.nii.gz", phantom / "ct.nii.gz", model=str(tiny_package.path))


def test_evaluate_scores_a_perfect_and_an_emptied_prediction(phantom):
    reference = sitk.ReadImage(str(phantom / "ref.nii.gz"))
    rows = {r["organ"]: r for r in AbdomenSegLib.evaluate(reference, phantom / "ref.nii.gz")}
    assert rows["liver"]["dice"] == pytest.approx(1.0) and rows["spleen"]["dice"] == pytest.approx(1.0)
    array = sitk.GetArrayFromImage(reference)
    array[array == 1] = 0  # the liver removed
    emptied = sitk.GetImageFromArray(array)
    emptied.CopyInformation(reference)
    rows = {r["organ"]: r for r in AbdomenSegLib.evaluate(emptied, reference)}
    assert rows["liver"]["dice"] == pytest.approx(0.0) and rows["spleen"]["dice"] == pytest.approx(1.0)


def test_list_models_is_the_catalog_with_the_default_in_it():
    names = [card.name for card in AbdomenSegLib.list_models()]
    assert "btcv-ct-3d-unet" in names and AbdomenSegLib.default_model().name in names


def test_import_is_light_and_typed():
    code = "import sys, AbdomenSegLib; print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert (ROOT / "AbdomenSegLib" / "py.typed").is_file()
