"""Installing AbdomenSeg's Python packages inside Slicer, with a fake `slicer` (and PyTorchUtils) that records calls.

The fakes copy the real signatures, read in Slicer's source (github.com/Slicer/Slicer) and SlicerPyTorch:
- slicer.util.pip_install(requirements): str -> shlex.split, list -> as is (Base/Python/slicer/util.py:3851-3886
  @ v5.6.2, :3991-4033 @ v5.10.0).
- slicer.packaging (Slicer >= 5.12 only): load_requirements(path) (packaging.py:42 @ v5.12.0, :40 @ HEAD) and
  pip_ensure(...) below (:329 @ v5.12.0, :327 @ HEAD).
- PyTorchUtils.PyTorchUtilsLogic.installTorch (fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py:194).
"""

import shlex
import shutil
import sys
import tempfile
import types

import pytest

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.slicer import install

WINDOWS_REQUIREMENTS = (
    r"C:\Users\me\AppData\Local\slicer.org\Slicer 5.6.2\slicer.org\Extensions-32438"
    r"\AbdomenSeg\lib\Slicer-5.6\qt-scripted-modules\Resources\requirements-slicer.txt"
)
WINDOWS_CONSTRAINTS = r"C:\Users\me\AppData\Local\Temp\tmpab12-constraints.txt"

# Versions that meet the requirements on the running Python (the validated ones from Python 3.10 on).
GOOD = {
    "torch": "2.14.1",
    "torchvision": "0.29.1",
    "monai": "1.6.1",
    "segmentation-models-pytorch": "0.6.0",
    "nibabel": "5.4.2",
    "scikit-image": "0.26.0",
    "safetensors": "0.8.0",
    "tqdm": "4.70.1",
}
if sys.version_info < (3, 10):
    GOOD.update({"torch": "2.8.0", "torchvision": "0.23.0", "monai": "1.5.2", "segmentation-models-pytorch": "0.5.0"})
PY312 = {"python_version": "3.12", "python_full_version": "3.12.10"}  # Slicer 5.10 (CMakeLists.txt:210 @ v5.10.0)
PY39 = {"python_version": "3.9", "python_full_version": "3.9.10"}  # Slicer 5.6 (CMakeLists.txt:216 @ v5.6.2)


# -- requirement file ------------------------------------------------------------------------------------------------
def test_requirements_never_list_what_slicer_ships():
    names = {n.lower() for n in install.requirement_names()}
    assert names and not names & {n.lower() for n in install.SLICER_BUNDLED}


def test_requirement_lines_parse_like_slicer_packaging_load_requirements():
    # load_requirements (packaging.py:60-69 @ HEAD) feeds every whole non-comment line to Requirement(): a comment
    # after a requirement would raise InvalidRequirement inside Slicer 5.12.
    from packaging.requirements import Requirement

    for line in install.REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            assert "#" not in line
            Requirement(line)


@pytest.mark.parametrize(
    "environment,monai,smp",
    [
        (PY312, "==1.6.1", "==0.6.0"),  # the versions the models were validated with (requirements.txt)
        (PY39, "==1.5.2", "==0.5.0"),  # newest on PyPI for Python 3.9 (monai 1.6 and smp 0.6 require Python >= 3.10)
    ],
)
def test_model_packages_are_pinned_per_python(environment, monai, smp):
    reqs = {r.name: str(r.specifier) for r in install.applicable_requirements(environment=environment)}
    assert reqs["monai"] == monai and reqs["segmentation-models-pytorch"] == smp
    names = [r.name for r in install.applicable_requirements(environment=environment)]
    assert len(names) == len(set(names))  # one line per package applies on each Python


def test_torch_requirement_follows_the_python_slicer_ships():
    assert install.torch_requirement((3, 9)) == ">=2.4.1"  # monai 1.5.2: torch>=2.4.1; torch 2.8.0 is the last for 3.9
    assert install.torch_requirement((3, 12)) == ">=2.8"  # monai 1.6.1: torch>=2.8.0
    assert install.TORCH_REQUIREMENT == install.torch_requirement(sys.version_info[:2])


# -- what is missing or too old ------------------------------------------------------------------------------------
def test_nothing_missing_here():
    assert install.missing_packages() == []  # this test environment has the validated versions


def test_missing_packages_reports_torch_first():
    versions = dict(GOOD, torch=None, monai=None)
    assert install.missing_packages(version_of=versions.get) == ["torch", "monai"]


