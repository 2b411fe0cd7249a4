"""Ensembles: `a+b` and ensemble cards in a catalog; one member gives that model's labels; two members with
different grids average their probabilities in the finest one's grid and answer in the input's grid; bad
ensembles are refused before any work."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.inference.ensemble import EnsembleSegmenter
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.io.phantom import make_phantom, rotation
from AbdomenSegLib.models.ensemble_card import ensemble_of
from AbdomenSegLib.models.packages import catalog, catalog_with_problems, export_package, find_model

ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas"]
ARCH = {"class": "UNet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}}


def _card(name, organs=ORGANS, spacing=(4.0, 4.0, 5.0), modality="CT", body_threshold=-500.0):
    intensity = {"mode": "ct_window", "window": [-125, 275], "body_threshold": body_threshold}
    intensity = intensity if modality == "CT" else {"mode": "mr_percentile"}
    return {
        "name": name,
        "title": name,
        "dimensions": 3,
        "architecture": ARCH,
        "modality": modality,
        "labels": {str(i): o for i, o in enumerate(organs, 1)},
        "spacing": list(spacing),
        "orientation": "LPS",
        "intensity": intensity,
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian"},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder: tiny untrained CT models on two grids (b's channels in another order), an MR one, one
    with fewer organs, and ensemble cards listed in its catalog."""
    import torch

    from AbdomenSegLib.models.networks import build_network

    folder = tmp_path_factory.mktemp("models")
    singles = [
        _card("tiny-a"),
        # its body box holds only the phantom's spine (450 HU): a's box reaches beyond it, where b says background
        _card("tiny-b", organs=ORGANS[::-1], spacing=(6.0, 6.5, 7.0), body_threshold=300.0),
        _card("tiny-mr", modality="MR"),
        _card("tiny-two", organs=ORGANS[:2]),
    ]
    for seed, card in enumerate(singles):
        torch.manual_seed(seed)
        network = build_network(ARCH, 1, len(card["labels"]) + 1)
        export_package(network, card, folder / card["name"], register_in=folder, make_default=seed == 0)
    ensembles = {
        "pair": ["tiny-a", "tiny-b"],
        "solo": ["tiny-a"],
        "with-unknown": ["tiny-a", "nope"],
        "mixed": ["tiny-a", "tiny-mr"],
        "nested": ["pair", "tiny-b"],
    }
    index = json.loads((folder / "catalog.json").read_text())
    for name, members in ensembles.items():
        (folder / name).mkdir()
        (folder / name / "card.json").write_text(json.dumps({"name": name, "ensemble": members}))
        index["models"].append({"name": name, "path": name})
    (folder / "catalog.json").write_text(json.dumps(index))
    return folder


def _phantom(direction=None):
    return make_phantom(size=(44, 40, 14), spacing=(9.0, 8.5, 15.0), direction=direction)[0]


def test_an_ensemble_of_one_model_equals_the_model(models):
    solo, alone = find_model("solo", models), find_model("tiny-a", models)
    segmenter = get_segmenter(solo, "cpu", log=lambda m: None)
    assert isinstance(segmenter, EnsembleSegmenter)
    ct = _phantom()
    for options in (Options(), Options(largest_component="none", smooth_resample=False)):
        expected = sitk.GetArrayFromImage(Segmenter(alone, "cpu", log=lambda m: None).segment(ct, options))
        got = sitk.GetArrayFromImage(segmenter.segment(ct, options))
        assert np.array_equal(got, expected)
    assert segmenter.last_confidence.keys() == set(ORGANS)


