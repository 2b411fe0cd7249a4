"""The fine second stage (cascade.py): the crop box is the first stage's region organs plus the margin in mm,
clipped, on an anisotropic rotated image; the second stage writes only inside it and the output keeps the input's
exact grid; a first stage without region organs skips it with a note; missing or unfit stages are refused before
any work; the training cache of a region config holds the box around the reference region."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_NAME
from AbdomenSegLib.inference.cascade import CascadeSegmenter, segment_crop
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.io.phantom import make_phantom, rotation
from AbdomenSegLib.models.choice import resolve
from AbdomenSegLib.models.packages import export_package, find_model
from AbdomenSegLib.preprocessing.region import Box, crop

ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas", "gallbladder", "stomach", "aorta"]
REGION = ["pancreas", "gallbladder"]
ARCH = {"class": "UNet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}}
PANCREAS, GALLBLADDER, LIVER = (BY_NAME[o].label for o in ("pancreas", "gallbladder", "liver"))


def _card(name, *, spacing=(4.0, 4.0, 5.0), modality="CT", cascade=None, tta=False):
    intensity = {"mode": "ct_window", "window": [-125, 275]} if modality == "CT" else {"mode": "mr_percentile"}
    card = {
        "name": name,
        "title": name,
        "dimensions": 3,
        "architecture": ARCH,
        "modality": modality,
        "labels": {str(i): o for i, o in enumerate(ORGANS, 1)},
        "spacing": list(spacing),
        "orientation": "LPS",
        "intensity": intensity,
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian"},
    }
    if tta:
        card["inference"]["tta_mirror_axes"] = ["x"]
    if cascade:
        card["cascade"] = {"organs": REGION, "margin_mm": [10, 10, 200], **cascade}
    return card


def _network(answer=None):
    """A tiny network; with `answer` (an organ name, or "background") one whose output is that class everywhere."""
    import torch

    from AbdomenSegLib.models.networks import build_network

    torch.manual_seed(0)
    net = build_network(ARCH, 1, len(ORGANS) + 1)
    if answer is not None:
        channel = 0 if answer == "background" else ORGANS.index(answer) + 1
        last = [n for n, p in net.named_parameters() if n.endswith("bias") and p.shape[0] == len(ORGANS) + 1][-1]
        layer = net.get_submodule(last.rsplit(".", 1)[0])
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
            layer.bias[channel] = 10.0
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """first (answers liver everywhere), its fine stages (pancreas everywhere, background everywhere), a first stage
    with no second stage, an MR second stage behind a CT first stage, one behind a first stage not installed."""
    folder = tmp_path_factory.mktemp("models")
    fine = {"spacing": (2.5, 2.5, 3.0)}
    packages = [
        (_card("first"), "liver"),
        (_card("fine-pancreas", **fine, cascade={"first_stage": "first"}), "pancreas"),
        (_card("fine-background", **fine, cascade={"first_stage": "first"}), "background"),
        (_card("lonely"), None),
        (_card("fine-mr", **fine, modality="MR", cascade={"first_stage": "first"}), None),
        (_card("fine-orphan", **fine, cascade={"first_stage": "absent"}), None),
        (_card("first-mirrored", tta=True), None),
        (_card("fine-plain", **fine, cascade={"first_stage": "first-mirrored"}), None),
        (_card("first-gb"), "gallbladder"),  # a region organ everywhere: its fine stage runs on the whole image
        (_card("fine-gb", **fine, cascade={"first_stage": "first-gb"}), "pancreas"),
    ]
    for index, (card, answer) in enumerate(packages):
        export_package(_network(answer), card, folder / card["name"], register_in=folder, make_default=index == 0)
    return folder


def _rotated_phantom():
    """An anisotropic phantom whose axes are rotated about z and x (each still nearest its own world axis)."""
    direction = rotation("z", 25) @ rotation("x", 12)
    return make_phantom(size=(50, 44, 22), spacing=(7.0, 6.0, 11.0), direction=direction)


def _perfect_first_stage(monkeypatch, cascade, reference):
    """The first stage answers the phantom's reference labels (so the region is known); the rest is real."""

    def segment(image, options=None, progress=None, cancel=None, prepared=None):
        out = sitk.Image(reference)
        out.CopyInformation(image)
        return out

    monkeypatch.setattr(cascade.first, "segment", segment)  # the cached first stage: restored after the test


