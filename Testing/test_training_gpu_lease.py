"""The pieces of a GPU lease (lease.py, lease_run.py, bench/gpu_lease.py): what travels and its size, weights moved
aside and back, the compact cache, weights split and reassembled under sha256, and the run sized to the time."""

import subprocess

import numpy as np
import pytest

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.training.lease import (
    check_travel,
    exclude,
    move_aside,
    plan_steps,
    read_compact_cache,
    reassemble,
    restore,
    split_file,
    travel_size,
    write_compact_cache,
)
from AbdomenSegLib.training.lease_run import lease_lr, organ_dice


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "Resources" / "models" / "m").mkdir(parents=True)
    (repo / "code.py").write_bytes(b"x" * 100)
    (repo / "Resources" / "models" / "m" / "model.safetensors").write_bytes(b"w" * 1000)
    (repo / ".gitignore").write_text("runs/\n")  # 6 bytes
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    (repo / "notes.txt").write_bytes(b"n" * 50)  # untracked, not ignored: travels
    (repo / "runs").mkdir()
    (repo / "runs" / "big.bin").write_bytes(b"r" * 5000)  # ignored: stays
    (repo / ".lease").mkdir()
    (repo / ".lease" / "cache").write_bytes(b"c" * 300)
    return repo


def test_travel_size_counts_what_a_device_call_sends(tmp_path):
    repo = _repo(tmp_path)
    exclude(repo, "/.lease/")
    exclude(repo, "/.lease/")  # once only
    assert (repo / ".git" / "info" / "exclude").read_text().count("/.lease/") == 1
    size = travel_size(repo, [".lease"])
    assert size == {"tracked": 1106, "untracked": 50, "carry": {".lease": 300}, "total": 1456}
    with pytest.raises(AbdomenSegError, match="over the 0 MiB"):
        check_travel(size, limit=1000)
    moved = move_aside(repo, ["Resources/models/m/model.safetensors", "missing.bin"], tmp_path / "aside")
    assert moved == ["Resources/models/m/model.safetensors"]
    assert travel_size(repo, [".lease"])["total"] == 456  # a tracked file moved aside does not travel
    check_travel(travel_size(repo, [".lease"]), limit=1000)
    assert restore(repo, tmp_path / "aside") == ["Resources/models/m/model.safetensors"]
    assert (repo / "Resources" / "models" / "m" / "model.safetensors").read_bytes() == b"w" * 1000


def test_restore_never_overwrites_a_changed_file(tmp_path):
    repo = _repo(tmp_path)
    weights = repo / "Resources" / "models" / "m" / "model.safetensors"
    move_aside(repo, ["Resources/models/m/model.safetensors"], tmp_path / "aside")
    weights.write_bytes(b"new")  # e.g. a package installed meanwhile
    with pytest.raises(AbdomenSegError, match="changed in the checkout"):
        restore(repo, tmp_path / "aside")
    assert weights.read_bytes() == b"new" and (tmp_path / "aside" / "Resources/models/m/model.safetensors").is_file()
    with pytest.raises(AbdomenSegError, match="inside the repository"):
        move_aside(repo, ["code.py"], repo / "aside")


def test_weights_split_and_reassemble_under_sha256(tmp_path):
    data = np.random.default_rng(0).bytes(2500)
    (tmp_path / "w.safetensors").write_bytes(data)
    manifest = split_file(tmp_path / "w.safetensors", tmp_path / "out", part_bytes=1000)
    assert [p["bytes"] for p in manifest["parts"]] == [1000, 1000, 500]
    assert reassemble(tmp_path / "out" / "best.manifest.json", tmp_path / "back").read_bytes() == data
    part = tmp_path / "out" / "best.part1"
    part.write_bytes(b"\0" + part.read_bytes()[1:])  # one byte changed in transit
    with pytest.raises(AbdomenSegError, match="fails its sha256"):
        reassemble(tmp_path / "out" / "best.manifest.json", tmp_path / "again")
    part.unlink()
    with pytest.raises(AbdomenSegError, match="missing"):
        reassemble(tmp_path / "out" / "best.manifest.json", tmp_path / "again")


