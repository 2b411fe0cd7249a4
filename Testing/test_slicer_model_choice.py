"""The panel's model choice (AbdomenSegLib.models.choice, wired by AbdomenSeg/AbdomenSeg.py): several checked models
run as the command line's `--model a+b` ensemble, on real MRML (slicer-core) and the panel's engine process; a
choice the engine refuses is named with its `error: <problem>. <fix>` line before any work; the test-time mirroring
box is open only to models trained with mirroring; the choice survives a saved scene; the batch script takes both."""

import ast
import copy
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (requirements-dev.txt) provides Slicer's MRML")

from test_inference_ensemble import ARCH, ORGANS, _card  # noqa: E402  (the tiny CT/MR cards of the ensemble tests)
from test_slicer_logic import scene, volume_node  # noqa: E402,F401  (the same MRML scene fixture)
from test_slicer_panel import _run_to_end  # noqa: E402

from AbdomenSegLib.cli import main  # noqa: E402
from AbdomenSegLib.core.errors import AbdomenSegError  # noqa: E402
from AbdomenSegLib.io.phantom import make_phantom  # noqa: E402
from AbdomenSegLib.models.choice import (  # noqa: E402
    QUALITY_TIP,
    TTA_TIP,
    default_names,
    label,
    missing_note,
    names_in,
    select,
)
from AbdomenSegLib.models.packages import RESOURCES, catalog, export_package  # noqa: E402
from AbdomenSegLib.slicer import logic as sl  # noqa: E402
from AbdomenSegLib.slicer.engine_worker import EngineWorker  # noqa: E402
from AbdomenSegLib.slicer.runs import BackgroundRun  # noqa: E402
from helpers import ROOT  # noqa: E402

