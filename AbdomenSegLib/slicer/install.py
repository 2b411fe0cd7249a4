"""Python dependencies inside 3D Slicer: what is missing or too old, and installing it with the user's consent.

Lean: the shipped models need torch alone (their networks are the pure-torch unet3d.py / unet2d.py) plus the small
packages of Resources/requirements-slicer.txt, all with lower bounds only; monai or segmentation-models-pytorch are
added only for an installed model package whose architecture those builders cannot build. torch comes from Slicer's
PyTorch extension (PyTorchUtils picks the right CUDA/CPU build), at the newest version the platform has: on an
Intel-architecture macOS Python (Intel Macs, Rosetta) that is 2.2.x, with numpy < 2. pip is constrained so it never
replaces what Slicer ships (SimpleITK, numpy, scipy, ...) or the torch PyTorchUtils installed.

A torch already imported in Slicer's process is never replaced: the user is asked to restart first (on Windows its
DLLs are locked). SlicerTotalSegmentator never upgrades an installed torch either: it refuses an old one and points
to the PyTorch Utils module (TotalSegmentator/TotalSegmentator.py:880-887 @ 6a82370). The pip step runs in a child process the panel polls (`Installation`), so Slicer 5.6-5.10, whose
slicer.util.pip_install blocks until pip ends, stay responsive; Slicer >= 5.12's pip_ensure shows its own progress.

Facts this relies on, read in Slicer's source (github.com/Slicer/Slicer) and SlicerPyTorch (fepegar/SlicerPyTorch):
- slicer.util.pip_install(str) splits the string with shlex.split in Slicer 5.6-5.10 (Base/Python/slicer/util.py
  :3881 @ v5.6.2, :4028 @ v5.10.0): POSIX rules, so Windows backslashes vanish and a path with a space becomes two
  arguments. A list is passed to pip untouched (:3882-3883 @ v5.6.2, :4029-4030 @ v5.10.0; it must be a `list`:
  `type(requirements) == list`, a tuple raises ValueError) and reaches the PythonSlicer process as one argv item
  each (_executePythonModule, :3846 @ v5.6.2, :3986 @ v5.10.0).
- slicer.packaging exists from Slicer 5.12 (Base/Python/slicer/packaging.py, absent at v5.10.0):
  load_requirements(path) (:42 @ v5.12.0, :40 @ HEAD) and pip_ensure(requirements, constraints=None,
  skip_packages=None, prompt_install=True, prompt_restart=True, requester=None, skip_in_testing=True,
  show_progress=True) (:329 @ v5.12.0, :327 @ HEAD). It evaluates markers and compares installed versions
  (pip_check, :195-212 @ HEAD) and installs only what fails, as a list (no shlex).
- `packaging` ships with Slicer's Python since 5.6 (SuperBuild/External_python-pythonqt-requirements.cmake:35:
  packaging==23.2 @ v5.6.2, 25.0 @ v5.10.0), so versions are compared with it here, as Slicer's pip_check does.
- PyTorchUtilsLogic().installTorch(askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
  torchvisionVersionRequirement=None) (PyTorchUtils/PyTorchUtils.py:194) runs light-the-torch with
  "torch" + torchVersionRequirement and "torchvision" (:235-240), returns the torch module, or None only when its own
  confirmation is declined (:207-214). It has no version check of its own (torchInstalled() at :158 only checks that
  torch is there); SlicerTotalSegmentator compares torch's version itself (TotalSegmentator.py:882-887).
"""

from __future__ import annotations

import importlib.metadata
import queue
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.models.packages import RESOURCES

REQUIREMENTS = RESOURCES / "requirements-slicer.txt"
# Slicer ships these (SuperBuild/External_python-*.cmake, e.g. numpy==1.26.1 scipy==1.11.3 Pillow==10.1.0
# packaging==23.2 requests==2.31.0 @ v5.6.2; SimpleITK and VTK are built by Slicer) or the PyTorch extension installs
# them: pip must never replace them (a restart at best, a broken Slicer at worst), so they are pinned to what is
# installed (constraints_file) and never listed in REQUIREMENTS. The one exception is numpy on an Intel-architecture
# macOS (numpy_requirement), left out of the pins when it must change.
SLICER_BUNDLED = ("SimpleITK", "numpy", "scipy", "pillow", "packaging", "requests", "vtk", "torch", "torchvision")
TORCH_PACKAGES = ("torch",)  # installed through PyTorchUtils, never by pip -r REQUIREMENTS
REQUESTER = "AbdomenSeg"