def test_compact_cache_holds_the_trainers_arrays_exactly(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"settings": np.array("s")}
    for name in ("a", "b"):
        arrays[f"image/{name}"] = rng.integers(0, 256, (8, 9, 10), dtype=np.uint8)
        arrays[f"label/{name}"] = rng.integers(0, 14, (8, 9, 10), dtype=np.uint8)
    write_compact_cache(arrays, tmp_path / "c.npz.xz")
    back = read_compact_cache(tmp_path / "c.npz.xz")
    assert set(back) == set(arrays) and all(np.array_equal(back[k], v) for k, v in arrays.items())
    write_compact_cache(arrays, tmp_path / "b.npz.xz", names=["b"])
    assert set(read_compact_cache(tmp_path / "b.npz.xz")) == {"settings", "image/b", "label/b"}


def test_the_run_is_sized_to_the_time_left():
    # 500 s left, 4 validations of 10 s, 25 s reserved: 435 s of training at 8 steps/s
    assert plan_steps(500, 8.0, 4, 10.0, 25.0) == 3480
    assert plan_steps(30, 8.0, 4, 10.0, 25.0) == 0  # nothing fits: no negative step count
    peak = 3e-4
    assert lease_lr(0, 30, 1000, peak) == pytest.approx(peak / 30)  # warm-up from the restart
    assert lease_lr(29, 30, 1000, peak) == pytest.approx(peak)
    assert lease_lr(30, 30, 1000, peak) == pytest.approx(peak)  # cosine from the peak ...
    assert lease_lr(515, 30, 1000, peak) == pytest.approx(peak / 2)
    assert lease_lr(1000, 30, 1000, peak) == pytest.approx(0.0, abs=1e-12)  # ... to zero at the planned end


def test_model_space_dice_as_metrics_counts_it():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2] = 1
    prediction = label.copy()
    prediction[0] = 0  # half the liver missed
    prediction[3, 3, 3] = 2  # a spleen voxel where there is none
    dice = organ_dice(prediction, label, ["liver", "spleen", "kidney_left"])
    assert dice["liver"] == pytest.approx(2 * 16 / (16 + 32)) and dice["spleen"] == 0.0
    assert np.isnan(dice["kidney_left"])  # in neither: not counted


def test_a_lease_run_on_the_cpu_writes_what_comes_back(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from AbdomenSegLib.models.networks import build_network
    from AbdomenSegLib.training.config import load_config
    from AbdomenSegLib.training.lease_run import run_lease

    architecture = {"class": "UNet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}
    config = load_config(
        {
            "data": {"root": str(tmp_path), "convention": "btcv"},
            "model": {"architecture": architecture, "organs": ["liver", "spleen"], "spacing": [8.0, 8.0, 14.0]},
            "train": {"pipeline": "device", "patch": [16, 32, 32], "lr": 0.01},
        }
    )
    rng = np.random.default_rng(2)
    arrays = {"settings": np.array("synthetic")}
    for name in ("a", "b", "c"):
        label = np.zeros((20, 40, 40), np.uint8)
        label[4:14, 5:25, 5:20], label[6:12, 10:30, 25:35] = 1, 2  # organ table values: liver 1, spleen 2
        arrays[f"image/{name}"] = (label * 60 + rng.integers(0, 40, label.shape)).astype(np.uint8)
        arrays[f"label/{name}"] = label
    lease = tmp_path / "lease"
    write_compact_cache(arrays, lease / "cache.npz.xz")
    network = build_network(architecture, 1, 3)
    save_file({k: v.half().contiguous() for k, v in network.state_dict().items()}, str(lease / "init.safetensors"))
    plan = {"config": config, "train_names": ["a", "b"], "val_names": ["c"], "cache": "cache.npz.xz"}
    plan |= {"weights": "init.safetensors", "init": {"name": "fresh"}}
    (lease / "plan.json").write_text(json.dumps(plan))
    record = run_lease(lease, tmp_path / "out", 120, "cpu", max_steps=14, warmup=12, log=lambda m: None)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["best.manifest.json", "best.part0", "curve.png", "history.json"]  # <= 8 files back
    assert record["steps"] == 14 and [h["step"] for h in record["history"]][0] == 0
    back = reassemble(tmp_path / "out" / "best.manifest.json", tmp_path / "best.safetensors")
    from safetensors.torch import load_file

    weights = load_file(str(back))
    assert all(v.dtype == torch.float32 for v in weights.values()) and set(weights) == set(network.state_dict())
