"""Issue 28's first contact: the quick start on the shipped sample CT (TotalSegmentator's example, Apache-2.0)
ends with exit 0, no warning and a per-organ summary on stdout; its picture's axial view shows the kidneys and
pancreas; the notes on it are about organs that are really worse; the spleen's stray islands are gone."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.organs import BY_NAME, convert_labels
from AbdomenSegLib.models.packages import RESOURCES, SAMPLE_CT
from helpers import shared

GOOD = 0.85


def test_the_sample_ships_with_its_licence_and_as_package_data():
    folder = RESOURCES / "Samples"
    assert SAMPLE_CT == folder / "example_ct.nii.gz" and SAMPLE_CT.stat().st_size < 3_000_000
    assert "Apache License" in (folder / "LICENSE").read_text() and "Version 2.0" in (folder / "LICENSE").read_text()
    assert "github.com/wasserth/TotalSegmentator" in (folder / "NOTICE").read_text()
    assert "not a person's" in (folder / "README.md").read_text()
    pyproject = (RESOURCES.parent / "pyproject.toml").read_text()
    assert '"Samples/*.nii.gz"' in pyproject and '"Samples/LICENSE"' in pyproject and '"Samples/NOTICE"' in pyproject
    image = sitk.ReadImage(str(SAMPLE_CT))
    assert image.GetSize() == (122, 101, 112) and float(sitk.GetArrayViewFromImage(image).min()) < -900  # HU


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    return out


def _dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else None


def test_quick_start_exits_0_without_warning_and_prints_the_organs(quick_start, capsys):
    out = quick_start
    code = main(
        [
            "segment",
            str(SAMPLE_CT),
            str(out / "organs.nii.gz"),
            "--qc",
            str(out / "qc.json"),
            "--qc-png",
            str(out / "qc.png"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" not in captured.err.lower() and "FLAGGED" not in captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[:4] == ["organ", "volume", "mL", "mean"] and "confidence" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    liver = rows["liver"]
    assert 1000 < float(liver[0]) < 1400  # mL
    assert 20 < float(liver[1]) < 80  # mean HU of an unenhanced liver (this scan: ~45 HU)
    assert 0.5 < float(liver[-1]) <= 1.0  # confidence
    # A few stray voxels are "not found", never a volume (issue 28: "Gallbladder 0.1 mL" beside "not found").
    report = json.loads((out / "qc.json").read_text())
    for name, entry in report["organs"].items():
        if entry["volume_ml"] < 0.5:
            assert rows[name] == ["not", "found"], name
    # Intensity statistics in qc.json, computed independently here.
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "organs.nii.gz")))
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_CT))).astype(np.float64)
    values = ct[labels == BY_NAME["liver"].label]
    entry = report["organs"]["liver"]
    assert entry["mean"] == pytest.approx(values.mean(), abs=1e-6) and entry["median"] == pytest.approx(
        np.median(values)
    )
    assert entry["sd"] == pytest.approx(values.std(), abs=1e-6) and report["intensity_unit"] == "HU"


def test_quick_start_result_against_totalsegmentators_labels(quick_start):
    """The reference is TotalSegmentator's model output (not a person's), in ../shared only."""
    reference = sitk.ReadImage(str(shared("totalseg_example", "example_seg_fast_force_split.nii.gz")))
    out = quick_start
    if not (out / "organs.nii.gz").exists():
        pytest.skip("needs the quick start's result (test above)")
    labels = sitk.ReadImage(str(out / "organs.nii.gz"))
    assert labels.GetSize() == reference.GetSize() and labels.GetOrigin() == reference.GetOrigin()
    pred = sitk.GetArrayFromImage(labels)
    ref = convert_labels(sitk.GetArrayFromImage(reference), "totalseg")
    dice = {n: _dice(pred == o.label, ref == o.label) for n, o in BY_NAME.items()}
    assert dice["liver"] > 0.93 and dice["spleen"] > 0.93 and dice["kidney_left"] > 0.9
    report = json.loads((out / "qc.json").read_text())
    # The spleen's false-positive islands along the stomach (17 pieces before) are removed by default.
    assert report["organs"]["spleen"]["pieces"] <= 2
    # Low-confidence notes only on organs that really are worse than good (Dice < 0.85 against the reference).
    unsure = [n["organ"] for n in report["notes"] if n["code"] == "low_confidence"]
    assert unsure and all(dice[name] is None or dice[name] < GOOD for name in unsure), (unsure, dice)
    # Vessels pass through any field of view: no border note for them.
    cut = [n["organ"] for n in report["notes"] if n["code"] == "cut_by_border"]
    assert "aorta" not in cut and "inferior_vena_cava" not in cut and "liver" in cut


def test_quick_start_picture_cuts_through_kidneys_and_pancreas(quick_start):
    """The sheet's axial view lies where both kidneys and the pancreas show (it was slice 110 of 112)."""
    from AbdomenSegLib.qc.sheet import _centre_slices, _lps_views

    out = quick_start
    if not (out / "qc.png").exists():
        pytest.skip("needs the quick start's result")
    image, labels = sitk.ReadImage(str(SAMPLE_CT)), sitk.ReadImage(str(out / "organs.nii.gz"))
    _, label_array, *_ = _lps_views(image, labels)
    (z, _, _), found = _centre_slices(label_array)
    present = set(np.unique(label_array[z]).tolist())
    assert found and {BY_NAME[n].label for n in ("kidney_right", "kidney_left", "pancreas")} <= present
    from PIL import Image

    assert Image.open(out / "qc.png").size == (1400, 800)


