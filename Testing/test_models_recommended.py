"""Issue 28: the right model without knowing the zoo. With no model named, an MR scan (DICOM Modality MR, or
values that fail the CT-in-HU check the way MR does) gets the recommended MR model, said on one line; the CT
refusal names the model to use; `models` lists the recommended models first, one line each."""

import json

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.models.choice import image_modality, looks_like_mr, model_for_image
from AbdomenSegLib.models.packages import SAMPLE_CT, default_model_name, recommended_model
from helpers import shared

MR_MODEL = "mr-any-3d-unet"


def test_the_catalog_recommends_the_mr_model():
    assert recommended_model("MR") == MR_MODEL and recommended_model("CT") == default_model_name()


def test_mr_is_told_from_ct_windowed_ct_and_unrescaled_ct():
    ct = sitk.ReadImage(str(SAMPLE_CT))
    assert not looks_like_mr(ct)
    unrescaled = sitk.Cast(ct, sitk.sitkInt32) + 1024  # DICOM CT without its rescale intercept: 0..4400
    assert not looks_like_mr(unrescaled)
    phantom, _ = make_phantom()
    assert not looks_like_mr(phantom)
    assert looks_like_mr(sitk.ReadImage(str(shared("totalseg_example", "example_mr_sm.nii.gz"))))
    assert looks_like_mr(sitk.ReadImage(str(shared("chaos_mr_t2", "images", "chaosT2_03.nii.gz"))))
    btcv = sitk.ReadImage(str(shared("btcv_ct", "images", "btcv_img0001.nii.gz")))  # 0..255 windowed CT
    assert not looks_like_mr(btcv) and model_for_image(btcv) == (default_model_name(), "")


def test_dicom_modality_decides_where_known():
    ct = sitk.ReadImage(str(SAMPLE_CT))
    tagged = sitk.Image(ct)
    tagged.SetMetaData("0008|0060", "MR")
    assert image_modality(tagged) == "MR" and image_modality(ct) == ""
    name, line = model_for_image(tagged)
    assert name == MR_MODEL and "DICOM Modality MR" in line and "\n" not in line
    assert model_for_image(ct, dicom_modality="CT") == (default_model_name(), "")


def test_mr_scan_without_a_model_gets_the_mr_model(tmp_path, capsys):
    mr = shared("totalseg_example", "example_mr_sm.nii.gz")
    code = main(["segment", str(mr), str(tmp_path / "organs.nii.gz"), "--qc", str(tmp_path / "qc.json")])
    err = capsys.readouterr().err
    # TotalSegmentator's small example MR covers 60 mm head-feet: written, flagged as shorter than the model was seen
    # to segment reliably (models/extent.py), and flagged for nothing else
    assert code == 3, err
    assert (
        [line for line in err.splitlines() if line.startswith("warning:")]
        == [line for line in err.splitlines() if line.startswith("warning:") and "covers only 60 mm along z" in line]
        != []
    ), err
    said = [line for line in err.splitlines() if MR_MODEL in line and "recommended MR model" in line]
    assert len(said) == 1, err
    assert json.loads((tmp_path / "qc.json").read_text())["model"] == MR_MODEL
    labels = sitk.ReadImage(str(tmp_path / "organs.nii.gz"))
    image = sitk.ReadImage(str(mr))
    assert labels.GetSize() == image.GetSize() and labels.GetDirection() == image.GetDirection()
    assert np.count_nonzero(sitk.GetArrayViewFromImage(labels) == 1) > 1000  # a liver


def test_the_ct_refusal_names_the_model_to_use(tmp_path, capsys):
    mr = shared("totalseg_example", "example_mr_sm.nii.gz")
    code = main(["segment", str(mr), str(tmp_path / "o.nii.gz"), "--model", default_model_name()])
    err = capsys.readouterr().err
    assert code == 2 and f"--model {MR_MODEL}" in err and "error: " in err


def test_models_lists_the_recommended_first_one_line_each(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Recommended:"
    first, second = lines[1].split(), lines[2].split()
    assert first[:2] == [default_model_name(), "(default)"] and "CT" in lines[1]
    assert second[0] == MR_MODEL and "MR" in lines[2]
    assert lines[3] == "" and lines[4].startswith(default_model_name() + ":")


def test_slicer_logic_suggests_the_mr_model_from_the_volumes_dicom_modality():
    from AbdomenSegLib.slicer.logic import AbdomenSegCore, dicom_modality

    class Node:  # the two attributes Slicer's DICOM import sets or our panel reads
        def __init__(self, attributes):
            self.attributes = attributes

        def GetAttribute(self, key):
            return self.attributes.get(key)

    ct = sitk.ReadImage(str(SAMPLE_CT))
    assert dicom_modality(Node({})) == "" and dicom_modality(Node({"DICOM.Modality": "MR "})) == "MR"
    core = AbdomenSegCore(scene=None, log=lambda m: None)
    assert core.model_for_volume(Node({"DICOM.Modality": "MR"}), ct)[0] == MR_MODEL
    assert core.model_for_volume(Node({}), ct) == (default_model_name(), "")
