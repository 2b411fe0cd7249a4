"""experiments/cross_validate.py: a recipe's chain trained per fold with the project's `train`, folds disjoint, each
stage continuing the previous one's package, an interrupted run continued, a leaking first stage refused."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from helpers import write_phantom_dataset

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("cross_validate", ROOT / "experiments" / "cross_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe(tmp_path, first_init_from=None):
    root = tmp_path / "data"
    _, refs = write_phantom_dataset(root, cases=4)
    refs.rename(root / "labels")
    first = {
        "name": "tiny-cv",
        "data": {"root": str(root), "convention": "abdomenseg", "cache": str(tmp_path / "cache.npz"), "val_count": 1},
        "model": {
            "architecture": {"class": "UNet", "args": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
            "spacing": [8.0, 8.0, 14.0],
            "organs": ["liver", "spleen", "kidney_right", "kidney_left"],
        },
        "train": {"steps": 8, "patch": [16, 32, 32], "lr": 0.01, "threads": 1, "init_from": first_init_from},
    }
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps({"extends": "a.json", "train": {"steps": 4, "lr": 0.003}}))
    return [str(tmp_path / "a.json"), str(tmp_path / "b.json")]


@pytest.mark.slow
def test_each_fold_trains_the_chain_on_its_own_split_and_pools_the_last_stage(tmp_path, capsys):
    bench, out = _bench(), tmp_path / "cv"
    recipe = _recipe(tmp_path)
    bench.main([*recipe, "--folds", "2", "--step-scale", "0.5", "--split", "--out", str(out)])
    record = json.loads((out / "cross_validation.json").read_text())
    assert len(record["own_split"]["cases"]) == 1  # the configs' own split (val_count 1) beside the folds
    vals = [set(record["per_fold"][k]["cases"]) for k in ("0", "1")]
    assert not vals[0] & vals[1] and vals[0] | vals[1] == {f"case{i}" for i in range(4)}
    for k in (0, 1):
        first = json.loads((out / f"fold-{k}" / "stage-0" / "package" / "card.json").read_text())
        last = json.loads((out / f"fold-{k}" / "stage-1" / "package" / "card.json").read_text())
        assert first["training"]["steps"] == 4 and last["training"]["steps"] == 2  # steps scaled by 0.5
        assert last["training"]["initialised_from"]["sha256"] == first["sha256"]  # the chain continues
        assert set(last["training"]["validation_cases"]) == vals[k]  # and keeps its fold
        assert set(vals[k]).isdisjoint(last["training"]["train_cases"])
    pooled = record["pooled"]
    for organ, entry in pooled.items():  # equal fold sizes: the pooled mean is the mean of the fold means
        fold_means = [record["per_fold"][k]["dice"][organ] for k in ("0", "1")]
        assert entry["mean"] == pytest.approx(sum(fold_means) / 2, abs=1e-4)
    printed = capsys.readouterr().out
    assert "pooled (fold std)" in printed and "own split" in printed
    # run again with an export cut off while validating (its card has no validation yet): only that stage runs
    # again, from its last checkpoint; the finished ones are kept, and the same figures come back
    cut = out / "fold-1" / "stage-1" / "package" / "card.json"
    card = json.loads(cut.read_text())
    del card["validation"]
    cut.write_text(json.dumps(card))
    before = (out / "fold-0" / "stage-1" / "package" / "card.json").stat().st_mtime_ns
    bench.main([*recipe, "--folds", "2", "--step-scale", "0.5", "--out", str(out)])
    assert (out / "fold-0" / "stage-1" / "package" / "card.json").stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "fold 1 stage 1" in printed and "stage 0" not in printed and "fold 0 stage 1" not in printed
    assert json.loads(cut.read_text())["validation"]["dice"] == record["per_fold"]["1"]["dice"]
    assert json.loads((out / "cross_validation.json").read_text())["pooled"] == pooled
    # the pooled figures go into a package's card beside its own validation
    target = shutil.copytree(out / "fold-0" / "stage-1" / "package", tmp_path / "shipped")
    bench.main([*recipe, "--folds", "2", "--step-scale", "0.5", "--out", str(out), "--record-in", str(target)])
    card = json.loads((target / "card.json").read_text())
    assert card["cross_validation"]["dice"] == {o: v["mean"] for o, v in pooled.items()}
    assert card["cross_validation"]["fold_cases"] == {k: record["per_fold"][k]["cases"] for k in ("0", "1")}
    source = json.loads((out / "fold-0" / "stage-1" / "package" / "card.json").read_text())
    assert "2-fold" in card["cross_validation"]["protocol"] and card["validation"] == source["validation"]
    # the same folder with other settings is refused: its packages were trained on other splits
    with pytest.raises(SystemExit, match="another folds, step_scale"):
        bench.main([*recipe, "--folds", "3", "--step-scale", "0.4", "--out", str(out)])


def test_a_first_stage_that_starts_from_trained_weights_is_refused_before_training(tmp_path):
    bench = _bench()
    package = ROOT / "Resources" / "models" / "btcv-ct-3d-unet"
    with pytest.raises(SystemExit, match="trained on every fold's validation cases"):
        bench.main([*_recipe(tmp_path, first_init_from=str(package)), "--out", str(tmp_path / "cv")])
    assert not (tmp_path / "cv").exists()


def test_stages_that_would_deal_other_folds_are_refused_before_training(tmp_path):
    bench = _bench()
    recipe = _recipe(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"extends": "a.json", "data": {"seed": 3}}))
    with pytest.raises(SystemExit, match="has another data.seed"):
        bench.main([recipe[0], str(tmp_path / "c.json"), "--out", str(tmp_path / "cv")])
    with pytest.raises(SystemExit, match="--only-fold 4 is not one of 4 folds"):
        bench.main([*recipe, "--only-fold", "4", "--out", str(tmp_path / "cv")])
    assert not (tmp_path / "cv").exists()