def _expected_box(reference, margin_mm) -> Box:
    """The region organs' index box of the reference plus the margin (mm -> whole voxels per axis), clipped."""
    array = np.isin(sitk.GetArrayFromImage(reference), [PANCREAS, GALLBLADDER])
    low, high = [], []
    for axis in range(3):  # x, y, z
        along = np.nonzero(array.any(axis=tuple(a for a in range(3) if a != 2 - axis)))[0]
        voxels = int(np.ceil(margin_mm[axis] / reference.GetSpacing()[axis]))
        low.append(max(0, int(along[0]) - voxels))
        high.append(min(reference.GetSize()[axis], int(along[-1]) + 1 + voxels))
    return Box(tuple(low), tuple(h - lo for lo, h in zip(low, high)))


@pytest.mark.parametrize("fine", ["fine-pancreas", "fine-background"])
def test_the_second_stage_writes_only_inside_the_region_box_and_the_output_keeps_the_input_grid(
    models, fine, monkeypatch
):
    ct, reference = _rotated_phantom()
    cascade = CascadeSegmenter(
        get_segmenter(find_model("first", models), "cpu"), find_model(fine, models), log=lambda m: None
    )
    _perfect_first_stage(monkeypatch, cascade, reference)
    messages = []
    out = cascade.segment(ct, Options(), progress=lambda f, m: messages.append((f, m)))

    box = _expected_box(reference, [10, 10, 200])
    assert cascade.last_box == box
    assert box.size[2] == ct.GetSize()[2] and box.size[0] < ct.GetSize()[0] - 4  # z clipped, x not
    assert out.GetSize() == ct.GetSize() and out.GetOrigin() == ct.GetOrigin()
    assert out.GetSpacing() == ct.GetSpacing() and out.GetDirection() == ct.GetDirection()

    first, labels = sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(out)
    outside = np.ones(first.shape, dtype=bool)
    outside[box.slices] = False
    np.testing.assert_array_equal(labels[outside], first[outside])
    # Inside: the region organs are the second stage's (run here alone on the same crop); the others stay.
    second = Segmenter(find_model(fine, models), "cpu", log=lambda m: None)
    alone = sitk.GetArrayFromImage(segment_crop(second, crop(ct, box), Options()))
    inside, region = first[box.slices], np.isin(alone, [PANCREAS, GALLBLADDER])
    expected = np.where(np.isin(inside, [PANCREAS, GALLBLADDER]), 0, inside)
    expected[region] = alone[region]
    np.testing.assert_array_equal(labels[box.slices], expected)
    if fine == "fine-pancreas":
        assert region.mean() > 0.5 and not (labels == GALLBLADDER).any()
    else:
        assert not region.any() and not np.isin(labels, [PANCREAS, GALLBLADDER]).any()
        assert (labels[box.slices] == LIVER).sum() == (inside == LIVER).sum() > 0  # other organs kept
    assert [f for f, _ in messages] == sorted(f for f, _ in messages) and messages[-1][0] == 1.0
    assert any("fine stage" in m for _, m in messages)
    assert {"fine_infer", "fine_preprocess", "fine_resample_back", "region"} <= set(cascade.timings.stages)


def test_no_region_organ_in_the_first_stage_skips_the_second_with_a_note(models):
    ct, _ = _rotated_phantom()
    notes = []
    cascade = get_segmenter(find_model("first", models), "cpu", log=notes.append, quality="high")
    assert isinstance(cascade, CascadeSegmenter) and cascade.second.card.name == "fine-pancreas"  # catalog order
    out = cascade.segment(ct, Options())
    alone = get_segmenter(find_model("first", models), "cpu", log=lambda m: None).segment(ct, Options())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(alone))
    assert (sitk.GetArrayFromImage(alone) == LIVER).any() and cascade.last_box is None
    assert any("found none of pancreas, gallbladder" in n and "skipped" in n for n in notes)
    assert "infer" in cascade.timings.stages and "fine_infer" not in cascade.timings.stages