SHIPPED_PAIR = ["btcv-ct-3d-unet", "btcv-ct-2d-unet-r18"]  # both CT, the same 13 organs, 3D and 2D grids


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder: tiny untrained CT models on two grids (b's channels in another order), an MR one, one with
    fewer organs, both CT grids once more with cards saying they were trained mirrored, and an ensemble entry."""
    import torch

    from AbdomenSegLib.models.networks import build_network

    folder = tmp_path_factory.mktemp("models")
    a, b = _card("tiny-a"), _card("tiny-b", organs=ORGANS[::-1], spacing=(6.0, 6.5, 7.0))
    singles = [a, b, _card("tiny-mr", modality="MR"), _card("tiny-two", organs=["liver", "spleen"])]
    for source, name in ((a, "tiny-mirrored"), (b, "tiny-mirrored-b")):
        card = copy.deepcopy(source)
        card["name"] = name
        card["inference"]["tta_mirror_axes"] = ["x"]  # one axis, left-right: two passes
        singles.append(card)
    for seed, card in enumerate(singles):
        torch.manual_seed(seed % 2)  # the mirrored cards hold a's and b's networks
        network = build_network(ARCH, 1, len(card["labels"]) + 1)
        export_package(network, card, folder / card["name"], register_in=folder, make_default=seed == 0)
    index = json.loads((folder / "catalog.json").read_text())
    (folder / "pair").mkdir()
    (folder / "pair" / "card.json").write_text(json.dumps({"name": "pair", "ensemble": ["tiny-a", "tiny-b"]}))
    index["models"].append({"name": "pair", "path": "pair"})
    (folder / "catalog.json").write_text(json.dumps(index))
    return folder


@pytest.fixture()
def installed(models, monkeypatch):
    """`models` is what is installed, here and in the engine processes the panel starts."""
    monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
    monkeypatch.setenv("ABDOMENSEG_MODELS", str(models))
    return models


def _phantom():
    return make_phantom(size=(44, 40, 14), spacing=(9.0, 8.5, 15.0))[0]


def _cli_labels(tmp_path, ct, model, *extra):
    src, out = tmp_path / "ct.nrrd", tmp_path / f"{model}{''.join(extra)}.nrrd"
    sitk.WriteImage(ct, str(src))
    assert main(["segment", str(src), str(out), "--model", model, "--device", "cpu", *extra]) in (0, 3)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


def _panel_labels(scene, ct, model, tta=False):
    """What the panel's Segment does with the parameter node's model: one run in the session's engine process."""
    vol = volume_node(scene, ct)
    worker = EngineWorker()
    try:
        run = _run_to_end(
            BackgroundRun(
                sl.AbdomenSegCore(scene, log=lambda m: None), vol, [model], device="cpu", tta=tta, worker=worker
            ),
            limit=600,
        )
    finally:
        worker.stop()
    assert run.error is None, run.error
    ((name, seg),) = run.results.items()
    return name, sitk.GetArrayFromImage(sl.segmentation_to_labels(scene, seg, vol))


# -- several models: the command line's ensemble -------------------------------------------------------
@pytest.mark.parametrize(
    "which", ["tiny", pytest.param("shipped", marks=pytest.mark.slow)], ids=["tiny models", "shipped CT models"]
)
def test_two_checked_models_give_the_command_lines_ensemble(which, scene, models, monkeypatch, tmp_path):
    if which == "tiny":
        monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
        monkeypatch.setenv("ABDOMENSEG_MODELS", str(models))
        names, ct = ["tiny-a", "tiny-b"], _phantom()
    else:
        names, ct = SHIPPED_PAIR, make_phantom(size=(64, 56, 16), spacing=(6.0, 6.0, 10.0))[0]
    selection = select(names)
    assert selection.error == "" and selection.model == "+".join(names)
    assert [m.name for m in selection.card.members] == names
    name, panel = _panel_labels(scene, ct, selection.model)
    cli = _cli_labels(tmp_path, ct, "+".join(names))
    assert name == selection.model  # the segmentation node is named after the ensemble
    assert panel.any() and np.array_equal(panel, cli)
    # Both members count: the ensemble's labels are not the first model's alone.
    assert not np.array_equal(cli, _cli_labels(tmp_path, ct, names[0]))


@pytest.mark.parametrize(
    "names, message",
    [
        (["tiny-a", "tiny-mr"], "mixes CT and MR models"),
        (["tiny-a", "tiny-two"], "segment different organs"),
        (["tiny-a", "pair"], "has ensembles among its members"),
    ],
)
def test_a_choice_the_engine_refuses_is_named_before_any_work(names, message, installed, scene, tmp_path, capsys):
    selection = select(names)
    assert message in selection.error and selection.card is None and not selection.tta_allowed
    # Word for word the line the command line prints for the same --model, which writes nothing.
    src, out = tmp_path / "ct.nrrd", tmp_path / "out.nrrd"
    sitk.WriteImage(_phantom(), str(src))
    capsys.readouterr()
    assert main(["segment", str(src), str(out), "--model", selection.model, "--device", "cpu"]) == 2
    assert selection.error in capsys.readouterr().err.splitlines() and not out.exists()
    # The panel's run refuses it too, before the scan is written or a process started.
    started = []
    with pytest.raises(AbdomenSegError) as refused:
        BackgroundRun(
            sl.AbdomenSegCore(scene),
            volume_node(scene, _phantom()),
            [selection.model],
            process_factory=lambda: started.append(1),
        )
    assert f"error: {refused.value}" == selection.error and not started


def test_ensemble_catalog_entries_are_models_of_the_list(installed):
    cards = catalog()
    assert label(cards["pair"]).startswith("pair (CT, ensemble, ") and label(cards["tiny-a"]).startswith(
        "tiny-a (CT, 3D, "
    )
    pair = select(["pair"])
    assert pair.error == "" and pair.model == "pair" and [m.name for m in pair.card.members] == ["tiny-a", "tiny-b"]


# -- test-time mirroring ------------------------------------------------------------------------------
def test_mirroring_is_off_for_the_shipped_models_and_says_why():
    cards = catalog(RESOURCES / "models")
    assert set(SHIPPED_PAIR) <= set(cards)
    for name in cards:
        selection = select([name], RESOURCES / "models")
        assert selection.error == "" and not selection.tta_allowed
        assert selection.tta_tip.startswith(f"Unavailable: model '{name}' was not trained with mirroring")
        # The one fine second stage ships behind the default model: Quality high opens for the two of them only
        # (naming the second stage runs its cascade), and elsewhere stays at standard and says why.
        if name in ("btcv-ct-3d-unet", "btcv-ct-3d-fine-unet"):
            assert selection.high_allowed and selection.high_tip == QUALITY_TIP
        else:
            assert not selection.high_allowed
            assert selection.high_tip == f"high unavailable: no fine second-stage model is installed for '{name}'"
    pair = select(SHIPPED_PAIR, RESOURCES / "models")
    assert pair.error == "" and not pair.tta_allowed
    mixed = select(["btcv-ct-3d-unet", "chaos-mr-t2-3d-unet"], RESOURCES / "models")
    assert mixed.error.startswith("error: ensemble 'btcv-ct-3d-unet+chaos-mr-t2-3d-unet' mixes CT and MR models")


def test_mirroring_is_on_for_a_shipped_package_whose_card_has_mirror_axes(tmp_path):
    """A copy of the shipped CT models where the 3D one's card says it was trained mirrored."""
    folder = tmp_path / "models"
    for name in SHIPPED_PAIR:
        shutil.copytree(RESOURCES / "models" / name, folder / name)
    card = json.loads((folder / SHIPPED_PAIR[0] / "card.json").read_text())
    card["inference"]["tta_mirror_axes"] = ["y", "x"]
    (folder / SHIPPED_PAIR[0] / "card.json").write_text(json.dumps(card))
    index = {"default": SHIPPED_PAIR[0], "models": [{"name": n, "path": n} for n in SHIPPED_PAIR]}
    (folder / "catalog.json").write_text(json.dumps(index))
    mirrored = select(SHIPPED_PAIR[:1], folder)
    assert mirrored.error == "" and mirrored.tta_allowed and mirrored.tta_tip == TTA_TIP
    with_2d = select(SHIPPED_PAIR, folder)  # the 2D member was not trained mirrored: the ensemble may not mirror
    assert with_2d.error == "" and not with_2d.tta_allowed
    assert with_2d.tta_tip.startswith(f"Unavailable: model '{SHIPPED_PAIR[1]}' was not trained with mirroring")


def test_mirroring_reaches_the_engine_process(installed, scene, tmp_path):
    selection = select(["tiny-mirrored", "tiny-mirrored-b"])
    assert selection.tta_allowed and selection.error == ""
    ct = _phantom()
    _, mirrored = _panel_labels(scene, ct, selection.model, tta=True)
    assert np.array_equal(mirrored, _cli_labels(tmp_path, ct, selection.model, "--tta"))
    assert not np.array_equal(mirrored, _cli_labels(tmp_path, ct, selection.model))  # mirroring did change it
    with pytest.raises(AbdomenSegError, match="model 'tiny-a' was not trained with mirroring"):
        BackgroundRun(sl.AbdomenSegCore(scene), volume_node(scene, ct), ["tiny-a"], tta=True)
    # the panel's Quality "high" with no fine second stage installed: refused before any process starts
    with pytest.raises(AbdomenSegError, match="no fine second-stage model is installed for 'tiny-a'"):
        BackgroundRun(sl.AbdomenSegCore(scene), volume_node(scene, ct), ["tiny-a"], quality="high")


# -- the parameter node -------------------------------------------------------------------------------
def _parameter_fields() -> dict:
    """AbdomenSegParameterNode's fields as the module declares them: name -> (type, default), as source text."""
    tree = ast.parse((ROOT / "AbdomenSeg" / "AbdomenSeg.py").read_text(encoding="utf-8"))
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "AbdomenSegParameterNode"]
    return {
        item.target.id: (ast.unparse(item.annotation), item.value and ast.unparse(item.value))
        for item in node.body
        if isinstance(item, ast.AnnAssign)
    }


