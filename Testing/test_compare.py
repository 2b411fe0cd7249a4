import csv
import json
import shutil

from AbdomenSegLib.cli import main

from conftest import write_phantom_dataset


def test_compare_two_models_writes_table_markdown_and_plot(tmp_path, tiny_package, capsys):
    images, refs = write_phantom_dataset(tmp_path / "data", cases=2)
    refs.rename(tmp_path / "data" / "labels")
    other = tmp_path / "tiny-b"
    shutil.copytree(tiny_package.path, other)
    card = json.loads((other / "card.json").read_text())
    card["name"] = "tiny-b"
    (other / "card.json").write_text(json.dumps(card))
    out = tmp_path / "cmp"
    args = ["compare", "--models", f"{tiny_package.path},{other}", "--data", str(tmp_path / "data"),
            "--labels", "abdomenseg", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert {r["model"] for r in rows} == {"tiny-test", "tiny-b"}
    assert {"dice_mean", "dice_std", "iou_mean", "hd95_mm_mean", "surface_dice_mean"} <= set(rows[0])
    assert (out / "comparison.md").read_text().startswith("| model | organ |")
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2 * 2 * 5
    assert main(args) == 2 and "already exist" in capsys.readouterr().err  # nothing overwritten unasked