# Needed only by a model package whose architecture the pure-torch builders (unet3d.py, unet2d.py) cannot build
# (networks.build_network); lower bounds only, never `==` in Slicer's shared Python. None of the shipped models needs
# them (Testing/test_install.py checks every shipped card).
ARCHITECTURE_PACKAGES = {
    "UNet": "monai>=1.3",
    "SegResNet": "monai>=1.3",
    "DynUNet": "monai>=1.3",
    "Unet": "segmentation-models-pytorch>=0.3.3",
    "UnetPlusPlus": "segmentation-models-pytorch>=0.3.3",
}

# What one installation downloads (pip download of the resolved wheels, Linux x86_64, Python 3.12, Slicer's own
# packages and torch excluded): nibabel, scikit-image (+ imageio, tifffile, networkx, lazy-loader), safetensors, tqdm.
PACKAGES_DOWNLOAD = "about 20 MB"
# torch through the PyTorch extension, wheel sizes on PyPI: CPU builds 74-241 MB (torch 2.8.0 / 2.14.1 for Windows
# and macOS arm64); a CUDA build on Linux is torch + NVIDIA libraries + triton: 3.9 GB (2.8.0) to 4.1 GB (2.9.1).
TORCH_DOWNLOAD = (
    "about 75-250 MB for a CPU-only build, several GB (about 4 GB on Linux) " "for an NVIDIA GPU (CUDA) build"
)
# The oldest torch the engine is shown to run the shipped models on: torch 2.2.2 with numpy 1.26 gives the labels
# torch 2.14.1 gives (docs/slicer.md, "torch 2.2"). 2.2.x is the last torch published for macOS x86_64.
TORCH_MINIMUM = "2.2"


def intel_mac(system: str | None = None, machine: str | None = None) -> bool:
    """True where Slicer's Python runs as x86_64 on macOS (an Intel Mac, or Apple silicon under Rosetta 2:
    platform.machine() names the process's architecture). PyTorch published no macOS x86_64 wheel after 2.2.2, and
    2.2 was built against numpy 1.x: SlicerTotalSegmentator installs numpy<2 on macOS (TotalSegmentator.py:902-908 @
    6a82370) and SlicerNNUnet special-cases Rosetta (SlicerNNUNetLib/InstallLogic.py:68-69 @ d05d772)."""
    import platform

    system = sys.platform if system is None else system
    machine = platform.machine() if machine is None else machine
    return system == "darwin" and machine.lower() in ("x86_64", "amd64", "i386")


def torch_requirement(system: str | None = None, machine: str | None = None) -> str:
    """The torch versions to install (PyTorchUtils' torchVersionRequirement): any from TORCH_MINIMUM on, on every
    Python Slicer ships (3.9 in 5.6/5.8, 3.12 from 5.10; 2.2 has wheels for both), the newest the platform has;
    on an Intel-architecture macOS Python exactly the 2.2 series, the newest published there."""
    return f">={TORCH_MINIMUM},<2.3" if intel_mac(system, machine) else f">={TORCH_MINIMUM}"


def numpy_requirement(system: str | None = None, machine: str | None = None) -> str:
    """ "<2" where torch 2.2 is the newest torch (its numpy bridge needs numpy 1.x), else "" (numpy as Slicer ships
    it: 1.26 in 5.6/5.8, 2.0.2 in 5.10, 2.4.6 in 5.12, SuperBuild/External_python-numpy.cmake)."""
    return "<2" if intel_mac(system, machine) else ""


TORCH_REQUIREMENT = torch_requirement()


def torchvision_requirement(system: str | None = None, machine: str | None = None) -> str | None:
    """What PyTorchUtils is told for torchvision, which it always installs with torch (PyTorchUtils.py:235-240 @
    e1c85cc; AbdomenSeg does not use it): the release that goes with torch 2.2 on an Intel-architecture macOS, so
    pip does not have to backtrack through newer ones built for torch it cannot have; else None (light-the-torch's
    choice)."""
    return "<0.18" if intel_mac(system, machine) else None


def architecture_requirements(cards) -> list:
    """Extra requirements (e.g. "monai>=1.3") the given model cards need, each once: only for an architecture the
    pure-torch builders cannot build. An ensemble card counts through its members."""
    from AbdomenSegLib.models import unet2d, unet3d

    pure = {"UNet": unet3d.supports, "Unet": unet2d.supports}
    found = []
    for card in cards:
        for one in getattr(card, "members", ()) or (card,):
            architecture = one.get("architecture") or {}
            name = str(architecture.get("class"))
            if name in pure and pure[name](architecture.get("args", {})):
                continue
            requirement = ARCHITECTURE_PACKAGES.get(name)
            if requirement and requirement not in found:
                found.append(requirement)
    return found


