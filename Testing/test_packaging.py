"""Static checks of the Slicer extension that Slicer's build would otherwise only catch at packaging time."""
import ast
import re
import xml.etree.ElementTree as ET

from conftest import ROOT

MODULE = ROOT / "AbdomenSeg" / "AbdomenSeg.py"


def test_cmake_lists_every_script():
    lib = (ROOT / "AbdomenSegLib" / "CMakeLists.txt").read_text()
    for path in (ROOT / "AbdomenSegLib").rglob("*.py"):
        assert path.relative_to(ROOT / "AbdomenSegLib").as_posix() in lib, f"{path.name} missing from AbdomenSegLib/CMakeLists.txt"
    module = (ROOT / "AbdomenSeg" / "CMakeLists.txt").read_text()
    for path in (ROOT / "AbdomenSeg").glob("*.py"):
        assert path.name.replace("AbdomenSeg", "${MODULE_NAME}") in module or path.name in module
    assert "WITH_GENERIC_TESTS" in module and "slicer_add_python_unittest" in module
    top = (ROOT / "CMakeLists.txt").read_text()
    for needle in ("find_package(Slicer REQUIRED)", 'EXTENSION_DEPENDS "PyTorch"', "add_subdirectory(AbdomenSeg)",
                   "add_subdirectory(AbdomenSegLib)", "Slicer_EXTENSION_CPACK"):
        assert needle in top


def test_widget_uses_only_widgets_that_the_ui_defines():
    ui = ET.parse(ROOT / "Resources" / "UI" / "AbdomenSeg.ui")
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used and used <= names, used - names
    tree = ast.parse(MODULE.read_text())
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "AbdomenSegParameterNode":
            fields = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, bound - fields


def test_module_imports_nothing_heavy_at_load():
    tree = ast.parse(MODULE.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert not top_level & {"torch", "monai", "segmentation_models_pytorch", "AbdomenSegLib"}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"AbdomenSeg", "AbdomenSegWidget", "AbdomenSegLogic", "AbdomenSegTest"} <= classes
    compile(MODULE.read_text(), str(MODULE), "exec")
    compile((ROOT / "AbdomenSeg" / "AbdomenSegBatch.py").read_text(), "AbdomenSegBatch.py", "exec")


def test_engine_imports_without_slicer_or_torch_at_import():
    import subprocess
    import sys
    code = ("import sys; import AbdomenSegLib, AbdomenSegLib.models, AbdomenSegLib.cli, AbdomenSegLib.organs; "
            "assert 'torch' not in sys.modules and 'slicer' not in sys.modules, sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
