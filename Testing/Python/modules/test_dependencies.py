"""The dependency manager (``DeepSegReconCommon/Dependencies.py``): what each module installs inside 3D Slicer 5.10+
(Python 3.12) and how.

- every module's list is derived from requirements.lock / requirements-nodeps.txt and leaves out what Slicer ships
  or only development needs;
- the install runs in the right order with the right constraints (fake pip, fake PyTorchUtils: the calls it makes),
  and the Slicer-side function asks first, keeps one install at a time and shows one message on failure;
- every pin but torch resolves for Python 3.12 (``uv pip compile``), and every module's list installs from wheels on
  Linux, Windows and macOS arm64 (``uv pip install --dry-run --python-platform``); both need the package index and
  are skipped, saying why, without uv or the index. ``make check-platforms`` prints the per-platform table.
"""

import ast
import importlib.metadata
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
MODULES_DIR = ROOT / "DeepSegRecon"
sys.path.insert(0, str(MODULES_DIR))

import platform_check  # noqa: E402
from DeepSegReconCommon import Dependencies as D  # noqa: E402
from DeepSegReconCommon import SelfTest  # noqa: E402

MODULE_NAMES = sorted(p.name for p in MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file())


@pytest.fixture(scope="module")
def pins():
    return D.lockPins()


def _name(requirement):
    return requirement.split("==")[0]


# ------------------------------------------------------------------------------ lists derived from the lock
def test_the_lock_files_are_found_in_the_source_tree():
    assert Path(D.requirementFile("requirements.lock")) == ROOT / "requirements.lock"
    assert Path(D.requirementFile("requirements-nodeps.txt")) == ROOT / "requirements-nodeps.txt"


@pytest.mark.parametrize("selfTest", [False, True])
@pytest.mark.parametrize("module", MODULE_NAMES)
def test_every_module_list_is_derived_from_the_lock(module, selfTest, pins):
    lock, nodeps = pins
    normal, noDeps = D.requirements(module, selfTest)
    assert normal, module
    for requirement in normal:
        assert requirement == f"{_name(requirement)}=={lock[_name(requirement)]}", requirement
    for requirement in noDeps:
        assert requirement == f"{_name(requirement)}=={nodeps[_name(requirement)]}", requirement
    names = {_name(r) for r in normal + noDeps}
    assert not names & set(D.SLICER_SHIPPED), "Slicer's own packages are never installed"
    assert not names & set(D.DEVELOPMENT), "development packages are never installed"
    assert "torch" not in names and "slicer-core" not in names and "vtk" not in names and "pytest" not in names
    assert {"monai", "psutil", "slicerio"} <= names  # what every worker job imports


def test_diffdrr_goes_in_without_its_dependencies_but_with_what_it_imports(pins):
    normal, noDeps = D.requirements("RegisterXray")
    assert noDeps == [f"diffdrr=={pins[1]['diffdrr']}"]
    assert {_name(r) for r in normal} >= set(D.NODEPS_IMPORTS["diffdrr"])
    # the names are the block of requirements.in that pins what diffdrr really imports
    text = (ROOT / "requirements.in").read_text()
    block = text.split("# What diffdrr", 1)[1].split("\n#", 1)[0]
    assert sorted(D.normalize(m) for m in re.findall(r"^([A-Za-z0-9_.-]+)==", block, re.M)) == \
        sorted(D.NODEPS_IMPORTS["diffdrr"])
    assert set(pins[1]) == set(D.NODEPS_IMPORTS), "every --no-deps package says what it imports"


def test_a_module_without_diffdrr_gets_no_no_deps_install():
    assert D.requirements("SegmentTeeth")[1] == []
    assert D.requirements("SegmentSlices", selfTest=True)[1] == [f"diffdrr=={D.lockPins()[1]['diffdrr']}"]


def test_what_the_self_tests_import_is_in_their_lists():
    assert sorted(SelfTest.SELF_TEST_IMPORTS) == sorted(D.MODULE_PACKAGES) == sorted(D.SELF_TEST_PACKAGES) \
        == MODULE_NAMES
    for module, imports in SelfTest.SELF_TEST_IMPORTS.items():
        provided = {D.importName(n) for n in D.packageNames(module, selfTest=True)} | {"torch"}
        assert set(imports) <= provided, (module, set(imports) - provided)
        assert D.importName("scikit-image") == "skimage" and D.importName("pynrrd") == "nrrd"


