"""Static checks of the Slicer extension that Slicer's build would otherwise only catch at packaging time."""

import ast
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import ROOT

MODULE = ROOT / "AbdomenSeg" / "AbdomenSeg.py"


def test_cmake_lists_every_script():
    lib = (ROOT / "AbdomenSegLib" / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in (ROOT / "AbdomenSegLib").rglob("*.py"):
        assert (
            path.relative_to(ROOT / "AbdomenSegLib").as_posix() in lib
        ), f"{path.name} missing from AbdomenSegLib/CMakeLists.txt"
    module = (ROOT / "AbdomenSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in (ROOT / "AbdomenSeg").glob("*.py"):
        assert path.name.replace("AbdomenSeg", "${MODULE_NAME}") in module or path.name in module
    assert "WITH_GENERIC_TESTS" in module and "slicer_add_python_unittest" in module
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in (
        "find_package(Slicer REQUIRED)",
        'EXTENSION_DEPENDS "PyTorch"',
        "add_subdirectory(AbdomenSeg)",
        "add_subdirectory(AbdomenSegLib)",
        "Slicer_EXTENSION_CPACK",
    ):
        assert needle in top


def test_widget_uses_only_widgets_that_the_ui_defines():
    ui = ET.parse(ROOT / "Resources" / "UI" / "AbdomenSeg.ui")
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    assert used and used <= names, used - names
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "AbdomenSegParameterNode":
            fields = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, bound - fields


def test_module_imports_nothing_heavy_at_load():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module or "")
    heavy = {"torch", "monai", "segmentation_models_pytorch", "SimpleITK", "numpy"}
    # Of the engine, only its option values (standard library only, checked below) load with Slicer.
    assert not {m for m in top_level if m.split(".")[0] in heavy}
    assert {m for m in top_level if m.split(".")[0] == "AbdomenSegLib"} <= {"AbdomenSegLib.core.options"}
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, AbdomenSegLib.core.options; print(sorted(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert not [m for m in heavy | {"SimpleITK", "scipy", "AbdomenSegLib.core.organs"} if f"'{m}'" in loaded]
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"AbdomenSeg", "AbdomenSegWidget", "AbdomenSegLogic", "AbdomenSegTest"} <= classes
    compile(MODULE.read_text(encoding="utf-8"), str(MODULE), "exec")
    batch = ROOT / "Resources" / "Scripts" / "AbdomenSegBatch.py"
    compile(batch.read_text(encoding="utf-8"), batch.name, "exec")


def test_engine_imports_without_slicer_or_torch_at_import():
    import subprocess
    import sys

    code = (
        "import sys; import AbdomenSegLib, AbdomenSegLib.models.packages, AbdomenSegLib.cli, AbdomenSegLib.core.organs; "
        "assert 'torch' not in sys.modules and 'slicer' not in sys.modules, sorted(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _cmake_list(path, variable):
    """The entries of `set(<variable> ...)` in a CMakeLists.txt, ${MODULE_NAME} resolved."""
    text = path.read_text(encoding="utf-8")
    name = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    body = re.search(r"set\(" + variable + r"\s+(.*?)\)", text, re.S).group(1)
    return [item.replace("${MODULE_NAME}", name) for item in body.split() if not item.startswith("#")]


def _classes(path):
    return {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}


def test_every_file_slicer_scans_for_modules_defines_its_module_class():
    """Slicer instantiates every .py of an installed qt-scripted-modules/ folder, and of a folder added to
    the module paths, as a module whose class is named like the file (Slicer v5.10.0
    Base/QTCore/qSlicerAbstractModuleFactoryManager.cxx:279 lists `QDir::Files`, not recursive;
    qSlicerScriptedLoadableModuleFactory.cxx:196 takes .py files). One file without its class logs
    "modules failed to be instantiated" at every start and fails every CTest under --testing."""
    module_dir = ROOT / "AbdomenSeg"
    installed = _cmake_list(module_dir / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    assert installed, "no module scripts listed"
    for name in installed:  # what lands in qt-scripted-modules/ itself
        assert name.endswith(".py") and Path(name).stem in _classes(module_dir / name), name
    for path in module_dir.glob("*.py"):  # the source folder the README says to add to the module paths
        assert path.stem in _classes(path), f"{path.name} would fail to load as a module"
    # The engine and the resources (the batch script included) go to sub-folders, which Slicer does not scan.
    engine = (ROOT / "AbdomenSegLib" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_SUBDIR" in engine and "../Resources/*" in engine
    assert (ROOT / "Resources" / "Scripts" / "AbdomenSegBatch.py").is_file()
    assert not (module_dir / "AbdomenSegBatch.py").exists()


def test_shared_option_values_match_the_engine():
    """The one list of each option value (options.py) agrees with what the engine can do."""
    from AbdomenSegLib.core import options
    from AbdomenSegLib.core.organs import CONVENTION_MAX_VALUE, CONVENTIONS

    assert options.REFERENCE_CONVENTIONS[0] == options.FROM_COLOR_NAMES
    assert set(options.LABEL_CONVENTIONS) == set(CONVENTION_MAX_VALUE) == set(CONVENTIONS)
    text = MODULE.read_text(encoding="utf-8")
    assert "Choice(list(REFERENCE_CONVENTIONS))" in text and "Choice(list(DEVICES))" in text


def test_panel_inputs_and_buttons_are_guarded():
    """Defects only the real app showed: labelmaps and vector volumes offered as input, negative tolerances,
    buttons enabled without inputs, the organ list empty until the model changed, print() for logging."""
    ui = ET.parse(ROOT / "Resources" / "UI" / "AbdomenSeg.ui")
    selector = next(w for w in ui.iter("widget") if w.get("name") == "inputVolumeSelector")
    props = {p.get("name"): p for p in selector.iter("property")}
    assert props["showChildNodeTypes"].find("bool").text == "false"
    source = MODULE.read_text(encoding="utf-8")
    assert re.search(r"tolerance: Annotated\[float, WithinRange\(0\.1, ", source)
    assert (
        "def _checkCanApply" in source and "applyButton.enabled" in source and "compareModelsButton.enabled" in source
    )
    setup = source[source.index("def setup(self)") : source.index("def _fillModels")]
    assert setup.index('segmentModelsListWidget.connect("itemChanged(QListWidgetItem*)"') < setup.index(
        "self._fillModels()"
    )
    # The filled list checks the default model and acts on it (organ list, mirroring box) at once.
    fill = source[source.index("def _fillModels") : source.index("def _modelItems")]
    assert fill.rstrip().endswith("self._checkModels(default_names(self._cards))")
    assert "self._onModelsChecked()" in source[source.index("def _checkModels") : source.index("def _onModelsChecked")]
    assert "print(" not in source and "_cancelRequested" not in source
    assert (ROOT / "Resources" / "Icons" / "AbdomenSeg.png").is_file() and "checkout_icon" in source


def test_extension_is_publishable():
    """Licence, the weights' terms, metadata pointing at real files, and an ExtensionsIndex entry."""
    import json

    assert "Permission is hereby granted" in (ROOT / "LICENSE.txt").read_text(encoding="utf-8")
    terms = (ROOT / "Resources" / "models" / "TERMS.md").read_text(encoding="utf-8")
    catalog = json.loads((ROOT / "Resources" / "models" / "catalog.json").read_text(encoding="utf-8"))
    assert all(entry["name"] in terms for entry in catalog["models"])
    assert "research use only" in terms and "CC BY-SA 4.0" in terms
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    shots = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', top).group(1).split()
    for url in shots + [re.search(r'EXTENSION_ICONURL "([^"]+)"', top).group(1)]:
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url  # the URL names a file this repository has
    assert all(url.endswith("AbdomenSeg-result.png") for url in shots)  # a picture of a result, not the icon
    # Slicer's catalog entry schema v1.0.2 (Slicer @583e9b3 Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json):
    # required $schema, category, scm_url; additionalProperties false.
    entry = json.loads((ROOT / "AbdomenSeg.json").read_text(encoding="utf-8"))
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "dicom_support_rule",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and 'EXTENSION_DEPENDS "PyTorch"' in top
    assert re.search(r'href=.*\{url\}.*documentation</a>', MODULE.read_text(encoding="utf-8"))  # help links the docs


@pytest.mark.slow
def test_the_wheel_installs_the_command_and_its_models(tmp_path):
    """`pip install .` gives the `abdomenseg` command, and the installed engine finds the shipped models in its
    own package data (not through a checkout beside it)."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:  # a clean copy: what a user clones
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("abdomenseg-*.whl")
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=600)
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    command = [sys.executable, str(target / "bin" / "abdomenseg")]
    listing = subprocess.run(
        command + ["models", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert listing.returncode == 0, listing.stderr
    assert {"btcv-ct-3d-unet", "btcv-ct-2d-unet-r18", "chaos-mr-t2-3d-unet"} <= set(json.loads(listing.stdout))
    found = subprocess.run(
        [sys.executable, "-c", "import AbdomenSegLib.models.packages as m; print(m.MODELS_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert Path(found.stdout.strip()) == target / "AbdomenSegLib" / "resources" / "models"
    samples = target / "AbdomenSegLib" / "resources" / "Samples"  # the quick start's scan, with its licence
    assert all((samples / n).is_file() for n in ("example_ct.nii.gz", "LICENSE", "NOTICE", "README.md"))
    helped = subprocess.run(command + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert helped.stdout.startswith("usage: abdomenseg")
    ct, out = tmp_path / "ct.nii.gz", tmp_path / "organs.nii.gz"
    assert subprocess.run(command + ["phantom", str(ct)], cwd=tmp_path, env=env, timeout=300).returncode == 0
    segmented = subprocess.run(
        command + ["segment", str(ct), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert segmented.returncode in (0, 3), segmented.stderr
    assert out.is_file()


def _packaged_resources():
    """The files AbdomenSegLib/CMakeLists.txt packages under Resources/ by default (its glob minus its filter)."""
    lib = (ROOT / "AbdomenSegLib" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'option\(ABDOMENSEG_PACKAGE_WEIGHTS "[^"]*" OFF\)', lib)
    (pattern,) = re.findall(
        r'if\(NOT ABDOMENSEG_PACKAGE_WEIGHTS\)\s*list\(FILTER MODULE_PYTHON_RESOURCES EXCLUDE REGEX "([^"]+)"\)', lib
    )
    files = [p for p in (ROOT / "Resources").rglob("*") if p.is_file()]
    return [p for p in files if not re.search(pattern, "../" + p.relative_to(ROOT).as_posix())]


def test_the_extension_package_leaves_the_weights_out_but_keeps_the_catalog():
    packaged = _packaged_resources()
    names = {p.relative_to(ROOT).as_posix() for p in packaged}
    assert {"Resources/models/catalog.json", "Resources/models/TERMS.md", "Resources/UI/AbdomenSeg.ui"} <= names
    assert not any(n.endswith(".safetensors") or n.endswith("card.json") for n in names)
    assert sum(p.stat().st_size for p in packaged) < 5 * 2**20  # was ~135 MB in every Extensions Manager package
    # Every model the packaged catalog lists can be fetched (AbdomenSegLib/model_store.py).
    catalog = json.loads((ROOT / "Resources" / "models" / "catalog.json").read_text(encoding="utf-8"))
    assert all(
        e["download"]["url"].startswith("https://") and len(e["download"]["sha256"]) == 64 for e in catalog["models"]
    )


def test_a_weights_free_checkout_passes_the_extensions_index_size_check():
    """ExtensionsIndex scripts/check_description_files.py:463-481 @ 07f1d1b sums every file of the cloned repository
    (its .git included) against 100 MB. The model folders are what exceeds it: the branch or repository the index
    entry names must hold the tree without them (docs/slicer.md, "Publishing")."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    sizes = {n: (ROOT / n).stat().st_size for n in tracked if (ROOT / n).is_file()}
    weights = sum(s for n, s in sizes.items() if re.match(r"Resources/models/[^/]+/", n))
    assert weights > 100 * 2**20  # the development tree keeps its weights (tests, CI): too big for the index
    assert (sum(sizes.values()) - weights) < 20 * 2**20  # without them, room to spare for its .git history


def test_no_question_and_no_install_behind_a_wait_cursor():
    """Issue 30: the install's confirmation dialog and the minutes of pip ran inside
    `tryWithErrorDisplay(..., waitCursor=True)` (Base/Python/slicer/util.py: tryWithErrorDisplay sets the override
    cursor for the whole block). Questions and installs must sit outside every such block."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    asked_or_installed = {
        "confirmOkCancelDisplay",
        "confirmYesNoDisplay",
        "ensureDependencies",
        "_whenReady",
        "_acceptTerms",
        "_offerModel",
        "start",
        "install",
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.With):
            continue
        waits = any(
            isinstance(item.context_expr, ast.Call)
            and any(
                k.arg == "waitCursor" and getattr(k.value, "value", False) is True for k in item.context_expr.keywords
            )
            for item in node.items
        )
        if waits:
            for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                if isinstance(inner, ast.Call):
                    name = getattr(inner.func, "attr", getattr(inner.func, "id", ""))
                    if name in asked_or_installed:
                        found.append(f"line {inner.lineno}: {name}")
    assert found == []
    source = MODULE.read_text(encoding="utf-8")
    assert "self._installTimer.start()" in source  # pip is polled, not waited for
