"""One prepared GPU lease for the training campaign: prepare here, run there, restore and import here.

    python bench/gpu_lease.py prepare                  # .lease/ (cache, starting weights, MONAI wheel, plan);
                                                       # tracked weights moved aside; prints the travel size
    (device run tool)  python3 bench/gpu_lease.py run --budget-s 500 --out $OUT      # see docs/gpu_training.md
    python bench/gpu_lease.py restore                  # the weights back into the checkout
    python bench/gpu_lease.py import /work/.device/... # reassemble, export, validate, keep only if better, log
    python bench/gpu_lease.py dry-run                  # all four on the CPU in a temporary copy, a tiny model

Each lease continues from the best weights so far: the shipped default package (train.init_from of the lease
config), which `import --install` replaces only when the lease's package validates better on the card's own
full-pipeline protocol. docs/gpu_training.md explains the choices; docs/gpu_campaign.md is the log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from AbdomenSegLib.core.errors import AbdomenSegError  # noqa: E402
from AbdomenSegLib.training.lease import LEASE_DIR, MIB  # noqa: E402

CONFIG = "Resources/configs/btcv_ct_3d_lease.json"
ASIDE = ROOT.parent / f"{ROOT.name}-lease-aside"  # outside the checkout: moved weights do not travel
LOG = "docs/gpu_campaign.md"
CAMPAIGN_HEADER = """# GPU training campaign: the default CT model (btcv-ct-3d-unet)