def test_no_module_carries_its_own_version_pins():
    """One source of truth: no ``name==version`` string in the Slicer-side code."""
    files = [MODULES_DIR / m / f"{m}.py" for m in MODULE_NAMES]
    files += sorted((MODULES_DIR / "DeepSegReconCommon").glob("*.py"))
    for py in files:
        text = py.read_text(encoding="utf-8")
        assert not re.search(r"[\"'][A-Za-z0-9_.-]+==\d", text), f"{py.name} pins a version itself"
        assert "missingPackages" not in text and "PIP_REQUIREMENTS" not in text, py.name


def test_no_module_imports_another_and_every_start_button_installs_first():
    for module in MODULE_NAMES:
        py = MODULES_DIR / module / f"{module}.py"
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in set(MODULE_NAMES) - {module}, f"{module} imports {name}"
        text = py.read_text(encoding="utf-8")
        assert "self.ensureDependencies()" in text, f"{module} starts a job without installing its packages"
        assert 'self.parent.dependencies = ["Segmentations"]' in text or "self.parent.dependencies = []" in text
    section = (MODULES_DIR / "DeepSegReconCommon" / "FinetuneSection.py").read_text(encoding="utf-8")
    assert "Dependencies.ensureInstalled(self.moduleName" in section
    # the skeleton gives the section the panel's module name (whose packages "Fine-tune" installs)
    skeleton = (MODULES_DIR / "DeepSegReconCommon" / "TaskWidget.py").read_text(encoding="utf-8")
    assert "FinetuneSection(self.trainingLogic" in skeleton and "moduleName=self.moduleName" in skeleton
    for module in ("SegmentTeeth", "SegmentSlices", "SegmentBrainTumor"):
        assert "self.trainingLogic = self.logic.createTrainingLogic()" in (
            MODULES_DIR / module / f"{module}.py").read_text(encoding="utf-8")


def test_torch_minimum_covers_what_the_locked_packages_need(pins):
    """TORCH_MINIMUM is at least every ``torch>=`` that a locked package declares (read from this environment,
    installed from the same lock)."""
    bounds = {}
    for name, version in {**pins[0], **pins[1]}.items():
        try:
            if importlib.metadata.version(name) not in (version, version.split("+")[0]):
                continue
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.name == "torch" and not (req.marker and "extra" in str(req.marker)) and name not in pins[1]:
                bounds[name] = max((s.version for s in req.specifier if s.operator == ">="), key=D.versionTuple,
                                   default="0")
    assert "monai" in bounds, bounds
    assert all(D.versionTuple(D.TORCH_MINIMUM) >= D.versionTuple(v) for v in bounds.values()), bounds


def test_supported_slicer_versions():
    assert D.unsupportedReason((5, 10)) is None and D.unsupportedReason((5, 11, 0)) is None
    reason = D.unsupportedReason((5, 8))
    assert "5.10 or later" in reason and "Python 3.12" in reason and "5.8" in reason
    assert D.PYTHON_VERSION == (3, 12) == tuple(map(int, platform_check.PYTHON.split(".")))


# ----------------------------------------------------------------------------------- the plan and the install
def fake_installed(**versions):
    """``installed(name)`` of a Slicer with exactly ``versions`` (names normalized)."""
    table = {D.normalize(k): v for k, v in versions.items()}
    return lambda name: table.get(D.normalize(name))


SLICER = {"numpy": "2.2.6", "SimpleITK": "2.5.0", "vtk": "9.4.2", "pillow": "11.0.0", "requests": "2.32.0"}


