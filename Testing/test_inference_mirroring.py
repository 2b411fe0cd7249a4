"""Mirroring: training flips image and label together (left/right organs traded), the card records the axes, and
test-time augmentation is the mean of the mirrored inputs' outputs mirrored back, refused for models trained
without."""

import copy
import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.cli import main
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.inference.inferer import inferer_for
from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.models.packages import export_package, load_network, read_card
from AbdomenSegLib.training.config import DEFAULT_CONFIG, _merge, draft_card, load_config

# tiny_package's channels: 1 liver, 2 spleen, 3 kidney_right, 4 kidney_left, 5 pancreas; orientation LPS (x: L-R)
SIDES_TRADED = [0, 1, 2, 4, 3, 5]


@pytest.fixture(scope="module")
def mirrored_package(tiny_package, tmp_path_factory):
    """tiny_package's network with a card saying it was trained mirrored along every axis."""
    card = copy.deepcopy(tiny_package.data)
    card.update(name="tiny-mirrored")
    card["inference"]["tta_mirror_axes"] = ["z", "y", "x"]
    network = load_network(tiny_package)
    return export_package(network, card, tmp_path_factory.mktemp("mirrored") / "tiny-mirrored")


def test_tta_output_equals_the_mirrored_input_mean(mirrored_package):
    network = load_network(mirrored_package)
    plain, tta = inferer_for(mirrored_package), inferer_for(mirrored_package, tta=True)
    array = np.random.default_rng(0).random((20, 40, 36), dtype=np.float32)
    expected = []
    for k in range(4):
        for axes in itertools.combinations((0, 1, 2), k):
            out = plain(network, np.ascontiguousarray(np.flip(array, axes)), "cpu")
            out = np.flip(out, [a + 1 for a in axes])
            expected.append(out[SIDES_TRADED] if 2 in axes else out)  # x mirrored: right and left trade back
    assert len(expected) == 8
    got = tta(network, array, "cpu")
    assert got.shape == expected[0].shape and got.dtype == np.float32
    np.testing.assert_allclose(got, np.mean(expected, axis=0), atol=1e-5, rtol=0)
    assert np.abs(got - expected[0]).max() > 1e-3  # the untrained network is no mirror-symmetric: TTA changes it


def test_tta_mirrors_only_the_card_axes_and_trades_sides_only_on_the_left_right_one(mirrored_package):
    card = copy.deepcopy(mirrored_package.data)
    card["inference"]["tta_mirror_axes"] = ["z"]
    assert inferer_for(card, tta=True).passes() == [(), (0,)]
    assert inferer_for(card, tta=True).lateral is None
    card["orientation"] = "PLS"  # now y (array axis 1) runs left-right
    card["inference"]["tta_mirror_axes"] = ["y", "x"]
    inferer = inferer_for(card, tta=True)
    assert inferer.lateral == 1 and list(inferer.channels) == SIDES_TRADED


def test_segment_with_tta_gives_labels_in_the_input_grid(mirrored_package):
    ct = make_phantom(size=(40, 36, 12), spacing=(10.0, 10.0, 16.0))[0]
    out = Segmenter(mirrored_package, "cpu", log=lambda m: None).segment(ct, Options(tta=True))
    assert out.GetSize() == ct.GetSize() and out.GetOrigin() == ct.GetOrigin()
    assert out.GetDirection() == ct.GetDirection() and out.GetSpacing() == ct.GetSpacing()


def test_tta_is_refused_for_a_model_trained_without_mirroring_before_any_work(tiny_package, tmp_path, monkeypatch):
    import AbdomenSegLib.inference.segmenter as inference

    def no_work(*args, **kwargs):
        raise AssertionError("preprocessing started")

    monkeypatch.setattr(inference, "to_model_space", no_work)
    ct = make_phantom(size=(40, 36, 12), spacing=(10.0, 10.0, 16.0))[0]
    with pytest.raises(AbdomenSegError, match="was not trained with mirroring"):
        Segmenter(tiny_package, "cpu", log=lambda m: None).segment(ct, Options(tta=True))
    with pytest.raises(AbdomenSegError, match="tta_mirror_axes"):
        inferer_for(tiny_package, tta=True)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    code = main(["segment", str(tmp_path / "ct.nii.gz"), str(tmp_path / "out.nii.gz")] + [
        "--model", str(tiny_package.path), "--tta", "--device", "cpu"
    ])  # fmt: skip
    assert code == 2 and not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize(
    "axes, labels, message",
    [
        (["w"], None, "must be a list of the model axes"),
        (["x", "x"], None, "twice"),
        (["x"], {"1": "liver", "2": "kidney_right"}, "needs both sides of kidney_right"),
    ],
)
def test_a_card_with_bad_mirror_axes_is_refused_when_read(tiny_package, tmp_path, axes, labels, message):
    import json

    card = copy.deepcopy(tiny_package.data)
    card["inference"]["tta_mirror_axes"] = axes
    card["labels"] = labels or card["labels"]
    card.pop("postprocess", None)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(AbdomenSegError, match=message):
        read_card(folder)
    card["labels"] = {"1": "liver", "2": "kidney_right"}
    card["inference"]["tta_mirror_axes"] = ["z", "y"]  # not the left-right axis: one side alone is fine
    (folder / "card.json").write_text(json.dumps(card))
    read_card(folder)