@dataclass(frozen=True)
class Problem:
    """A requirement the installed packages do not meet."""

    name: str
    needs: str  # the version specifier, e.g. ">=1.3" or ">=2.2" ("" = any version)
    installed: str | None = None  # None: not installed

    def __str__(self) -> str:
        needs = f"needs {self.name}{self.needs}" if self.needs else "needed"
        if self.installed is None:
            return f"{self.name} (not installed; {needs})"
        return f"{self.name} (installed {self.installed}, {needs})"

    @property
    def requirement(self) -> str:
        return f"{self.name}{self.needs}"


def _requirement(line: str):
    from packaging.requirements import Requirement

    return Requirement(line)


def requirement_lines(path=None) -> list:
    """Every requirement line of the file (comments, blank lines and pip options dropped), as written."""
    lines = []
    for line in Path(REQUIREMENTS if path is None else path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_names(path=None) -> list:
    """Distribution names in the file, each once, whatever Python the markers select."""
    names = []
    for line in requirement_lines(path):
        name = _requirement(line).name
        if name not in names:
            names.append(name)
    return names


def applicable_requirements(path=None, environment=None) -> list:
    """The file's requirements whose markers hold here (or in `environment`, a dict of marker variables)."""
    reqs = [_requirement(line) for line in requirement_lines(path)]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(environment)]


def installed_version(name: str):
    """The installed distribution's version, or None. Reads metadata only: importing torch could lock its files."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(name: str, specifier: str = "", version_of=None):
    """A Problem when `name` is missing or its installed version is outside `specifier`, else None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = (version_of or installed_version)(name)
    if installed is None:
        return Problem(name, specifier)
    try:
        # prereleases=True: a torch "2.9.0a0+git..." someone built is as new as its number says
        ok = SpecifierSet(specifier).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        ok = False
    return None if ok else Problem(name, specifier, installed)


def dependency_problems(
    path=None, version_of=None, environment=None, torch_specifier=None, cards=(), numpy_specifier=None
) -> list:
    """What is missing or too old, torch first (`version_of(name) -> str | None` for tests); `cards`: the model cards
    to run, whose architectures may need monai or segmentation-models-pytorch (architecture_requirements)."""
    version_of = version_of or installed_version
    torch_specifier = TORCH_REQUIREMENT if torch_specifier is None else torch_specifier
    numpy_specifier = numpy_requirement() if numpy_specifier is None else numpy_specifier
    found = [check("torch", torch_specifier, version_of)]
    if numpy_specifier:
        found.append(check("numpy", numpy_specifier, version_of))
    for req in applicable_requirements(path, environment) + [_requirement(r) for r in architecture_requirements(cards)]:
        found.append(check(req.name, str(req.specifier), version_of))
    return [p for p in found if p is not None]


def missing_packages(path=None, version_of=None, environment=None) -> list:
    """Names (torch first) of the packages that are not installed or too old; [] when all is well."""
    return [p.name for p in dependency_problems(path, version_of, environment)]


def confirm_message(problems) -> str:
    """What the user is asked before anything is downloaded: which packages, why, and how much."""
    lines = ["AbdomenSeg needs these Python packages, missing or too old in Slicer's Python:"]
    lines += [f"  - {p}" for p in problems]
    sizes = []
    if any(p.name in TORCH_PACKAGES for p in problems):
        sizes.append(f"PyTorch, installed by the PyTorch extension: {TORCH_DOWNLOAD}")
    if any(p.name not in TORCH_PACKAGES for p in problems):
        sizes.append(f"the other packages and what they depend on: {PACKAGES_DOWNLOAD}")
    lines.append("Download: " + "; ".join(sizes) + ".")
    if any(p.installed for p in problems):
        lines.append("Packages that were already loaded need a restart of Slicer to take effect.")
    lines.append("Install them now?")
    return "\n".join(lines)


def constraints_file(leave_out=()) -> str:
    """Pin what is installed of Slicer's own packages (and torch) so pip keeps them; `leave_out`: names that must
    change (numpy on an Intel-architecture macOS). The caller deletes the file (Installation.finish)."""
    pins = []
    for name in SLICER_BUNDLED:
        version = installed_version(name)
        if version is not None and name not in leave_out:
            pins.append(f"{name}=={version}")
    handle = tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False)
    handle.write("\n".join(pins) + "\n")
    handle.close()
    return handle.name