def test_an_installed_but_old_torch_or_package_counts_and_says_which_versions():
    versions = dict(GOOD, torch="2.1.0", monai="1.3.0", nibabel="4.0.2")
    problems = install.dependency_problems(version_of=versions.get, environment=PY312, torch_specifier=">=2.8")
    assert [str(p) for p in problems] == [
        "torch (installed 2.1.0, needs torch>=2.8)",
        "monai (installed 1.3.0, needs monai==1.6.1)",
        "nibabel (installed 4.0.2, needs nibabel>=5.0)",
    ]
    assert str(install.Problem("monai", "==1.6.1")) == "monai (not installed; needs monai==1.6.1)"


@pytest.mark.parametrize(
    "installed,ok",
    [
        ("2.8.0+cpu", True),
        ("2.14.1+cu130", True),
        ("2.9.0a0+git1234", True),
        ("2.7.1+cu118", False),
        ("junk", False),
    ],
)
def test_torch_builds_compare_by_their_version(installed, ok):
    assert (install.check("torch", ">=2.8", {"torch": installed}.get) is None) == ok


def test_confirm_message_says_what_and_how_big():
    only_packages = install.confirm_message([install.Problem("monai", "==1.6.1")])
    assert "monai (not installed; needs monai==1.6.1)" in only_packages and "about 30 MB" in only_packages
    assert "PyTorch" not in only_packages
    with_torch = install.confirm_message([install.Problem("torch", ">=2.8", "2.1.0")])
    assert "about 4 GB" in with_torch and "CPU" in with_torch and "restart" in with_torch


def test_constraints_pin_installed_bundled_packages():
    import numpy

    text = open(install.constraints_file()).read()
    assert f"numpy=={numpy.__version__}" in text and "torch==" in text and "scipy==" in text


# -- installing inside Slicer (fake slicer) --------------------------------------------------------------------------
class FakeVersions(dict):
    def version_of(self, name):
        return self.get(name)


@pytest.fixture
def slicer_install(monkeypatch, tmp_path):
    """REQUIREMENTS in a folder named like Slicer's install folder (space), temp files in a folder with a space."""
    folder = tmp_path / "Slicer 5.6.2" / "qt-scripted-modules" / "Resources"
    folder.mkdir(parents=True)
    requirements = folder / "requirements-slicer.txt"
    shutil.copy(install.REQUIREMENTS, requirements)
    temp = tmp_path / "Local Temp"
    temp.mkdir()
    monkeypatch.setattr(install, "REQUIREMENTS", requirements)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    versions = FakeVersions(GOOD)
    monkeypatch.setattr(install, "installed_version", versions.version_of, raising=False)
    calls = []
    slicer = types.ModuleType("slicer")  # a plain module: `import slicer.packaging` fails as in Slicer <= 5.10

    def pip_install(requirements):  # Slicer 5.6.2 util.py:3851
        calls.append(("pip_install", requirements))
        versions.update(GOOD)

    slicer.util = types.SimpleNamespace(pip_install=pip_install)
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    return types.SimpleNamespace(requirements=requirements, versions=versions, calls=calls, slicer=slicer, temp=temp)


def test_old_string_form_breaks_windows_paths():
    # What `pip_install(f"-r {REQUIREMENTS} -c {constraints}")` did in Slicer 5.6-5.10 (util.py:3881 @ v5.6.2):
    args = shlex.split(f"-r {WINDOWS_REQUIREMENTS} -c {WINDOWS_CONSTRAINTS}")
    assert args[:3] == [
        "-r",
        "C:UsersmeAppDataLocalslicer.orgSlicer",
        "5.6.2slicer.orgExtensions-32438AbdomenSeglib" "Slicer-5.6qt-scripted-modulesResourcesrequirements-slicer.txt",
    ]
    assert args[-1] == "C:UsersmeAppDataLocalTemptmpab12-constraints.txt"


def test_windows_paths_reach_pip_intact(slicer_install):
    install.install_requirements(WINDOWS_CONSTRAINTS, path=WINDOWS_REQUIREMENTS)
    ((kind, args),) = slicer_install.calls
    assert kind == "pip_install" and type(args) is list  # util.py:3882 tests `type(requirements) == list`
    assert args == ["-r", WINDOWS_REQUIREMENTS, "-c", WINDOWS_CONSTRAINTS]