One row per lease, appended by `python bench/gpu_lease.py import` (docs/gpu_training.md). Steps and seconds are
the lease's training alone; the share is training time over the lease's device time when `--device-seconds` was
given (else over the run command's time); the curve is model-space validation Dice (mean over organs) by step,
step 0 being the starting weights; the last column the full-pipeline validation (the card's protocol) against
the package it had to beat.

| date | GPU | steps | seconds | steps/s | share training | validation curve (step: mean Dice) | full pipeline vs baseline |
|---|---|---|---|---|---|---|---|
"""


def prepare(config_path: str, aside: Path, log=print) -> dict:
    """Build .lease/ (compact cache, float16 starting weights, MONAI wheel, plan.json), move the tracked weights
    aside, and return the travel size (refused over 64 MiB)."""
    from safetensors.torch import save_file

    from AbdomenSegLib.models.packages import load_network, read_card
    from AbdomenSegLib.preprocessing.datasets import config_cache, split_cases
    from AbdomenSegLib.training.config import load_config
    from AbdomenSegLib.training.lease import check_travel, exclude, move_aside, travel_size, write_compact_cache

    config = load_config(config_path)
    t, d, m = config["train"], config["data"], config["model"]
    if t["pipeline"] != "device" or not t["init_from"]:
        raise AbdomenSegError(
            f"config '{config_path}' does not train with the device pipeline from a package",
            'set train.pipeline "device" and train.init_from to the best package so far',
        )
    card = read_card(t["init_from"])
    if card["architecture"] != m["architecture"] or list(card["labels"].values()) != m["organs"]:
        raise AbdomenSegError(
            f"train.init_from '{t['init_from']}' has another architecture or organ list",
            "start from a package of the same model",
        )
    lease = ROOT / LEASE_DIR
    exclude(ROOT, f"/{LEASE_DIR}/")
    lease.mkdir(exist_ok=True)
    # float16 starting weights: half of float32's 18 MiB, which with the cache would not fit the 64 MiB
    state = {k: v.half().contiguous() for k, v in load_network(card, "cpu").state_dict().items()}
    save_file(state, str(lease / "init.safetensors.part"))
    (lease / "init.safetensors.part").replace(lease / "init.safetensors")
    arrays = config_cache(config, log=log)
    names = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("image/"))
    train_names, val_names = split_cases(names, d["val_count"], d["seed"], d["fold"])
    plan_path = lease / "plan.json"
    old = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    settings = str(arrays["settings"])
    if old.get("cache_settings") != settings or not (lease / "cache.npz.xz").is_file():
        start = time.time()
        size = write_compact_cache(arrays, lease / "cache.npz.xz")
        log(f"compact cache: {len(names)} cases, {size / MIB:.1f} MiB ({time.time() - start:.0f} s)")
    wheel = _monai_wheel(lease / "wheels")
    # each lease its own batches: a lease that is not kept leaves the same starting weights to the next one
    leases = _logged_leases(ROOT / LOG)
    config["train"]["seed"] = int(t["seed"]) + leases
    from AbdomenSegLib.training.lease import atomic_json

    atomic_json(
        plan_path,
        {
            "config": config,
            "train_names": train_names,
            "val_names": val_names,
            "cache": "cache.npz.xz",
            "cache_settings": settings,
            "lease_index": leases,
            "weights": "init.safetensors",
            "wheels": [f"wheels/{wheel.name}"],
            "init": {
                "name": card["name"],
                "sha256": card["sha256"],
                "steps": card.get("training", {}).get("steps"),
                "path": str(t["init_from"]),
            },
        },
    )
    # The weights (the start travels as fp16 in the cache) and the sample scans are not needed on the device, and
    # with them the tree would not fit in the 64 MiB that travel.
    weights = [p for p in _tracked(ROOT) if p.endswith(".safetensors") or p.startswith(NOT_NEEDED_ON_DEVICE)]
    moved = move_aside(ROOT, weights, aside)
    size = travel_size(ROOT, [LEASE_DIR])
    log(f"moved aside to {aside}: {len(moved)} weight and sample files")
    log(
        f"travels: tracked {size['tracked']} + untracked {size['untracked']} + carried {size['carry'][LEASE_DIR]}"
        f" = {size['total']} bytes ({size['total'] / MIB:.2f} MiB of 64)"
    )
    check_travel(size)
    log("after the lease, also if it fails: python bench/gpu_lease.py restore  (the weights are out of the checkout)")
    return size


NOT_NEEDED_ON_DEVICE = ("Resources/Samples/", "docs/images/", "Resources/Screenshots/")


def _logged_leases(path: Path) -> int:
    """Rows of the campaign log (one per imported lease)."""
    return sum(line.startswith("| 2") for line in path.read_text().splitlines()) if path.is_file() else 0


def _tracked(repo: Path) -> list:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], check=True, capture_output=True, text=True)
    return [p for p in out.stdout.split("\0") if p]


def _monai_wheel(folder: Path) -> Path:
    """The installed MONAI repacked as a wheel (pure Python; the device machine has none and no network): its
    package and dist-info folders zipped, bytecode left out."""
    import zipfile

    import monai

    package = Path(monai.__file__).parent
    info = next(package.parent.glob(f"monai-{monai.__version__}.dist-info"))
    wheel = folder / f"monai-{monai.__version__}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    tmp = wheel.with_name(wheel.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for base in (package, info):
            for path in sorted(base.rglob("*")):
                if path.is_file() and path.suffix != ".pyc" and "__pycache__" not in path.parts:
                    archive.write(path, path.relative_to(package.parent).as_posix())
    tmp.replace(wheel)
    return wheel


def run(out: Path, budget_s: float, device: str, max_steps: int | None) -> dict:
    from AbdomenSegLib.training.lease_run import run_lease

    return run_lease(ROOT / LEASE_DIR, out, budget_s, device, max_steps, log=lambda m: print(m, flush=True))


def restore_weights(aside: Path, log=print) -> list:
    from AbdomenSegLib.training.lease import restore

    back = restore(ROOT, aside)
    log(f"restored {len(back)} weight files from {aside}")
    return back


def import_result(
    result: Path,
    config_path: str,
    baseline: str | None,
    install: bool,
    min_gain: float,
    log_path: str,
    device_seconds: float | None,
    log=print,
) -> dict:
    """Reassemble the weights (sha256), export them as a package through the trainer's export path, validate it
    with the card's full-pipeline protocol, keep it only if it beats the baseline (the shipped default), and add a
    row to the campaign log."""
    import numpy as np

    from AbdomenSegLib.models.packages import MODELS_DIR, default_model_name, read_card
    from AbdomenSegLib.training.config import load_config
    from AbdomenSegLib.training.export import train_and_export
    from AbdomenSegLib.training.lease import reassemble
    from AbdomenSegLib.training.trainer import Trainer

    record = json.loads((result / "history.json").read_text())
    config = load_config(config_path)
    out = ROOT / "runs" / f"lease-{time.strftime('%Y%m%d-%H%M%S')}"
    weights = reassemble(result / "best.manifest.json", out / "best.safetensors")
    if record["weights_sha256"] != json.loads((result / "best.manifest.json").read_text())["sha256"]:
        raise AbdomenSegError("the weights' manifest does not match the run's history", "fetch the lease's files again")
    log(f"reassembled {weights} (sha256 checked)")
    trainer = Trainer(config, out, device="cpu", log=log)
    trainer.history = [h for h in record["history"] if h["step"] > 0]  # the lease's validations (model space)
    trainer.step, trainer.rng_state = int(record["steps"]), int(config["train"]["seed"])
    trainer.save_checkpoint()  # the export path (train --export-only) reads it
    card = train_and_export(config, out=out, device="cpu", export_only=True, log=log)
    card.data["training"].update(
        hardware=record["device"],
        seconds=record["train_seconds"],
        lease={
            k: record[k]
            for k in ("steps", "step_rate", "budget_s", "best_step", "probe_steps_per_s", "autocast", "started_from")
        },
    )
    from AbdomenSegLib.io.files import write_json

    write_json(card.data, card.path / "card.json")
    base = read_card(baseline or MODELS_DIR / default_model_name())
    new_mean = float(np.nanmean(list(card["validation"]["dice"].values())))
    old_mean = float(np.nanmean(list(base["validation"]["dice"].values())))
    better = new_mean - old_mean >= min_gain
    log(
        f"full-pipeline mean Dice {new_mean:.4f} against {base.name}'s {old_mean:.4f}: "
        + ("better" if better else "not better, not kept")
    )
    if better and install:
        _install(card.path, base.path)
    elif not better:
        shutil.rmtree(card.path)
    _log_row(ROOT / log_path, record, new_mean, old_mean, better, install, device_seconds)
    return {"mean": new_mean, "baseline": old_mean, "better": better, "package": str(card.path) if better else None}


def _install(package: Path, target: Path) -> None:
    """The new package's files over the baseline's folder, each written under a temporary name then renamed."""
    for name in ("model.safetensors", "card.json"):
        tmp = target / (name + ".part")
        shutil.copyfile(package / name, tmp)
        tmp.replace(target / name)


def _log_row(
    path: Path,
    record: dict,
    new_mean: float,
    old_mean: float,
    better: bool,
    install: bool,
    device_seconds: float | None,
) -> None:
    import numpy as np

    curve = ", ".join(f"{h['step']}: {np.nanmean(list(h['dice'].values())):.3f}" for h in record["history"])
    share = record["train_seconds"] / (device_seconds or record["seconds"])
    basis = "of the lease" if device_seconds else "of the command"
    kept = "kept, installed" if better and install else ("better, not installed" if better else "not kept")
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {record['device']} | {record['steps']} | {record['train_seconds']} | "
        f"{record['step_rate']} | {share:.0%} {basis} | {curve} | {new_mean:.4f} vs {old_mean:.4f} ({kept}) |\n"
    )
    text = path.read_text() if path.is_file() else CAMPAIGN_HEADER
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text + row)
    tmp.replace(path)


def dry_run(keep: bool = False, log=print) -> None:
    """prepare -> run (CPU, a few steps) -> restore -> import on a tiny phantom model, in a temporary clone of this
    checkout (its uncommitted changes copied in), so nothing here is touched."""
    tmp = Path(tempfile.mkdtemp(prefix="lease-dry-"))
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(repo)], check=True)
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "-m", "-o", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, changed):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    config = _tiny_setup(tmp, repo)
    env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def phase(*args):
        log(f"--- gpu_lease.py {' '.join(args)}")
        subprocess.run([sys.executable, "bench/gpu_lease.py", *args], cwd=repo, env=env, check=True)

    aside = str(tmp / "aside")
    phase("prepare", "--config", config, "--aside", aside)
    phase("run", "--device", "cpu", "--budget-s", "90", "--max-steps", "40", "--out", str(tmp / "out"))
    phase("restore", "--aside", aside)
    phase("import", str(tmp / "out"), "--config", config, "--baseline", str(tmp / "init" / "tiny-lease"))
    log(f"dry run done in {tmp}" if keep else "dry run done")
    if not keep:
        shutil.rmtree(tmp)


def _tiny_setup(tmp: Path, repo: Path) -> str:
    """A phantom dataset, a tiny model's config for the device pipeline and its starting package (2 steps)."""
    import SimpleITK as sitk

    from AbdomenSegLib.io.phantom import make_phantom
    from AbdomenSegLib.training.run import train_and_export

    for folder in ("images", "labels"):
        (tmp / "data" / folder).mkdir(parents=True)
    for i in range(3):
        ct, labels = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0), seed=i)
        sitk.WriteImage(ct, str(tmp / "data" / "images" / f"case{i}.nii.gz"))
        sitk.WriteImage(labels, str(tmp / "data" / "labels" / f"case{i}.nii.gz"))
    config = {
        "name": "tiny-lease",
        "data": {
            "root": str(tmp / "data"),
            "convention": "abdomenseg",
            "val_count": 1,
            "cache": str(tmp / "cache.npz"),
        },
        "model": {
            "architecture": {"class": "UNet", "args": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
            "spacing": [8.0, 8.0, 14.0],
            "organs": ["liver", "spleen", "kidney_right", "kidney_left"],
        },
        "train": {
            "steps": 2,
            "patch": [16, 32, 32],
            "lr": 0.01,
            "val_every": 2,
            "pipeline": "device",
            "augment": {"affine_prob": 0.3, "renal_cyst_prob": 0.3, "enlarge_spleen_prob": 0.3},
        },
    }
    train_and_export(config, out=tmp / "init-run", device="cpu", export_to=tmp / "init", log=lambda m: None)
    config["train"].update(init_from=str(tmp / "init" / "tiny-lease"), lr=0.005)
    path = repo / "runs" / "tiny-lease.json"  # runs/ is ignored: the config does not travel as untracked
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return str(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--config", default=CONFIG)
    a.add_argument("--aside", type=Path, default=ASIDE)
    a = sub.add_parser("run")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--budget-s", type=float, required=True, help="seconds from now to the last file written")
    a.add_argument("--device", default="cuda")
    a.add_argument("--max-steps", type=int)
    a = sub.add_parser("restore")
    a.add_argument("--aside", type=Path, default=ASIDE)
    a = sub.add_parser("import")
    a.add_argument("result", type=Path, help="the folder of the files the lease returned")
    a.add_argument("--config", default=CONFIG)
    a.add_argument("--baseline", help="package to beat (default: the shipped default model)")
    a.add_argument("--install", action="store_true", help="replace the baseline package when better")
    a.add_argument("--min-gain", type=float, default=0.005, help="mean Dice gain that counts as better")
    a.add_argument("--log", default=LOG)
    a.add_argument("--device-seconds", type=float, help="the lease's device time (run tool: lease.held_s)")
    a = sub.add_parser("dry-run")
    a.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.verb == "prepare":
            prepare(args.config, args.aside)
        elif args.verb == "run":
            run(args.out, args.budget_s, args.device, args.max_steps)
        elif args.verb == "restore":
            restore_weights(args.aside)
        elif args.verb == "import":
            result = import_result(
                args.result, args.config, args.baseline, args.install, args.min_gain, args.log, args.device_seconds
            )
            print(json.dumps(result))
        else:
            dry_run(args.keep)
    except AbdomenSegError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