@pytest.mark.parametrize(
    "model, quality, message",
    [
        ("lonely", "high", "no fine second-stage model is installed for 'lonely'"),
        ("fine-mr", "standard", "it is for MR but its first stage 'first' is CT"),
        ("fine-orphan", "standard", "needs its first stage 'absent', which cannot be used"),
        ("first+lonely", "high", "runs one first-stage model, not the ensemble"),
        ("first+fine-pancreas", "standard", "has fine second-stage models among its members"),
        ("first-mirrored", "high", "model 'fine-plain' was not trained with mirroring"),
    ],
)
def test_missing_or_unfit_stages_are_refused_before_any_work(
    models, tmp_path, monkeypatch, capsys, model, quality, message
):
    def no_network(*args, **kwargs):
        raise AssertionError("a network was loaded")

    monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
    monkeypatch.setattr("AbdomenSegLib.inference.segmenter.load_network", no_network)
    tta = model == "first-mirrored"  # its first stage allows mirroring; its second stage does not
    with pytest.raises(AbdomenSegError, match=message):
        resolve(model, tta, models, quality=quality)
    ct, _ = _rotated_phantom()
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    args = ["segment", str(tmp_path / "ct.nii.gz"), str(tmp_path / "out.nii.gz"), "--model", model]
    assert main(args + ["--quality", quality, "--device", "cpu"] + ["--tta"] * tta) == 2
    assert not (tmp_path / "out.nii.gz").exists()
    assert "error: " in capsys.readouterr().err


def test_a_second_stage_card_with_a_bad_cascade_block_is_refused(models, tmp_path):
    card = json.loads((models / "fine-pancreas" / "card.json").read_text())
    card["cascade"]["organs"] = ["pancreas", "duodenum_typo"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "card.json").write_text(json.dumps(card))
    with pytest.raises(AbdomenSegError, match="cascade.organs"):
        find_model(str(tmp_path / "bad"))


def test_the_region_cache_holds_the_box_around_the_reference_region(tmp_path):
    from AbdomenSegLib.preprocessing.datasets import build_cache, cached_cases

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ct, labels = make_phantom(size=(60, 50, 24), spacing=(6.0, 5.0, 10.0))
    sitk.WriteImage(ct, str(root / "images" / "case0.nii.gz"))
    sitk.WriteImage(labels, str(root / "labels" / "case0.nii.gz"))
    settings = {
        "spacing": [3.0, 2.5, 4.0],
        "intensity": {"mode": "ct_window", "window": [-125, 275]},
        "convention": "abdomenseg",
        "log": lambda m: None,
    }
    region = {"organs": REGION, "margin_mm": [12, 12, 20]}
    image, organs = cached_cases(build_cache(root, tmp_path / "region.npz", region=region, **settings))["case0"]
    whole, _ = cached_cases(build_cache(root, tmp_path / "whole.npz", **settings))["case0"]

    box = _expected_box(labels, region["margin_mm"])
    extent = np.array(box.size) * np.array(labels.GetSpacing())  # x, y, z mm
    assert image.shape == tuple(int(round(e / s)) for e, s in zip(extent[::-1], settings["spacing"][::-1]))
    assert image.shape < whole.shape and organs.shape == image.shape
    # Every region organ voxel of the reference is in the cache (same volume at the finer grid, within 10%).
    voxel = np.prod(settings["spacing"])
    for value in (PANCREAS, GALLBLADDER):
        reference_mm3 = (sitk.GetArrayFromImage(labels) == value).sum() * np.prod(labels.GetSpacing())
        assert abs((organs == value).sum() * voxel - reference_mm3) < 0.1 * reference_mm3
    assert set(np.unique(organs)) >= {0, PANCREAS, GALLBLADDER}


def test_a_second_stage_is_validated_on_the_region_crop_of_each_case(models, tmp_path):
    """export.validation_rows cuts each validation case to its reference region before the second stage
    runs: a second stage answering pancreas everywhere predicts the crop's volume, not the scan's."""
    from AbdomenSegLib.models.packages import ModelCard
    from AbdomenSegLib.training.export import REGION_PROTOCOL, validate_package

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ct, labels = _rotated_phantom()
    sitk.WriteImage(ct, str(root / "images" / "case0.nii.gz"))
    sitk.WriteImage(labels, str(root / "labels" / "case0.nii.gz"))
    fine = find_model("fine-pancreas", models)
    data = {"root": str(root), "convention": "abdomenseg", "input_intensity": "native", "direction": None}
    card = ModelCard(fine.path, dict(fine.data, training={"config": {"data": data}, "validation_cases": ["case0"]}))
    summary = validate_package(card, log=lambda m: None)

    assert summary["protocol"] == REGION_PROTOCOL and summary["cases"] == ["case0"]
    box = _expected_box(labels, [10, 10, 200])
    crop_ml = np.prod(box.size) * np.prod(ct.GetSpacing()) / 1000
    pancreas_ml = (sitk.GetArrayFromImage(labels) == PANCREAS).sum() * np.prod(ct.GetSpacing()) / 1000
    dice = summary["dice"]["pancreas"]
    # pancreas everywhere in the crop: Dice 2|P| / (|P| + |crop|) (the crop's edge may answer background)
    assert dice == pytest.approx(2 * pancreas_ml / (pancreas_ml + crop_ml), rel=0.15)
    assert dice > 2 * pancreas_ml / (pancreas_ml + np.prod(ct.GetSize()) * np.prod(ct.GetSpacing()) / 1000) * 1.5