def test_ensure_dependencies_passes_a_list_with_paths_intact(slicer_install):
    slicer_install.versions.update(monai=None)
    asked = []
    assert install.ensure_dependencies(confirm=lambda message: asked.append(message) or True, log=lambda m: None)
    assert "monai (not installed; needs monai==" in asked[0]
    ((kind, args),) = slicer_install.calls
    assert kind == "pip_install" and type(args) is list and len(args) == 4
    assert args[:2] == ["-r", str(slicer_install.requirements)] and "Slicer 5.6.2" in args[1]
    assert args[2] == "-c" and args[3].startswith(str(slicer_install.temp)) and " " in args[3]
    assert open(args[3]).read().splitlines() == [f"torch=={GOOD['torch']}", f"torchvision=={GOOD['torchvision']}"]


def test_slicer_packaging_is_used_when_present(slicer_install, monkeypatch):
    packaging = types.ModuleType("slicer.packaging")
    loaded = object()

    def load_requirements(path):  # packaging.py:40 @ HEAD
        slicer_install.calls.append(("load_requirements", path))
        return loaded

    def pip_ensure(
        requirements,
        constraints=None,
        skip_packages=None,
        prompt_install=True,
        prompt_restart=True,
        requester=None,
        skip_in_testing=True,
        show_progress=True,
    ):  # packaging.py:327-336 @ HEAD
        slicer_install.calls.append(
            ("pip_ensure", requirements, constraints, prompt_install, prompt_restart, requester, skip_in_testing)
        )
        slicer_install.versions.update(GOOD)

    packaging.load_requirements, packaging.pip_ensure = load_requirements, pip_ensure
    slicer_install.slicer.packaging = packaging
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    slicer_install.versions.update(monai="1.3.0")
    monkeypatch.delitem(sys.modules, "monai", raising=False)  # not loaded yet: no restart needed
    assert install.ensure_dependencies(confirm=lambda message: True, log=lambda m: None)
    (load, ensure) = slicer_install.calls
    assert load == ("load_requirements", str(slicer_install.requirements))
    assert ensure[1] is loaded and ensure[2].startswith(str(slicer_install.temp))
    assert ensure[3:] == (False, False, "AbdomenSeg", False)  # we asked already; our consent stands in testing


def test_old_torch_is_upgraded_through_pytorchutils(slicer_install, monkeypatch):
    import torch  # noqa: F401  (loaded, as in a Slicer session that used it)

    calls = []

    class PyTorchUtilsLogic:
        def installTorch(
            self,
            askConfirmation=False,
            forceComputationBackend=None,
            torchVersionRequirement=None,
            torchvisionVersionRequirement=None,
        ):  # PyTorchUtils.py:194
            calls.append((askConfirmation, torchVersionRequirement))
            slicer_install.versions.update(torch=GOOD["torch"], torchvision=GOOD["torchvision"])
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    slicer_install.versions.update(torch="2.1.0")
    asked = []
    with pytest.raises(AbdomenSegError, match="restart Slicer"):  # the old torch is still imported
        install.ensure_dependencies(confirm=lambda message: asked.append(message) or True)
    assert f"torch (installed 2.1.0, needs torch{install.TORCH_REQUIREMENT})" in asked[0]
    assert calls == [(False, install.TORCH_REQUIREMENT)]
    assert slicer_install.calls == []  # the other packages were fine: no pip run


def test_refusal_or_batch_lists_what_is_missing(slicer_install):
    slicer_install.versions.update(torch="2.1.0", tqdm=None)
    with pytest.raises(AbdomenSegError, match=r"torch \(installed 2.1.0, needs torch>=.*tqdm \(not installed"):
        install.ensure_dependencies(confirm=None)
    with pytest.raises(AbdomenSegError, match="allow the installation"):
        install.ensure_dependencies(confirm=lambda message: False)
    assert slicer_install.calls == []


def test_still_missing_after_pip_is_an_error(slicer_install, monkeypatch):
    slicer_install.versions.update(nibabel=None)
    monkeypatch.setattr(slicer_install.slicer.util, "pip_install", lambda requirements: None)  # pip "succeeded"
    with pytest.raises(AbdomenSegError, match="still missing or too old after installation: nibabel"):
        install.ensure_dependencies(confirm=lambda message: True)


def test_a_failing_pip_is_a_clear_error(slicer_install, monkeypatch):
    import subprocess

    def pip_install(requirements):  # logProcessOutput raises this on a non-zero exit (util.py:3814 @ v5.6.2)
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *requirements])

    monkeypatch.setattr(slicer_install.slicer.util, "pip_install", pip_install)
    slicer_install.versions.update(tqdm=None)
    with pytest.raises(AbdomenSegError, match="pip could not install tqdm"):
        install.ensure_dependencies(confirm=lambda message: True)
