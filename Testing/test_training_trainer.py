"""Training really learns, resumes exactly, validates its config, exports a working package."""

import json

import numpy as np
import pytest

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.training.run import Trainer, load_config, train_and_export
from helpers import write_phantom_dataset


def _config(root, cache, steps, model=None, **train):
    images, refs = (
        write_phantom_dataset(root, cases=3) if not (root / "images").exists() else (root / "images", root / "refs")
    )
    if not (root / "labels").exists():
        refs.rename(root / "labels")
    return load_config(
        {
            "name": "tiny-train",
            "data": {"root": str(root), "convention": "abdomenseg", "val_count": 1, "cache": str(cache)},
            "model": {
                "architecture": {
                    "class": "UNet",
                    "args": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
                },
                "spacing": [8.0, 8.0, 14.0],
                "organs": ["liver", "spleen", "kidney_right", "kidney_left"],
                **(model or {}),
            },
            "train": {
                "steps": steps,
                "patch": [16, 32, 32],
                "lr": 0.01,
                "val_every": 10,
                "threads": 2,
                "augment": {"affine_prob": 0.0},
                **train,
            },
        }
    )


@pytest.mark.slow
def test_tiny_model_learns(tmp_path):
    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=60)
    losses = []
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    history = trainer.run(progress=lambda s, n, loss: losses.append(loss))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    first, last = history[0]["dice"], history[-1]["dice"]
    assert last["liver"] > 0.7 and last["liver"] > first["liver"] + 0.2  # chance-level Dice is far lower
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "best.safetensors").is_file()


@pytest.mark.slow
def test_tiny_2d_model_learns_and_exports(tmp_path):
    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.io.images import read_image

    model = {
        "dimensions": 2,
        "architecture": {
            "class": "Unet",
            "args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
        },
        "intensity": {"mode": "ct_window", "window": [-125, 275], "enhancement": "clahe"},
    }
    config = _config(
        tmp_path / "data", tmp_path / "cache.npz", steps=40, model=model, patch=[3, 32, 32], batch_size=8, lr=0.005
    )
    card = train_and_export(config, out=tmp_path / "run", device="cpu", log=lambda m: None)
    history = card["training"]["history"]
    assert history[-1]["dice"]["liver"] > 0.6 and history[-1]["dice"]["liver"] > history[0]["dice"]["liver"]
    assert card["dimensions"] == 2 and card["in_channels"] == 3
    image = read_image(tmp_path / "data" / "images" / "case0.nii.gz")
    assert Segmenter(card, "cpu").segment(image).GetSize() == image.GetSize()


@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path):
    import torch

    data, cache = tmp_path / "data", tmp_path / "cache.npz"
    straight = Trainer(_config(data, cache, steps=20), tmp_path / "a", log=lambda m: None)
    straight.run()
    first = Trainer(_config(data, cache, steps=20), tmp_path / "b", log=lambda m: None)
    first.run(stop_at=10)  # interrupted half-way
    resumed = Trainer(_config(data, cache, steps=20), tmp_path / "b", log=lambda m: None)
    resumed.run(resume=True)
    assert resumed.step == 20 and [h["step"] for h in resumed.history] == [10, 20]
    for key, value in straight.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[key]), key


def test_export_gives_a_package_that_segments(tmp_path):
    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.io.images import read_image

    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=10)
    card = train_and_export(
        config, out=tmp_path / "run", device="cpu", export_to=tmp_path / "models", log=lambda m: None
    )
    assert json.loads((tmp_path / "models" / "catalog.json").read_text())["models"][0]["name"] == "tiny-train"
    assert set(card["validation"]["dice"]) <= {"liver", "spleen", "kidney_right", "kidney_left"}
    assert card["training"]["validation_cases"] == ["case1"] or len(card["training"]["validation_cases"]) == 1
    image = read_image(tmp_path / "data" / "images" / "case0.nii.gz")
    out = Segmenter(card, "cpu").segment(image)
    assert out.GetSize() == image.GetSize()