def test_plan_in_a_fresh_slicer(pins):
    plan = D.Plan("RegisterXray", installed=fake_installed(**SLICER))
    assert plan.torch and plan.torchTooOld is None
    assert plan.missing[0] == "torch" and "diffdrr" in plan.missing and "monai" in plan.missing
    assert plan.packages == D.requirements("RegisterXray")[0] and plan.noDeps == D.requirements("RegisterXray")[1]
    c = dict(line.split("==") for line in plan.constraints)
    assert (c["numpy"], c["simpleitk"], c["vtk"]) == ("2.2.6", "2.5.0", "9.4.2"), "Slicer's own are kept"
    assert "torch" not in c
    assert c["scipy"] == pins[0]["scipy"] and c["typing-extensions"] == pins[0]["typing-extensions"]
    for name in ("pillow", "requests", "slicer-core", "pytest", "pyside6-essentials"):
        assert name not in c, name


def test_plan_keeps_an_installed_torch_and_installs_only_what_is_missing(pins):
    installed = fake_installed(**SLICER, torch="2.9.1+cu128", monai="1.6.1", scipy="1.14.0", psutil="7.0.0")
    plan = D.Plan("SegmentTeeth", installed=installed)
    assert not plan.torch and plan.torchTooOld is None
    assert "torch" not in plan.missing and "monai" not in plan.missing and "psutil" not in plan.missing
    assert plan.missing == ["scikit-image", "pynrrd", "slicerio", "highdicom"]
    c = dict(line.split("==") for line in plan.constraints)
    assert c["torch"] == "2.9.1+cu128", "pip never replaces the torch another extension installed"
    assert "scipy" not in c and "monai" not in c, "installed packages stay as they are"
    everything = D.Plan("SegmentTeeth", installed=lambda n: "99")
    assert everything.missing == [] and not everything.torch


def test_an_old_torch_is_reported(pins):
    plan = D.Plan("SegmentTeeth", installed=fake_installed(**SLICER, torch="2.5.1+cu121"))
    assert plan.torchTooOld == "2.5.1+cu121" and not plan.torch


class FakePip:
    """``slicer.util.pip_install`` stand-in: records each call with the constraints file's text at that moment, and
    installs into ``self.installed``."""

    def __init__(self, installed, fail=None):
        self.installed = installed
        self.calls = []
        self.fail = fail

    def __call__(self, args):
        constraints = Path(args[args.index("-c") + 1]).read_text() if "-c" in args else None
        self.calls.append((list(args), constraints))
        if self.fail and any(a.startswith(self.fail) for a in args):
            raise subprocess.CalledProcessError(1, ["pip", "install", *args])
        for a in args:
            m = re.match(r"^([A-Za-z0-9_.-]+)(==|>=)([^\s,]+)", a)
            if m:
                self.installed[D.normalize(m.group(1))] = m.group(3)