# -- training -------------------------------------------------------------------------------------------------
def _config(flip_axes, organs=("liver", "kidney_right", "kidney_left")):
    augment = {k: 0.0 for k, v in DEFAULT_CONFIG["train"]["augment"].items() if not isinstance(v, list)}
    return _merge(
        DEFAULT_CONFIG,
        {
            "model": {"organs": list(organs)},
            "train": {"patch": [16, 16, 16], "batch_size": 1, "augment": dict(augment, flip_axes=flip_axes)},
        },
    )


@pytest.mark.parametrize("values", ["channels", "organ numbers"])
def test_training_flips_image_and_label_together_and_trades_left_and_right(values):
    """Every draw is the input mirrored along some of the axes, image and label alike, with kidney right/left
    traded exactly when the left-right axis (x of LPS) was mirrored; all 8 combinations come up."""
    from monai import transforms as T
    from monai.transforms import map_classes_to_indices

    from AbdomenSegLib.training.recipe import sampling_and_spatial

    config = _config(["z", "y", "x"])
    # label values: the standard trainer's channels, or (synth trainer) our organ numbers of the tissue map
    right, left, given = (2, 3, None) if values == "channels" else (3, 4, {"kidney_right": 3, "kidney_left": 4})
    rng = np.random.default_rng(1)
    image = rng.random((1, 16, 16, 16), dtype=np.float32)  # every voxel distinct: the mirroring is readable
    label = np.zeros((1, 16, 16, 16), dtype=np.int64)
    label[0, 4:12, 4:12, 2:6], label[0, 4:12, 4:12, 10:14], label[0, 2:5, 2:6, 6:10] = right, left, 1
    channels = np.select([label == right, label == left], [2, 3], label)
    indices = map_classes_to_indices(channels, num_classes=4)  # the crop's classes, as the trainers give them
    chain = T.Compose(sampling_and_spatial(config, given))
    seen = set()
    for seed in range(40):
        chain.set_random_state(seed=seed)
        out = chain({"image": image, "label": label, "label_cls_indices": indices})[0]
        out_image, out_label = np.asarray(out["image"]), np.asarray(out["label"])
        axes = [a for k in range(4) for a in itertools.combinations((0, 1, 2), k)]
        match = [a for a in axes if np.array_equal(out_image, np.flip(image, [x + 1 for x in a]))]
        assert len(match) == 1, "the image is not a mirror image of the input"
        flipped = np.flip(label, [x + 1 for x in match[0]]).copy()
        if 2 in match[0]:
            traded = flipped.copy()
            traded[flipped == right], traded[flipped == left] = left, right
            flipped = traded
        assert np.array_equal(out_label, flipped)
        seen.add(match[0])
    assert len(seen) == 8


def test_flip_axes_are_checked_and_recorded_in_the_card(tmp_path):
    config = load_config(
        {"data": {"root": str(tmp_path), "convention": "btcv"}, "train": {"augment": {"flip_axes": ["y", "x"]}}}
    )
    assert draft_card(config)["inference"]["tta_mirror_axes"] == ["y", "x"]
    assert (
        "tta_mirror_axes"
        not in draft_card(load_config({"data": {"root": str(tmp_path), "convention": "btcv"}}))["inference"]
    )
    for axes, organs, message in [
        (["left"], ["liver"], "list of the model axes"),
        (["x"], ["liver", "kidney_left"], "needs both sides of kidney_left"),
    ]:
        with pytest.raises(AbdomenSegError, match=message):
            load_config(
                {
                    "data": {"root": str(tmp_path), "convention": "btcv"},
                    "model": {"organs": organs},
                    "train": {"augment": {"flip_axes": axes}},
                }
            )