def test_two_members_average_in_the_finest_grid_and_answer_in_the_input_grid(models):
    """Hand computation: b's probabilities interpolated (scipy, trilinear) at the centres of a's body-box voxels,
    channels matched by organ name (b lists them in reverse), background outside b's box, averaged with a's."""
    card = find_model("tiny-b+tiny-a", models)  # a is the finest though listed second
    assert card.members[1].name == "tiny-a" and card["spacing"] == [4.0, 4.0, 5.0]
    members = [get_segmenter(m, "cpu", log=lambda m: None) for m in card.members]
    segmenter = EnsembleSegmenter(card, members, log=lambda m: None)
    a, b = segmenter.members[1], segmenter.members[0]
    ct = _phantom(direction=rotation("z", 20) @ np.diag([-1.0, 1.0, 1.0]))
    averaged = []
    finish = a.labels_from
    a.labels_from = lambda probabilities, *args: averaged.append(probabilities.copy()) or finish(probabilities, *args)
    try:
        out = segmenter.segment(ct)
    finally:
        del a.labels_from
    assert out.GetSize() == ct.GetSize() and out.GetOrigin() == ct.GetOrigin()
    assert out.GetSpacing() == ct.GetSpacing() and out.GetDirection() == ct.GetDirection()

    pa, space_a = a.model_space_probabilities(ct, Options(), lambda f, m: None, None)
    pb, space_b = b.model_space_probabilities(ct, Options(), lambda f, m: None, None)
    # Physical centres of a's box voxels -> continuous indices of b's box.
    index = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in space_a.box], indexing="ij"), -1)
    points = [space_a.image.TransformContinuousIndexToPhysicalPoint(p[::-1].tolist()) for p in index.reshape(-1, 3)]
    start_b = np.array([s.start for s in space_b.box])
    at = np.array([space_b.image.TransformPhysicalPointToContinuousIndex(p)[::-1] for p in points]) - start_b
    outside = ((at < -0.5) | (at > np.array(pb.shape[1:]) - 0.5)).any(1)
    order_b = [0] + [ORGANS[::-1].index(o) + 1 for o in ORGANS]  # a's channel c is b's channel order_b[c]
    expected = np.empty_like(pa)
    for c, cb in enumerate(order_b):
        values = ndimage.map_coordinates(pb[cb], at.T, order=1, mode="nearest")
        values[outside] = 1.0 if c == 0 else 0.0
        expected[c] = (pa[c] + values.reshape(pa.shape[1:])) / 2
    np.testing.assert_allclose(averaged[0], expected, atol=1e-5, rtol=0)
    assert 0.01 < outside.mean() < 0.99  # both inside and outside b's box are checked


def test_an_ensemble_card_in_a_catalog_is_found_by_name(models):
    cards = catalog(models)
    assert {"tiny-a", "tiny-b", "pair", "solo"} <= set(cards)
    pair = find_model("pair", models)
    assert [m.name for m in pair.members] == ["tiny-a", "tiny-b"] and pair["ensemble"] == ["tiny-a", "tiny-b"]
    assert pair["modality"] == "CT" and set(pair["labels"].values()) == set(ORGANS)
    assert "ensemble of tiny-a, tiny-b" in pair.summary()
    assert find_model(str(pair.path)).members == pair.members  # by its package folder (as compare passes it)
    adhoc = find_model("tiny-a+tiny-b", models)
    assert find_model(str(adhoc.path)).data == adhoc.data  # `a+b` found again from its path (Dask, compare)


@pytest.mark.parametrize(
    "model, message",
    [
        ("with-unknown", "its member 'nope' is not installed"),
        ("mixed", "mixes CT and MR models"),
        ("nested", "its member 'pair' is itself an ensemble"),
        ("tiny-a+nope", "model 'nope' is not installed"),
        ("tiny-a+tiny-mr", "mixes CT and MR models"),
        ("tiny-a+tiny-two", "segment different organs"),
        ("tiny-a+tiny-a", "lists a model twice"),
        ("tiny-a+", "empty member"),
        ("tiny-a+pair", "has ensembles among its members"),
    ],
)
def test_bad_ensembles_are_refused_with_a_clear_error(models, model, message):
    with pytest.raises(AbdomenSegError, match=message):
        find_model(model, models)
    if "+" not in model:
        assert message in str(catalog_with_problems(models)[1][model])


def test_the_command_line_refuses_a_bad_ensemble_before_any_work_and_runs_a_good_one(models, tmp_path, monkeypatch):
    monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
    sitk.WriteImage(_phantom(), str(tmp_path / "ct.nii.gz"))
    args = ["segment", str(tmp_path / "ct.nii.gz"), str(tmp_path / "out.nii.gz"), "--device", "cpu"]
    assert main(args + ["--model", "tiny-a+tiny-mr"]) == 2 and not (tmp_path / "out.nii.gz").exists()
    assert main(args + ["--model", "tiny-a+tiny-b"]) in (0, 3)  # 3: the result check flags the untrained output
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert out.GetSize() == _phantom().GetSize()


def test_an_ensemble_card_states_no_model_values_of_its_own(models, tmp_path):
    from AbdomenSegLib.models.packages import read_card

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "card.json").write_text(json.dumps({"name": "odd", "ensemble": ["tiny-a"], "spacing": [1, 1, 1]}))
    with pytest.raises(AbdomenSegError, match="takes spacing from its members"):
        read_card(folder)
    assert ensemble_of([find_model("tiny-a", models)], "x").members[0].name == "tiny-a"


def test_tta_on_an_ensemble_needs_every_member_trained_with_mirroring(models):
    from AbdomenSegLib.models.mirroring import check_tta

    with pytest.raises(AbdomenSegError, match="model 'tiny-a' was not trained with mirroring"):
        get_segmenter(find_model("pair", models), "cpu", log=lambda m: None).segment(_phantom(), Options(tta=True))
    with pytest.raises(AbdomenSegError, match="not trained with mirroring"):
        check_tta(find_model("tiny-b+tiny-a", models))