def test_the_slicer_panels_quality_high_runs_the_cli_cascade_in_its_engine_process(models, tmp_path, monkeypatch):
    """Quality "high" in the panel reaches the engine process as the command line's --quality high: the same
    labels (the fine stage's pancreas over the first stage's gallbladder), where "standard" keeps the first's."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (requirements-dev.txt) provides Slicer's MRML")
    from test_slicer_logic import volume_node
    from test_slicer_panel import _run_to_end

    from AbdomenSegLib.slicer import logic as sl
    from AbdomenSegLib.slicer.engine_worker import EngineWorker
    from AbdomenSegLib.slicer.runs import BackgroundRun

    monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
    monkeypatch.setenv("ABDOMENSEG_MODELS", str(models))  # the engine process the panel starts
    ct, _ = make_phantom(size=(30, 28, 10), spacing=(9.0, 8.5, 15.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    cli = {}
    for quality in ("standard", "high"):
        out = tmp_path / f"{quality}.nrrd"
        args = ["segment", str(tmp_path / "ct.nrrd"), str(out), "--model", "first-gb", "--device", "cpu"]
        assert main(args + ["--quality", quality, "--no-qc-png"]) in (0, 3)
        cli[quality] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert (cli["standard"] == GALLBLADDER).all() and (cli["high"] == PANCREAS).all()
    scene = slicer.mrmlScene = slicer.vtkMRMLScene()
    worker = EngineWorker()
    try:
        vol = volume_node(scene, ct)
        core = sl.AbdomenSegCore(scene, log=lambda m: None)
        run = _run_to_end(BackgroundRun(core, vol, ["first-gb"], device="cpu", quality="high", worker=worker), 600)
        assert run.error is None, run.error
        ((name, seg),) = run.results.items()
        panel = sitk.GetArrayFromImage(sl.segmentation_to_labels(scene, seg, vol))
        # the result names both models, so it is not taken for the first model's alone
        assert name == seg.GetAttribute("AbdomenSeg.model") == "first-gb>fine-gb"
        # the in-process core (the batch script's path) runs the same cascade
        inline = core.segment(vol, model="first-gb", device="cpu", quality="high")
        assert inline.GetAttribute("AbdomenSeg.model") == "first-gb>fine-gb"
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sl.segmentation_to_labels(scene, inline, vol)), cli["high"]
        )
    finally:
        worker.stop()
        scene.Clear(1)
    np.testing.assert_array_equal(panel, cli["high"])


def test_the_fine_stage_crop_must_fit_in_memory_at_its_own_spacing(models, monkeypatch):
    """The whole scan fits at the first stage's spacing but its region (here the whole image) not at the second
    stage's finer one: refused with the memory error, not an out-of-memory crash."""
    from AbdomenSegLib.core.limits import estimate_memory

    ct, _ = _rotated_phantom()
    size, spacing = ct.GetSize(), ct.GetSpacing()
    channels = len(ORGANS) + 1
    whole = estimate_memory(size, spacing, (4.0, 4.0, 5.0), channels)
    fine = estimate_memory(size, spacing, (2.5, 2.5, 3.0), channels)
    assert fine > 1.5 * whole
    monkeypatch.setenv("ABDOMENSEG_MAX_MEMORY_GB", str((whole + fine) / 2 / 1e9))
    cascade = get_segmenter(find_model("first-gb", models), "cpu", log=lambda m: None, quality="high")
    with pytest.raises(AbdomenSegError, match="segmenting the small organs' region would need about"):
        cascade.segment(ct, Options())


@pytest.mark.parametrize(
    "config, trainer, message",
    [
        ("Resources/configs/btcv_ct_3d_fine.json", "synth", "data.region"),
        ("experiments/configs/mr_any_3d_stage7.json", "standard", "data.perirenal"),
    ],
)
def test_config_options_a_trainer_would_ignore_are_refused(config, trainer, message):
    from AbdomenSegLib.training.config import check_config, load_config
    from helpers import ROOT, shared

    shared("btcv_ct"), shared("chaos_mr_t2")  # the configs' data roots are checked first: without them, skip
    loaded = load_config(ROOT / config)
    loaded["train"]["trainer"] = trainer
    with pytest.raises(AbdomenSegError, match=message):
        check_config(loaded)


