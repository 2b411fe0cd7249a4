import csv
import json
import shutil

from AbdomenSegLib.cli import main
from helpers import write_phantom_dataset


def test_compare_two_models_writes_table_markdown_and_plot(tmp_path, tiny_package, capsys):
    images, refs = write_phantom_dataset(tmp_path / "data", cases=2)
    refs.rename(tmp_path / "data" / "labels")
    other = tmp_path / "tiny-b"
    shutil.copytree(tiny_package.path, other)
    card = json.loads((other / "card.json").read_text())
    card["name"] = "tiny-b"
    (other / "card.json").write_text(json.dumps(card))
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--models",
        f"{tiny_package.path},{other}",
        "--data",
        str(tmp_path / "data"),
        "--labels",
        "abdomenseg",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert {r["model"] for r in rows} == {"tiny-test", "tiny-b"}
    assert {"dice_mean", "dice_std", "iou_mean", "hd95_mm_mean", "surface_dice_mean"} <= set(rows[0])
    assert (out / "comparison.md").read_text().startswith("| model | organ |")
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2 * 2 * 5
    assert main(args) == 2 and "already exist" in capsys.readouterr().err  # nothing overwritten unasked


def test_two_versions_of_one_model_stay_apart(tmp_path, tiny_package):
    """A package and its continuation share a name; the table must not pool their cases."""
    import torch

    from AbdomenSegLib.evaluation.compare import run_comparison
    from AbdomenSegLib.models.packages import export_package, load_network

    images, refs = write_phantom_dataset(tmp_path / "data", cases=1)
    refs.rename(tmp_path / "data" / "labels")
    network = load_network(tiny_package)
    with torch.no_grad():
        next(network.parameters()).mul_(0.5)  # a different version: other weights, other sha256
    continued = export_package(network, dict(tiny_package.data), tmp_path / "continued")
    assert continued.name == tiny_package.name and continued["sha256"] != tiny_package["sha256"]
    summary = run_comparison(
        [str(tiny_package.path), str(continued.path)],
        tmp_path / "data",
        "abdomenseg",
        tmp_path / "cmp",
        device="cpu",
        log=lambda m: None,
    )
    labels = {s["model"] for s in summary}
    assert labels == {f"tiny-test ({tiny_package['sha256'][:8]})", f"tiny-test ({continued['sha256'][:8]})"}
    assert all(s["cases"] == 1 for s in summary)