def test_the_choice_survives_a_saved_scene(installed, scene, tmp_path):
    fields = _parameter_fields()
    assert fields["model"] == ("str", "''") and fields["tta"] == ("bool", "False")
    assert fields["quality"] == ("Annotated[str, Choice(list(QUALITIES))]", "'standard'")
    selection = select(["tiny-mirrored", "tiny-mirrored-b"])
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    node.SetSingletonTag("AbdomenSeg")  # as ScriptedLoadableModuleLogic.getParameterNode makes it
    node.SetAttribute("ModuleName", "AbdomenSeg")
    # As parameterNodeWrapper writes a str and a bool (Slicer Base/Python/slicer/parameterNodeWrapper/serializers.py
    # StringSerializer.write, BoolSerializer.write at 583e9b37): the parameter named after the field.
    node.SetParameter("model", selection.model)
    node.SetParameter("tta", "True")
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    back = loaded.GetSingletonNode("AbdomenSeg", "vtkMRMLScriptedModuleNode")
    installed_cards = catalog()
    names = names_in(back.GetParameter("model"), installed_cards)
    assert names == ["tiny-mirrored", "tiny-mirrored-b"] and select(names) == selection
    assert back.GetParameter("tta") == "True" and select(names).tta_allowed  # the box stays ticked
    # A scene saved with one model reads back as that model; models no longer installed are left out, and with
    # none left the list shows the default.
    assert names_in("tiny-b", installed_cards) == ["tiny-b"]
    assert names_in("tiny-b+gone", installed_cards) == ["tiny-b"]
    assert names_in("gone", installed_cards) == [] and default_names(installed_cards) == ["tiny-a"]
    # and the panel says so, rather than quietly running fewer models than the scene asked for
    assert missing_note("tiny-b+gone", installed_cards, ["tiny-b"]) == (
        "The scene's model 'gone' is not installed here: tiny-b is checked instead."
    )
    assert missing_note("gone", installed_cards, ["tiny-a"]) == (
        "The scene's model 'gone' is not installed here: tiny-a is checked instead."
    )
    assert missing_note("gone", installed_cards, []).endswith("not installed here: check a model.")
    assert missing_note(selection.model, installed_cards, names) == "" and missing_note("", installed_cards, []) == ""