def _slicer_packaging():
    """slicer.packaging (Slicer >= 5.12) or None. Only the import is guarded, never the calls."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging


def pip_arguments(constraints: str, path=None, extra=()) -> list:
    """`pip install` arguments, one list item each (Windows backslashes and spaces survive: no shlex)."""
    return ["-r", str(REQUIREMENTS if path is None else path), *extra, "-c", str(constraints)]


def install_requirements(constraints: str, path=None, extra=()) -> None:
    """pip-install the requirement file inside Slicer and wait (scripts); the panel uses `Installation`."""
    run = start_requirements(constraints, path, extra)
    if run is not None:
        run.wait()


def start_requirements(constraints: str, path=None, extra=()):
    """Start pip for the requirement file (+ `extra` requirement strings). Slicer >= 5.12: slicer.packaging.pip_ensure
    (its own progress dialog), done on return (None). Slicer 5.6-5.10: pip in a child process (PipRun), not waited
    for: their slicer.util.pip_install blocks until pip ends (util.py:3851-3878 @ v5.6.2, :3991-4036 @ v5.10.0)."""
    path = REQUIREMENTS if path is None else path
    packaging = _slicer_packaging()
    if packaging is not None:
        # We asked already (with sizes), so no second dialog; we check for a needed restart ourselves; our consent
        # stands in testing mode too (pip_ensure would otherwise skip silently and leave the packages missing).
        packaging.pip_ensure(
            packaging.load_requirements(str(path)) + [_requirement(r) for r in extra],
            constraints=str(constraints),
            prompt_install=False,
            prompt_restart=False,
            requester=REQUESTER,
            skip_in_testing=False,
        )
        return None
    return PipRun.in_slicer(pip_arguments(constraints, path, extra))


class PipRun:
    """`python -m pip install ...` in a child process, its output read on a thread: `poll()` never blocks.

    In Slicer the process is started as slicer.util.pip_install starts it (_executePythonModule: PythonSlicer found on
    PATH, launchConsoleProcess(useStartupEnvironment=False): util.py:3957-3988 @ v5.10.0), minus the blocking
    logProcessOutput loop (:3922-3954)."""

    def __init__(self, process, log: LogCallback = print):
        self.process, self.log = process, log
        self.lines: queue.Queue = queue.Queue()
        self.output: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def in_slicer(cls, pip_args: list, log: LogCallback = print) -> PipRun:
        import shutil

        import slicer

        python = shutil.which("PythonSlicer") or sys.executable
        return cls(slicer.util.launchConsoleProcess([python, "-m", "pip", "install", *pip_args], False), log)

    def _read(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.put(line.rstrip())
        self.process.stdout.close()

    def poll(self) -> int | None:
        """Log the output so far; None while pip runs, else its exit code (all output logged)."""
        code = self.process.poll()
        if code is not None:
            self._reader.join()
        while not self.lines.empty():
            line = self.lines.get()
            self.output.append(line)
            self.log(line)
        return code

    @property
    def last_line(self) -> str:
        return self.output[-1] if self.output else ""

    def wait(self, interval: float = 0.1) -> None:
        """Block until pip ends; a non-zero exit raises CalledProcessError, as slicer.util.pip_install does."""
        import subprocess

        while (code := self.poll()) is None:
            time.sleep(interval)
        if code != 0:
            raise subprocess.CalledProcessError(code, self.process.args)


def install_torch(requirement: str | None = None) -> None:
    """torch through the PyTorch extension (it picks the CUDA or CPU build; it also installs torchvision)."""
    try:
        import PyTorchUtils
    except ImportError:
        raise AbdomenSegError(
            "the PyTorch extension is not installed",
            "install 'PyTorch' from the Extensions Manager, restart Slicer, and try again",
        ) from None
    requirement = TORCH_REQUIREMENT if requirement is None else requirement
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False,
            torchVersionRequirement=requirement,
            torchvisionVersionRequirement=torchvision_requirement(),
        )
    except Exception as exc:  # light-the-torch/pip failed: CalledProcessError, network errors
        raise AbdomenSegError(
            f"PyTorch could not be installed ({exc})",
            "see the Python console; or install it from the PyTorch Utils module "
            f"with version requirement {requirement}",
        ) from None
    if torch is None:
        raise AbdomenSegError("PyTorch was not installed", "install it from the PyTorch Utils module")


_IMPORT_NAMES = {"segmentation-models-pytorch": "segmentation_models_pytorch", "scikit-image": "skimage"}


def _loaded(problems) -> list:
    """Packages about to be replaced while an older version is already imported in this process."""
    return [
        p.name for p in problems if p.installed and _IMPORT_NAMES.get(p.name, p.name.replace("-", "_")) in sys.modules
    ]


class Installation:
    """One installation, in steps the panel can spread over timer ticks: `problems` (what is missing), the user's
    consent (the caller asks, with confirm_message), `start()`, `poll()` until True, `finish()`."""

    def __init__(self, cards=(), log: LogCallback = print):
        self.cards, self.log = tuple(cards), log
        self.problems = dependency_problems(cards=self.cards)
        self.pip: PipRun | None = None
        self._constraints: str | None = None
        self._loaded: list = []

    def start(self) -> None:
        """Refuse to touch a loaded torch; install torch (PyTorchUtils), then start pip for the rest."""
        torch = next((p for p in self.problems if p.name == "torch"), None)
        if torch is not None and torch.installed and "torch" in sys.modules:
            raise AbdomenSegError(
                f"PyTorch {torch.installed} is loaded in Slicer and must be replaced by torch{torch.needs}; "
                "a loaded PyTorch cannot be replaced safely (on Windows its files are locked)",
                "restart Slicer and run AbdomenSeg before any other module uses PyTorch, or install "
                f"torch{torch.needs} from the PyTorch Utils module right after a restart",
            )
        self._loaded = _loaded(self.problems)
        if torch is not None:
            self.log("Installing PyTorch through the PyTorch extension (this can take several minutes)...")
            install_torch(torch.needs)
        rest = [p for p in dependency_problems(cards=self.cards) if p.name not in TORCH_PACKAGES]
        if not rest:
            return
        extra = [p.requirement for p in rest if p.name == "numpy"] + architecture_requirements(self.cards)
        self._constraints = constraints_file(leave_out=[p.name for p in rest])  # after torch: the new torch is kept
        self._names = ", ".join(p.name for p in rest)
        try:
            self.pip = start_requirements(self._constraints, extra=extra)
        except Exception as exc:  # CalledProcessError from pip_ensure (Slicer >= 5.12)
            self._remove_constraints()
            raise self._pip_error(exc) from None

    def _pip_error(self, exc) -> AbdomenSegError:
        return AbdomenSegError(
            f"pip could not install {self._names} ({exc})",
            "see the Python console for pip's message; check the network connection",
        )

    def poll(self) -> bool:
        """True once pip is done (at once without a pip step); a failed pip raises AbdomenSegError."""
        if self.pip is None:
            return True
        code = self.pip.poll()
        if code is None:
            return False
        if code != 0:
            self._remove_constraints()
            raise self._pip_error(f"exit code {code}")
        return True

    def _remove_constraints(self) -> None:
        if self._constraints is not None:
            Path(self._constraints).unlink(missing_ok=True)
            self._constraints = None

    def finish(self) -> bool:
        """Check the result: True when everything is installed at a fitting version and nothing old stays loaded."""
        self._remove_constraints()
        importlib.invalidate_caches()
        still = dependency_problems(cards=self.cards)
        if still:
            raise AbdomenSegError(
                f"still missing or too old after installation: {'; '.join(str(p) for p in still)}",
                "restart Slicer; if it persists, see the Python console for pip's message",
            )
        if self._loaded:
            raise AbdomenSegError(
                f"updated {', '.join(self._loaded)}, but the old version is still loaded",
                "restart Slicer to use the new version",
            )
        self.log("AbdomenSeg dependencies installed.")
        return True

    def refuse(self) -> AbdomenSegError:
        """The error for a declined (or impossible to ask) installation."""
        return AbdomenSegError(
            f"Python packages missing or too old: {'; '.join(str(p) for p in self.problems)}",
            "allow the installation when asked, or install them from the Python console",
        )


def ensure_dependencies(confirm=None, log: LogCallback = print, cards=None) -> bool:
    """Install what is missing or too old inside Slicer and wait for it (scripts, batch). `confirm(message) -> bool`
    asks the user; None = refuse. `cards`: the models to run (None: every installed model).

    Returns True when everything needed is installed at a fitting version afterwards."""
    if cards is None:
        from AbdomenSegLib.models.packages import catalog

        cards = catalog().values()
    installation = Installation(cards, log)
    if not installation.problems:
        return True
    if confirm is None or not confirm(confirm_message(installation.problems)):
        raise installation.refuse()
    try:
        installation.start()
        while not installation.poll():
            time.sleep(0.1)
    finally:
        installation._remove_constraints()
    return installation.finish()
