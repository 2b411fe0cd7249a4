"""train.organ_ratios: how often training crops centre on each organ, checked in the config and used by the crop
sampler (RandCropByLabelClasses' ratios)."""

import numpy as np
import pytest
from test_inference_mirroring import _config as mirroring_config

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.training.config import load_config


def _config(organ_ratios, background_ratio=1.0):
    config = mirroring_config([], organs=("liver", "spleen"))  # 16^3 crops, no augmentation
    config["train"].update(background_ratio=background_ratio, organ_ratios=organ_ratios)
    return config


def _organs_in_crops(config, draws=60):
    """For each draw of the crop chain, the organ channels the crop holds."""
    from monai import transforms as T
    from monai.transforms import map_classes_to_indices

    from AbdomenSegLib.training.recipe import sampling_and_spatial

    # two organs far apart in a 16 x 64 x 16 volume: a 16^3 crop centred on one cannot hold the other
    label = np.zeros((1, 16, 64, 16), dtype=np.int64)
    label[0, 6:10, 4:8, 6:10], label[0, 6:10, 56:60, 6:10] = 1, 2
    image = np.random.default_rng(0).random(label.shape, dtype=np.float32)
    indices = map_classes_to_indices(label, num_classes=3)
    chain = T.Compose(sampling_and_spatial(config))
    seen = []
    for seed in range(draws):
        chain.set_random_state(seed=seed)
        out = chain({"image": image, "label": label, "label_cls_indices": indices})[0]
        seen.append(set(np.unique(np.asarray(out["label"]))) - {0})
    return seen


def test_crops_centre_on_the_organs_in_their_ratios():
    default = _organs_in_crops(_config({}, background_ratio=0.0))
    assert {1} in default and {2} in default  # both organs get crops by default
    only_spleen = _organs_in_crops(_config({"liver": 0.0}, background_ratio=0.0))
    assert all(organs == {2} for organs in only_spleen)
    mostly_liver = _organs_in_crops(_config({"liver": 4.0}, background_ratio=0.0), draws=100)
    liver_share = sum(organs == {1} for organs in mostly_liver) / len(mostly_liver)
    assert 0.65 < liver_share < 0.95  # 4 / 5 expected


@pytest.mark.parametrize(
    "ratios, message",
    [
        ({"kidney_left": 2.0}, "not one of the model's organs"),
        ({"liver": -1.0}, "train.organ_ratios.liver"),
        ({"liver": "2"}, "train.organ_ratios.liver"),
        (["liver"], "is not a mapping"),
        ({"liver": 0, "spleen": 0.0}, "no crop can be drawn"),
    ],
)
def test_organ_ratios_are_checked(tmp_path, ratios, message):
    config = {"data": {"root": str(tmp_path), "convention": "btcv"}, "model": {"organs": ["liver", "spleen"]}}
    config["train"] = {"organ_ratios": ratios, "background_ratio": 0.0}
    with pytest.raises(AbdomenSegError, match=message):
        load_config(config)
    assert load_config({**config, "train": {"organ_ratios": {"spleen": 3}}})["train"]["organ_ratios"] == {"spleen": 3}


def test_crops_of_a_case_smaller_than_the_patch_centre_on_their_class():
    from monai import transforms as T

    from AbdomenSegLib.training.recipe import crop_indices, sampling_and_spatial

    config = _config({"spleen": 0.0}, background_ratio=0.0)  # every crop centred on the liver
    label = np.zeros((1, 40, 10, 10), dtype=np.int64)  # padded to 16 in y and x, not in z
    label[0, 30:34, 2:6, 2:6] = 1  # the liver at the far end in z
    image = label.astype(np.float32)
    chain = T.Compose(sampling_and_spatial(config))
    indices = crop_indices(label[0], config["train"]["patch"], 3)
    for seed in range(20):
        chain.set_random_state(seed=seed)
        out = chain({"image": image, "label": label, "label_cls_indices": indices})[0]
        assert np.asarray(out["label"]).sum() > 0  # unpadded indices put all 20 crops far from it