def test_init_from_a_package_starts_from_its_weights(tmp_path):
    import torch

    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=10)
    card = train_and_export(config, out=tmp_path / "run", device="cpu", log=lambda m: None)
    config["train"]["init_from"] = str(card.path)
    trainer = Trainer(config, tmp_path / "run2", log=lambda m: None)
    from AbdomenSegLib.models.packages import load_network

    for key, value in load_network(card).state_dict().items():
        assert torch.equal(value, trainer.network.state_dict()[key])
    # The export may overwrite the package it started from: the new card keeps the lineage.
    lineage = trainer.card()["training"]["initialised_from"]
    assert lineage["sha256"] == card["sha256"] and lineage["steps"] == 10
    config["model"]["organs"] = ["liver"]
    with pytest.raises(AbdomenSegError, match="another architecture or organ list"):
        Trainer(config, tmp_path / "run3", log=lambda m: None)


@pytest.mark.parametrize("option", ["blur_prob", "contrast_prob", "noise_prob"])
def test_scanner_variety_augmentations_change_images_not_labels(tmp_path, option):
    import torch

    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=1)
    config["train"]["augment"]["intensity_prob"] = 0.0
    plain = Trainer(config, tmp_path / "a", log=lambda m: None)
    config["train"]["augment"][option] = 1.0
    varied = Trainer(config, tmp_path / "b", log=lambda m: None)
    for trainer in (plain, varied):
        trainer.transform.set_random_state(seed=3)
    x0, y0 = plain.batch(np.random.default_rng(0))
    x1, y1 = varied.batch(np.random.default_rng(0))
    assert torch.equal(y0, y1)  # same crops, labels untouched
    assert torch.isfinite(x1).all() and (x1 - x0).abs().mean() > 0.005
    roughness = lambda x: x.diff(dim=-1).abs().mean()
    if option == "blur_prob":  # coarser reconstruction: neighbouring voxels differ less
        assert roughness(x1) < 0.9 * roughness(x0)
    elif option == "noise_prob":  # zero-mean noise of the configured strength
        assert (
            abs(float((x1 - x0).mean())) < 0.005 and 0.005 < float((x1 - x0).std()) <= 0.035
        )  # std drawn in (0, 0.03]
    else:  # gamma keeps the order of intensities (a monotone remap), so organ contrast keeps its sign
        for a, b in zip(x0, x1):  # per sample: each crop draws its own gamma
            assert torch.all(b.flatten()[a.flatten().argsort()].diff() >= -1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"train": {"optimizer": "lion"}}, "train.optimizer"),
        ({"train": {"patch": [20, 32, 32]}}, "multiple of 16"),
        ({"model": {"dimensions": 2}}, "does not fit architecture"),
        (
            {"model": {"dimensions": 2, "architecture": {"class": "Unet"}}, "train": {"patch": [2, 64, 64]}},
            "slices odd",
        ),
        ({"model": {"organs": ["liver", "appendix"]}}, "unknown organs"),
        ({"model": {"postprocess": {"largest_component": ["stomach"]}}}, "not in model.organs"),
        ({"model": {"orientation": "LLS"}}, "not an axis code"),
        ({"data": {"root": "/nonexistent"}}, "is not a folder"),
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"lr": 0}}, "train.lr 0 must be a number above 0"),
        (
            {"train": {"augment": {"blur_prob": 1.5}}},
            "train.augment.blur_prob 1.5 must be a number at least 0 and at most 1",
        ),
        ({"train": {"augment": {"rotat": 0.1}}}, "unknown config key 'train.augment.rotat'"),
        ({"data": {"convention": "nnunet"}}, "data.convention 'nnunet' is not a known label convention"),
        ({"data": {"direction": [1, 0, 0]}}, "not a rotation or reflection"),
        ({"data": {"fold": {"index": 4, "of": 4}}}, "data.fold index 4 is not one of 4 folds"),
        ({"data": {"fold": {"index": 0, "of": 1}}}, "data.fold.of 1 must be a whole number >= 2"),
        ({"data": {"fold": 2}}, "data.fold 2 is not a fold"),
        (
            {
                "model": {
                    "architecture": {
                        "class": "UNet",
                        "args": {"channels": [4, 8, 16, 32, 64, 128, 256], "strides": [2, 2, 2, 2, 2, 2]},
                    }
                }
            },
            "card would be refused: inference.roi_size \\[64, 96, 96\\] is not a multiple of the network's stride 64",
        ),
    ],
)
def test_config_errors_are_clear(tmp_path, change, message):
    base = {"name": "x", "data": {"root": str(tmp_path), "convention": "btcv"}}  # no default numbering (issue 27)
    for key, value in change.items():
        base[key] = {**base.get(key, {}), **value}
    with pytest.raises(AbdomenSegError, match=message):
        load_config(base)