# -- the batch script ---------------------------------------------------------------------------------
def test_batch_script_takes_an_ensemble_and_refuses_a_bad_one_before_any_case(installed, scene, tmp_path):
    from AbdomenSegLib.slicer.batch import run
    from helpers import write_phantom_dataset

    images, _ = write_phantom_dataset(tmp_path)
    with pytest.raises(AbdomenSegError, match="mixes CT and MR models"):
        run(["--input", str(images), "--output", str(tmp_path / "bad"), "--model", "tiny-a+tiny-mr"], scene)
    with pytest.raises(AbdomenSegError, match="model 'tiny-a' was not trained with mirroring"):
        run(["--input", str(images), "--output", str(tmp_path / "bad"), "--model", "tiny-a", "--tta"], scene)
    with pytest.raises(AbdomenSegError, match="no fine second-stage model is installed for 'tiny-a'"):
        run(
            ["--input", str(images), "--output", str(tmp_path / "bad"), "--model", "tiny-a", "--quality", "high"], scene
        )
    assert not (tmp_path / "bad").exists()
    args = ["--input", str(images), "--output", str(tmp_path / "out"), "--device", "cpu", "--no-qc-png"]
    assert run(args + ["--model", "tiny-mirrored+tiny-mirrored-b", "--tta"], scene, log=lambda m: None) == 0
    rows = (tmp_path / "out" / "qc" / "qc.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and all(",tiny-mirrored+tiny-mirrored-b," in row for row in rows[1:])