def test_shipped_pictures_show_the_real_result_in_the_organ_colours():
    """The extension's screenshot and the README picture are the example CT's result (bench/render_screenshot.py),
    drawn in the current organ colours (outlines of the liver, both kidneys, the pancreas)."""
    from PIL import Image

    root = RESOURCES.parent
    for path, size in (
        (root / "Resources" / "Screenshots" / "AbdomenSeg-result.png", (900, 468)),
        (root / "docs" / "images" / "example_ct_result.png", (1400, 800)),
    ):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape[1::-1] == size, path
        colours = {tuple(c) for c in pixels.reshape(-1, 3)[::1]}
        for organ in ("liver", "kidney_right", "kidney_left", "pancreas", "inferior_vena_cava"):
            assert BY_NAME[organ].color in colours, (path.name, organ)
    assert "example_ct" in (root / "bench" / "render_screenshot.py").read_text()


def test_small_islands_go_large_pieces_and_exempt_organs_stay():
    """postprocess.remove_small_islands: non-largest pieces under the size go; a large second piece, a piece touching
    the main body by a corner (26-connected) and organs not listed stay. The default card switches it on."""
    from AbdomenSegLib.inference.postprocess import remove_small_islands
    from AbdomenSegLib.models.packages import find_model

    labels = np.zeros((30, 30, 30), np.uint8)
    spleen, vein = BY_NAME["spleen"].label, BY_NAME["portal_splenic_vein"].label
    labels[2:12, 2:12, 2:12] = spleen  # main body, 1000 voxels
    labels[20:22, 20:22, 20:22] = spleen  # 8-voxel island
    labels[12, 12, 12] = spleen  # touches the main body's corner: the same piece
    labels[15:22, 2:12, 2:12] = spleen  # 700-voxel second half
    labels[25:27, 2:4, 2:4] = vein  # island of an organ not listed
    out = remove_small_islands(labels.copy(), voxel_ml=1.0 / 1000.0, max_ml=0.5, organs=[spleen])
    assert (out[20:22, 20:22, 20:22] == 0).all() and out[12, 12, 12] == spleen
    assert (out[15:22, 2:12, 2:12] == spleen).all() and (out[25:27, 2:4, 2:4] == vein).all()
    post = find_model()["postprocess"]
    assert post["remove_islands_ml"] == 5.0 and post["keep_islands"] == ["portal_splenic_vein"]