def test_the_margin_follows_the_world_axis_each_image_axis_lies_along():
    """Image axes swapped against the world (i along y, j along x) and unequal margins: each image axis gets the
    margin of its own world axis, in its own voxels, clipped at the border."""
    from AbdomenSegLib.preprocessing.region import region_box

    labels = np.zeros((20, 40, 50), dtype=np.uint8)  # z, j, i
    labels[8:11, 15:18, 20:24] = PANCREAS
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.0, 3.0, 4.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))  # i along world y, j along world x, k along z
    box = region_box(image, ["pancreas", "gallbladder"], [5.0, 20.0, 40.0])  # world x, y, z mm
    # i: 20 mm of world y at 2 mm -> 10 voxels; j: 5 mm of world x at 3 mm -> 2; k: 40 mm at 4 mm -> 10, clipped
    # to the 20 slices at both ends
    assert box == Box((20 - 10, 15 - 2, 0), ((24 + 10) - 10, (18 + 2) - 13, 20))
    assert region_box(image, ["gallbladder"], [5.0, 5.0, 5.0]) is None


def test_the_panels_quality_choice_opens_only_where_a_fine_second_stage_is_installed(models):
    from AbdomenSegLib.models.choice import QUALITY_TIP, select

    with_fine, lonely = select(["first-gb"], models), select(["lonely"], models)
    assert with_fine.error == "" and with_fine.high_allowed and with_fine.high_tip == QUALITY_TIP
    assert lonely.error == "" and not lonely.high_allowed
    assert lonely.high_tip == "high unavailable: no fine second-stage model is installed for 'lonely'"
    assert not select(["first", "lonely"], models).high_allowed  # an ensemble has no second stage


def test_a_two_stage_dicom_seg_and_result_check_name_both_models(models, tmp_path, monkeypatch):
    import highdicom as hd
    from test_io_dicom_seg import _write_series

    monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
    ct, _ = make_phantom(size=(30, 28, 10), spacing=(9.0, 8.5, 15.0))
    hu = sitk.GetArrayFromImage(ct)
    _write_series(tmp_path / "series", hu, ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    out = tmp_path / "organs.dcm"
    args = ["segment", str(tmp_path / "series"), str(out), "--model", "first-gb", "--quality", "high"]
    assert main(args + ["--device", "cpu", "--no-qc-png", "--qc", str(tmp_path / "qc.json")]) in (0, 3)
    algorithm = hd.seg.segread(out).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "first-gb>fine-gb"
    assert json.loads((tmp_path / "qc.json").read_text())["model"] == "first-gb>fine-gb"  # the result check too


def test_take_limits_the_organs_the_second_stage_labels(models, tmp_path, monkeypatch):
    """cascade.take ["gallbladder"]: the box is still the region organs' (pancreas and gallbladder), but the
    first stage's pancreas stays where the second stage (pancreas everywhere) would have replaced it, and the
    second stage's pancreas is not written; a take outside the region organs is refused when the card is read."""
    card = json.loads((models / "fine-pancreas" / "card.json").read_text())
    card["name"] = "fine-take"
    card["cascade"]["take"] = ["gallbladder"]
    folder = tmp_path / "fine-take"
    shutil.copytree(models / "fine-pancreas", folder)
    (folder / "card.json").write_text(json.dumps(card))
    ct, reference = _rotated_phantom()
    cascade = CascadeSegmenter(
        get_segmenter(find_model("first", models), "cpu"), find_model(str(folder)), log=lambda m: None
    )
    _perfect_first_stage(monkeypatch, cascade, reference)
    out = sitk.GetArrayFromImage(cascade.segment(ct, Options()))
    assert cascade.last_box == _expected_box(reference, [10, 10, 200])
    first = sitk.GetArrayFromImage(reference)
    assert (first == PANCREAS).any() and (first == GALLBLADDER).any()
    np.testing.assert_array_equal(out == PANCREAS, first == PANCREAS)  # kept, and nothing added
    assert not (out == GALLBLADDER).any()  # the second stage's own answer (pancreas) claims no gallbladder
    card["cascade"]["take"] = ["liver"]
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(AbdomenSegError, match=r"cascade.take \['liver'\] are not among cascade.organs"):
        find_model(str(folder))
