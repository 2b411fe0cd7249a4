"""Helpers the tests share (plain functions; the fixtures are in conftest.py): where the real data are, the
shipped models' validation protocol once per session, phantom datasets, both inference networks of a model."""

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ABDOMENSEG_HIDE_SHARED=1 runs the suite as a fresh clone without ../shared would (.ci/run does one such run):
# every test that needs the real data must then skip with its reason.
HIDE_SHARED = os.environ.get("ABDOMENSEG_HIDE_SHARED", "") not in ("", "0")
SHARED = ROOT.parent / "shared" / "data"


def shared(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if HIDE_SHARED or not path.exists():
        why = "hidden by ABDOMENSEG_HIDE_SHARED" if HIDE_SHARED else "real data is not part of the repository"
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} ({why})")
    return path


@functools.cache
def validation_rows(name: str) -> tuple:
    """A shipped model's card protocol re-run on the untouched validation files (once per session and model)."""
    from AbdomenSegLib.models.packages import find_model
    from AbdomenSegLib.preprocessing.datasets import validation_data
    from AbdomenSegLib.training.run import validation_rows as run_protocol

    card = find_model(name)
    root = shared(validation_data(card["training"]["config"]["data"])["root"].split("/")[-1])
    return tuple(run_protocol(card, root, log=lambda m: None)[0])


def write_phantom_dataset(root: Path, cases: int = 2, ref_suffix: str = ".nii.gz"):
    """images/ and refs/ folders of small phantom cases (CT in HU + organ labels); returns both folders."""
    import SimpleITK as sitk

    from AbdomenSegLib.io.phantom import make_phantom

    images, refs = root / "images", root / "refs"
    images.mkdir(parents=True), refs.mkdir(parents=True)
    for i in range(cases):
        ct, labels = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0), seed=i)
        sitk.WriteImage(ct, str(images / f"case{i}.nii.gz"))
        sitk.WriteImage(labels, str(refs / f"case{i}{ref_suffix}"))
    return images, refs


def segment_with_both_networks(card, image, options=None, before_library=None):
    """The labels (and the probabilities before them) of a shipped model on `image`, once with the plain-torch
    inference network and once with MONAI's/smp's class loaded with the same weights; `before_library()` runs
    before the second pass (e.g. to swap in MONAI's sliding window). Returns (labels, probabilities) pairs."""
    import SimpleITK as sitk
    from safetensors.torch import load_file

    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.models.networks import build_network

    weights = load_file(str(card.weights_path))
    segmenter = Segmenter(card, "cpu", log=lambda m: None)
    probabilities, labels = [], []

    def infer(*args, **kwargs):
        probabilities.append(Segmenter._infer(segmenter, *args, **kwargs))
        return probabilities[-1]

    segmenter._infer = infer
    for fast in (True, False):
        network = build_network(card["architecture"], card.in_channels, card.out_channels, for_inference=fast)
        network.load_state_dict(weights, strict=True)
        segmenter.network = network.eval()
        if not fast and before_library is not None:
            before_library()
        labels.append(sitk.GetArrayFromImage(segmenter.segment(image, options)))
    return labels, probabilities