def test_a_config_extends_another_and_states_only_its_changes(tmp_path):
    write = lambda name, data: (tmp_path / name).write_text(json.dumps(data))  # noqa: E731
    write(
        "base.json",
        {
            "name": "x",
            "data": {"root": str(tmp_path), "convention": "btcv"},
            "model": {"spacing": [2.0, 2.0, 3.0], "intensity": {"mode": "ct_window", "window": [-100, 200]}},
            "train": {"steps": 100, "lr": 0.002, "augment": {"blur_prob": 0.2}},
        },
    )
    write(
        "stage.json",
        {
            "extends": "base.json",
            "model": {"intensity": {"mode": "mr_percentile"}},
            "train": {"lr": 0.0003, "init_from": "runs/x", "augment": {"noise_prob": 0.1}},
        },
    )
    config = load_config(tmp_path / "stage.json")
    assert config["train"]["steps"] == 100 and config["model"]["spacing"] == [2.0, 2.0, 3.0]  # from the base
    assert config["train"]["lr"] == 0.0003 and config["train"]["init_from"] == "runs/x"  # the stage's own
    assert config["train"]["augment"]["blur_prob"] == 0.2 and config["train"]["augment"]["noise_prob"] == 0.1
    assert config["model"]["intensity"] == {"mode": "mr_percentile"}  # replaced whole, as in a single file
    assert "extends" not in config
    write("loop.json", {"extends": "stage2.json"})
    write("stage2.json", {"extends": "loop.json"})
    with pytest.raises(AbdomenSegError, match="extends itself"):
        load_config(tmp_path / "loop.json")
    write("orphan.json", {"extends": "missing.json"})
    with pytest.raises(AbdomenSegError, match="missing.json' does not exist"):
        load_config(tmp_path / "orphan.json")


@pytest.mark.slow
def test_torchrun_ddp_without_code_changes(tmp_path):
    """Two processes under PyTorch's own launcher (gloo on CPU; NCCL on GPUs): trains, exports once."""
    import subprocess
    import sys

    from helpers import ROOT

    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=6, val_every=3)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "AbdomenSegLib",
            "train",
            str(tmp_path / "cfg.json"),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--export",
            str(tmp_path / "models"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "models" / "tiny-train" / "card.json").read_text())
    assert [h["step"] for h in card["training"]["history"]] == [3, 6]
    assert result.stdout.count("exported") == 1  # only rank 0 exports


BAD_BEFORE_CACHING = [
    ({"loss": "focal"}, "train.loss = 'focal' is not supported"),
    ({"optimizer": "lion"}, "train.optimizer = 'lion' is not supported"),
    ({"scheduler": "cosine"}, "train.scheduler = 'cosine' is not supported"),
    ({"augment": {"affine_prob": 0.0, "noise_prob": -0.1}}, "train.augment.noise_prob -0.1"),
    ({"augment": {"affine_prob": 0.0, "blur_prob": "0.2"}}, "train.augment.blur_prob '0.2' must be a number"),
    ({"augment": {"affine_prob": 0.0, "enlarge_spleen_prob": 0.3}, "organs": ["liver"]}, "segments the spleen"),
    ({"augment": {"affine_prob": 0.0, "renal_cyst_prob": 0.3}, "mr": True}, "renal_cyst_prob needs a CT model"),
    ({"init_from": "no/such/package"}, "has no card.json"),
]