class FakeTorchUtils:
    def __init__(self, installed, result=True, error=None):
        self.installed, self.result, self.error, self.calls = installed, result, error, []

    def installTorch(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        if self.result:
            self.installed["torch"] = "2.13.0+cu128"
            return types.SimpleNamespace(__version__="2.13.0+cu128")
        return None


def test_install_through_pytorchutils_then_pip_with_constraints_then_no_deps(pins):
    table = {D.normalize(k): v for k, v in SLICER.items()}
    installed = table.get
    plan = D.Plan("RegisterXray", installed=installed)
    pip, torchUtils = FakePip(table), FakeTorchUtils(table)
    assert D.install(plan, pip, torchUtils, installed=installed) == "the PyTorch extension"
    assert torchUtils.calls == [{"askConfirmation": False, "torchVersionRequirement": f">={D.TORCH_MINIMUM}"}]
    (normal, constraints), (nodeps, none) = pip.calls
    assert normal[:-2] == plan.packages and normal[-2] == "-c"
    assert "numpy==2.2.6\n" in constraints and "simpleitk==2.5.0\n" in constraints and "vtk==9.4.2\n" in constraints
    assert "torch==2.13.0+cu128\n" in constraints, "the torch PyTorchUtils chose is kept"
    assert f"scipy=={pins[0]['scipy']}\n" in constraints
    assert nodeps == [f"diffdrr=={pins[1]['diffdrr']}", "--no-deps"] and none is None
    assert not Path(normal[-1]).exists(), "the temporary constraints file is removed"
    assert D.Plan("RegisterXray", installed=installed).missing == []


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
@pytest.mark.parametrize("torchUtils", ["absent", "fails", "returns None"])
def test_without_pytorchutils_torch_comes_from_pip_cpu(pins, platform, torchUtils):
    table = {D.normalize(k): v for k, v in SLICER.items()}
    plan = D.Plan("SegmentTeeth", installed=table.get)
    utils = {"absent": None, "fails": FakeTorchUtils(table, error=RuntimeError("no light-the-torch")),
             "returns None": FakeTorchUtils(table, result=False)}[torchUtils]
    pip = FakePip(table)
    logged = []
    assert D.install(plan, pip, utils, log=logged.append, installed=table.get, platform=platform) == \
        "pip (CPU build)"
    (torchArgs, torchConstraints), (normal, constraints) = pip.calls
    if platform == "darwin":
        assert torchArgs[0] == f"torch>={D.TORCH_MINIMUM}" and "--extra-index-url" not in torchArgs
    else:
        assert torchArgs[:3] == [f"torch=={pins[0]['torch']}", "--extra-index-url", D.PYTORCH_CPU_INDEX]
    assert "numpy==2.2.6\n" in torchConstraints and "torch==" not in torchConstraints
    assert f"torch=={table['torch']}\n" in constraints
    assert bool(logged) == (torchUtils != "absent")


def test_a_failing_pip_raises_and_leaves_no_file(pins):
    table = {D.normalize(k): v for k, v in SLICER.items()}
    plan = D.Plan("SegmentTeeth", installed=table.get)
    pip = FakePip(table, fail="monai")
    with pytest.raises(subprocess.CalledProcessError):
        D.install(plan, pip, FakeTorchUtils(table), installed=table.get)
    assert not Path(pip.calls[-1][0][-1]).exists()


# --------------------------------------------------------------------------- inside Slicer: dialogs, busy state
@pytest.fixture
def fake_slicer(monkeypatch):
    """The few Slicer calls ``ensureInstalled`` makes, recorded; the Slicer has numpy, SimpleITK and VTK only."""
    table = {D.normalize(k): v for k, v in SLICER.items()}
    record = types.SimpleNamespace(table=table, confirm=[], errors=[], answer=True, cursor=0, pip=FakePip(table),
                                   version=(5, 10))
    class App:
        majorVersion = property(lambda self: record.version[0])
        minorVersion = property(lambda self: record.version[1])

        def setOverrideCursor(self, cursor):
            record.cursor += 1

        def restoreOverrideCursor(self):
            record.cursor -= 1

    slicer = types.ModuleType("slicer")
    slicer.app = App()
    slicer.util = types.SimpleNamespace(
        confirmOkCancelDisplay=lambda text, **kw: record.confirm.append(text) or record.answer,
        errorDisplay=lambda text, **kw: record.errors.append(text),
        pip_install=lambda args: record.pip(args))
    qt = types.ModuleType("qt")
    qt.Qt = types.SimpleNamespace(WaitCursor=3)
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(
        PyTorchUtilsLogic=lambda: FakeTorchUtils(table)))
    monkeypatch.setattr(D, "installedVersion", lambda name: table.get(D.normalize(name)))
    return record


def test_ensure_installed_asks_installs_and_is_busy_meanwhile(fake_slicer):
    seen = []
    nested = []

    realPip = fake_slicer.pip

    def pip(args):  # a second click while pip runs starts nothing
        seen.append(D.installing())
        nested.append(D.ensureInstalled("SegmentTeeth", "Segment Teeth"))
        realPip(args)

    fake_slicer.pip = pip
    busy = []
    assert D.ensureInstalled("SegmentTeeth", "Segment Teeth", onBusyChange=lambda: busy.append(D.installing()))
    assert len(fake_slicer.confirm) == 1 and "torch" in fake_slicer.confirm[0] and "monai" in fake_slicer.confirm[0]
    assert "PyTorch extension" in fake_slicer.confirm[0] and "CUDA" in fake_slicer.confirm[0]
    assert seen == [True] and nested == [False] and busy == [True, False] and not D.installing()
    assert fake_slicer.cursor == 0 and fake_slicer.errors == []
    # installed now: the next start asks nothing
    assert D.ensureInstalled("SegmentTeeth", "Segment Teeth") and len(fake_slicer.confirm) == 1


def test_ensure_installed_cancelled_installs_nothing(fake_slicer):
    fake_slicer.answer = False
    assert not D.ensureInstalled("RegisterXray", "Register X-ray")
    assert fake_slicer.pip.calls == [] and fake_slicer.errors == [] and "diffdrr" in fake_slicer.confirm[0]


def test_ensure_installed_failure_shows_one_message(fake_slicer):
    fake_slicer.pip.fail = "monai"
    busy = []
    assert not D.ensureInstalled("SegmentBrainTumor", "Segment Brain Tumour", onBusyChange=lambda: busy.append(1))
    assert len(fake_slicer.errors) == 1 and "could not install" in fake_slicer.errors[0]
    assert "CalledProcessError" in fake_slicer.errors[0]
    assert not D.installing() and busy == [1, 1] and fake_slicer.cursor == 0


def test_ensure_installed_refuses_an_old_slicer_or_torch(fake_slicer):
    fake_slicer.version = (5, 8)
    assert not D.ensureInstalled("SegmentTeeth") and "5.10 or later" in fake_slicer.errors[-1]
    fake_slicer.version = (5, 10)
    fake_slicer.table["torch"] = "2.4.0"
    assert not D.ensureInstalled("SegmentTeeth") and "PyTorch 2.8 or later" in fake_slicer.errors[-1]
    assert fake_slicer.confirm == [] and fake_slicer.pip.calls == []


# --------------------------------------------------------------------------------- resolution (package index)
@pytest.fixture(scope="module")
def uv():
    found = platform_check.findUv()
    if found is None:
        pytest.skip("uv is not installed (pip install uv): the Python 3.12 resolution cannot be checked")
    return found


def _skip_if_offline(rc, out):
    if rc != 0 and platform_check.NETWORK_ERRORS.search(out):
        pytest.skip(f"the package index cannot be reached: {platform_check.NETWORK_ERRORS.search(out).group(0)}")


def test_every_pin_but_torch_resolves_for_python_312(uv, tmp_path, pins):
    """What Slicer 5.10 would get: the whole lock for Python 3.12, torch unpinned (PyTorchUtils chooses it)."""
    lines = [f"{name}=={version}" for name, version in sorted(pins[0].items()) if name != "torch"] + ["torch"]
    req = tmp_path / "lock-py312.in"
    req.write_text("\n".join(lines) + "\n")
    compile_ = ["pip", "compile", "--python-version", platform_check.PYTHON, "--no-header", "--no-annotate"]
    rc, out = platform_check.run(uv, [*compile_, str(req)])
    _skip_if_offline(rc, out)
    assert rc == 0, out[-3000:]
    resolved = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", out, re.M))
    for name, version in pins[0].items():
        if name != "torch":
            assert resolved[name] == version, name
    assert D.versionTuple(resolved["torch"]) >= D.versionTuple(D.TORCH_MINIMUM)
    rc, out = platform_check.run(uv, [*compile_, "--no-deps", str(ROOT / "requirements-nodeps.txt")])
    _skip_if_offline(rc, out)
    assert rc == 0, out[-3000:]
    assert dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", out, re.M)) == pins[1]


def test_every_module_installs_from_wheels_on_linux_windows_and_macos(uv):
    """The per-platform table of ``make check-platforms`` (about 15 s with a warm uv cache)."""
    lines = []
    results = platform_check.check(uv, log=lines.append)
    failed = [key for key, (ok, _) in results.items() if not ok]
    if failed:
        _skip_if_offline(1, "\n".join(str(results[k][1]) for k in failed))
    assert not failed, "\n".join(lines)
    assert len(results) == len(MODULE_NAMES) * len(platform_check.PLATFORMS)
    for (module, _), (_, packages) in results.items():
        assert {"torch", "monai", "numpy"} <= set(packages), module
        assert packages["numpy"] == D.lockPins()[0]["numpy"], "Slicer's numpy is never replaced"
        assert ("diffdrr" in packages) == (module == "RegisterXray")