@pytest.mark.parametrize("change,message", BAD_BEFORE_CACHING)
def test_a_bad_recipe_is_refused_before_the_data_cache_is_built(tmp_path, monkeypatch, change, message):
    """The whole config is checked first: a bad option used to fail after minutes of caching."""
    from AbdomenSegLib.preprocessing import datasets

    cache = tmp_path / "cache.npz"
    config = _config(tmp_path / "data", cache, steps=2)
    change = dict(change)
    if change.pop("mr", False):
        config["model"].update(modality="MR", intensity={"mode": "mr_percentile"})
    if "organs" in change:
        config["model"]["organs"] = change.pop("organs")
    for key, value in change.items():
        config["train"][key] = {**config["train"][key], **value} if isinstance(value, dict) else value
    calls = []
    monkeypatch.setattr(datasets, "build_cache", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(datasets, "find_cases", lambda *a, **k: calls.append(a) or [])
    with pytest.raises(AbdomenSegError, match=message) as error:
        Trainer(config, tmp_path / "run", log=lambda m: None)
    assert error.value.fix and str(error.value) == f"{error.value.problem}. {error.value.fix}"
    assert not calls and not cache.exists()  # refused before the dataset was read


def test_the_trainer_builds_its_recipe_through_seams(tmp_path):
    """A subclass replaces one part (here the loss) without touching the loop."""
    import torch

    class L1Trainer(Trainer):
        def build_loss(self):
            return lambda logits, labels: (torch.softmax(logits, 1)[:, 0] - (labels[:, 0] == 0).float()).abs().mean()

    trainer = L1Trainer(
        _config(tmp_path / "data", tmp_path / "cache.npz", steps=3, val_every=3), tmp_path / "run", log=lambda m: None
    )
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and not isinstance(trainer.loss, torch.nn.Module)
    assert trainer.run()[-1]["step"] == 3


def test_the_exported_card_names_the_engine_version(tmp_path):
    """One version number, AbdomenSegLib.__version__, in every card the trainer exports; the card schema
    accepts cards without it (the shipped ones) and refuses a malformed one."""
    from AbdomenSegLib import __version__
    from AbdomenSegLib.models.card_schema import card_problems

    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=1)
    card = Trainer(config, tmp_path / "run", log=lambda m: None).card()
    assert card["abdomenseg_version"] == __version__ and card["version"] == "1.0.0"
    assert not [p for p in card_problems(card, pending=("weights", "sha256"))]
    assert not card_problems(
        {k: v for k, v in card.items() if k != "abdomenseg_version"}, pending=("weights", "sha256")
    )
    assert card_problems(dict(card, abdomenseg_version=1.0), pending=("weights", "sha256")) == [
        'abdomenseg_version 1.0 must be a version number such as "0.1.0"'
    ]


def test_loader_workers_make_the_same_batches_as_the_training_process(tmp_path):
    """Batches from `train.loader_workers` processes arrive in step order and equal the serial ones, so a run's
    data do not depend on how many workers made them."""
    import torch

    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=6)
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    trainer.rng_state = 0
    serial = list(trainer._batches(1, 6))
    trainer.config["train"]["loader_workers"] = 2
    pooled = list(trainer._batches(1, 6))
    assert len(pooled) == len(serial) == 5
    for (x0, y0), (x1, y1) in zip(serial, pooled):
        assert torch.equal(x0, x1) and torch.equal(y0, y1.long())
    assert not all(torch.equal(serial[0][0], x) for x, _ in serial[1:])  # the steps really differ


def test_every_shipped_config_is_valid_with_what_it_extends(monkeypatch):
    """A config that fails its own check is found here, not at the start of a (GPU) training run."""
    from helpers import ROOT, shared

    shared("btcv_ct"), shared("chaos_mr_t2")  # the configs' roots: ../shared/data/..., from the checkout's root
    monkeypatch.chdir(ROOT)
    configs = sorted(
        [*(ROOT / "Resources" / "configs").glob("*.json"), *(ROOT / "experiments" / "configs").glob("*.json")]
    )
    assert len(configs) >= 18
    for path in configs:
        config = load_config(path)
        assert config["name"] and config["train"]["steps"] >= 1, path.name
