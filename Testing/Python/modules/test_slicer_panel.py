"""The panel skeleton every module shares (``DeepSegRecon/DeepSegReconCommon``), run outside Slicer on a real MRML
scene: the job controller driven by real worker jobs (start -> progress -> succeeded / failed / cancelled), the
weights import of the "Model weights" section (folder, zip, URL; refused imports leave the store as it was), the
overwrite question, and the parameter node's link to the widgets. The Qt parts (timer, labels, dialogs) are
stand-ins with the attributes the skeleton uses; everything below them is the real code."""

import functools
import hashlib
import http.server
import importlib.util
import os
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest
import slicer

from deepsegrecon import scene as sc
from deepsegrecon.errors import InputError, ModelError
from deepsegrecon.scene.logic import SegmentTeethLogic, TaskLogic, _for_slicer
from deepsegrecon.store import ModelStore
from DeepSegReconCommon import Parameters
from DeepSegReconCommon.Jobs import JobController, describeRun
from scene_testdata import oblique_grid, teeth_result
from test_scene_logic import PLUGIN  # the test-only "test_threshold_teeth" task (steps, dt, fail)

ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------------ stand-ins
class Timer:
    """The panel's QTimer: the controller only starts and stops it (the test calls tick() itself)."""

    active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def view():
    return types.SimpleNamespace(progressBar=types.SimpleNamespace(value=-1),
                                 etaLabel=types.SimpleNamespace(text="?"), statusLabel=types.SimpleNamespace(text=""))


@pytest.fixture
def panel(tmp_path):
    """A real scene with a volume, a scene logic running the test task, a job controller and a view."""
    plugin = tmp_path / "dsr_panel_test_tasks.py"
    plugin.write_text(PLUGIN)
    mrml = slicer.vtkMRMLScene()
    volume = sc.image_to_volume_node(mrml, oblique_grid(), "CBCT")
    logic = TaskLogic(mrml, "test_threshold_teeth", job_root=tmp_path / "jobs", plugins=[str(plugin)])
    errors = []
    jobs = JobController(Timer(), lambda text, title: errors.append((title, text)))
    yield types.SimpleNamespace(scene=mrml, volume=volume, logic=logic, jobs=jobs, errors=errors, view=view(),
                                plugin=plugin, jobs_dir=tmp_path / "jobs")
    logic.cancel()
    mrml.Clear(1)


def drive(jobs, views, until=None, timeout=60):
    """Tick like the panel's timer until no job runs (or ``until()``); the (state, %, ETA, status) seen."""
    seen = []
    end = time.monotonic() + timeout
    while jobs.running() and time.monotonic() < end and not (until and until()):
        jobs.tick()
        seen.append([(jobs.states.get(name), v.progressBar.value, v.etaLabel.text, v.statusLabel.text)
                     for name, v in views.items()])
        time.sleep(0.05)
    return seen


# ------------------------------------------------------------------------------------------ job controller
def test_a_run_goes_from_start_through_progress_to_done(panel):
    """Two jobs (the module's run and a second one, as the fine-tune section's) on one timer; progress %, ETA and
    status line while they run; the result imported into the scene; the timer stops when both are over."""
    p = panel
    second = TaskLogic(p.scene, "test_threshold_teeth", job_root=p.jobs_dir, plugins=[str(p.plugin)])
    other_view, ended, results = view(), [], []
    p.logic.start({"image": p.volume}, {"steps": 5, "dt": 0.3})
    p.jobs.started("run", p.logic, p.view, "Segment Teeth", "Starting the segmentation worker...",
                   onSucceeded=lambda status: results.append(status) or f"Done: {len(p.logic.output_nodes)} node",
                   onEnded=lambda: ended.append("run"))
    second.start({"image": p.volume}, {"steps": 1})
    p.jobs.started("finetune", second, other_view, "Fine-tuning", "Starting...", onEnded=lambda: ended.append("ft"))
    assert p.jobs.timer.active and p.jobs.running("run") and p.jobs.states["run"] == "running"
    assert (p.view.progressBar.value, p.view.etaLabel.text, p.view.statusLabel.text) == (
        0, "", "Starting the segmentation worker...")
    assert p.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

    seen = [row[0] for row in drive(p.jobs, {"run": p.view, "finetune": other_view})]
    running = [s for s in seen if s[0] == "running"]
    assert any(text.startswith("segmenting: step ") for _, _, _, text in running), running
    assert any(eta.endswith(" s left") for _, _, eta, _ in running), running
    percents = [pct for _, pct, _, _ in running]
    # rising while running (a slow poll may first see the last step at 100 % before the job's state turns final)
    assert percents == sorted(percents) and min(percents) < 100 and max(percents) > 0
    assert p.jobs.states == {"run": "succeeded", "finetune": "succeeded"} and not p.jobs.running()
    assert not p.jobs.timer.active and sorted(ended) == ["ft", "run"] and p.errors == []
    assert (p.view.progressBar.value, p.view.etaLabel.text, p.view.statusLabel.text) == (100, "", "Done: 1 node")
    assert other_view.statusLabel.text == "Done." and results[0]["state"] == "succeeded"
    (seg,) = p.logic.output_nodes
    assert seg.GetScene() is p.scene and p.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert list(p.jobs_dir.iterdir()) == []


def test_a_failed_run_shows_the_error_once_and_adds_nothing(panel):
    p = panel
    nodes = p.scene.GetNumberOfNodes()
    p.logic.start({"image": p.volume}, {"steps": 3, "fail": True})
    p.jobs.started("run", p.logic, p.view, "Segment Teeth", "Starting...")
    drive(p.jobs, {"run": p.view})
    assert p.jobs.states["run"] == "failed" and not p.jobs.timer.active
    assert p.view.statusLabel.text.startswith("Failed: ") and "no teeth found" in p.view.statusLabel.text
    assert p.view.progressBar.value == 0
    assert len(p.errors) == 1 and p.errors[0][0] == "Segment Teeth"
    assert p.errors[0][1].startswith("Segment Teeth failed.\n\n") and "no teeth found" in p.errors[0][1]
    assert p.scene.GetNumberOfNodes() == nodes


def test_cancel_then_the_next_tick_shows_it(panel):
    """The Cancel button's one Logic call stops the worker; the controller's next tick ends the job."""
    p = panel
    nodes = p.scene.GetNumberOfNodes()
    p.logic.start({"image": p.volume}, {"steps": 200, "dt": 0.05})
    p.jobs.started("run", p.logic, p.view, "Segment Teeth", "Starting...")
    drive(p.jobs, {"run": p.view}, until=lambda: p.view.statusLabel.text.startswith("segmenting"))
    assert p.jobs.states["run"] == "running"
    pid = p.logic._handle.pid
    p.logic.cancel()  # the button
    p.jobs.tick()
    assert p.jobs.states["run"] == "cancelled" and not p.jobs.running() and not p.jobs.timer.active
    assert p.view.statusLabel.text == "Cancelled; the scene was left unchanged." and p.view.progressBar.value == 0
    assert p.errors == [] and p.scene.GetNumberOfNodes() == nodes and _gone(pid)
    assert list(p.jobs_dir.iterdir()) == []


def test_scene_close_cancels_every_job(panel):
    p = panel
    p.logic.start({"image": p.volume}, {"steps": 200, "dt": 0.05})
    p.jobs.started("run", p.logic, p.view, "Segment Teeth", "Starting...")
    p.jobs.tick()
    p.jobs.cancelAll("the scene was closed")
    assert not p.logic.running and not p.jobs.running() and not p.jobs.timer.active
    assert p.jobs.states["run"] == "cancelled" and p.view.statusLabel.text == "Cancelled: the scene was closed."
    assert list(p.jobs_dir.iterdir()) == []



def test_a_batch_is_a_job_of_the_panel(tmp_path):
    """The Batch section's job: ``BatchLogic.start`` (its Run button) runs ``deepsegrecon batch`` in a background
    process that the panel's controller polls to the end (cases counted, batch.csv written); Cancel stops a slow one,
    keeping the finished cases."""
    from deepsegrecon import batch
    from deepsegrecon.batch_job import BatchLogic
    from test_batch import make_cases

    plugin = str(Path(__file__).resolve().parents[1] / "batch_testtask.py")
    make_cases(tmp_path / "in", 3, broken=1)
    errors = []
    jobs = JobController(Timer(), lambda text, title: errors.append(text))
    logic = BatchLogic("batch-test-threshold", job_root=tmp_path / "jobs", plugins=[plugin])
    assert logic.poll() == {"state": "idle"}
    with pytest.raises(InputError, match="output folder"):
        logic.start(str(tmp_path / "in"), "")
    out = tmp_path / "out"
    v = view()
    logic.start(str(tmp_path / "in"), str(out), {"threshold": 0.4})
    jobs.started("batch", logic, v, "Segment Teeth batch", "Starting the batch...",
                 describe=lambda status: status["message"], onSucceeded=lambda status: f"Finished: {status['message']}")
    seen = drive(jobs, {"batch": v}, timeout=120)
    assert jobs.states["batch"] == "succeeded" and not jobs.timer.active and errors == [], seen
    assert v.progressBar.value == 100
    assert v.statusLabel.text == "Finished: 3/3 cases: 2 done, 0 skipped, 1 failed"
    assert {r["case"]: r["status"] for r in batch.read_csv(out)} == {
        "study00_scan": "done", "study01_scan": "failed", "study02_scan": "done"}

    slow = BatchLogic("batch-test-slow", job_root=tmp_path / "jobs", plugins=[plugin])
    slow.start(str(tmp_path / "in"), str(tmp_path / "out slow"), {"seconds": 2.0})
    jobs.started("batch", slow, v, "Segment Teeth batch", "Starting...", describe=lambda status: status["message"])
    drive(jobs, {"batch": v}, until=lambda: "study00_scan" in v.statusLabel.text, timeout=60)
    assert jobs.states["batch"] == "running" and 0 <= v.progressBar.value < 100, v.statusLabel.text
    assert v.statusLabel.text.startswith("0/3 cases: 0 done") and v.statusLabel.text.endswith("; study00_scan")
    slow.cancel()  # the Cancel button
    jobs.tick()
    assert jobs.states["batch"] == "cancelled" and v.statusLabel.text == "Cancelled; the scene was left unchanged."
    assert slow.job.process.poll() == 4 and errors == []
    with pytest.raises(InputError, match="input folder"):
        slow.start("", str(out))

def test_a_poll_that_raises_or_a_job_cancelled_elsewhere_ends_the_job():
    errors = []
    jobs = JobController(Timer(), lambda text, title: errors.append(text))

    class Broken:
        def poll(self):
            raise OSError("the job folder is gone")

    class Idle:
        def poll(self):
            return {"state": "idle"}

    a, b = view(), view()
    jobs.started("run", Broken(), a, "Register X-ray", "Starting...")
    jobs.started("finetune", Idle(), b, "Fine-tuning", "Starting...", cancelledText="Fine-tuning cancelled.")
    jobs.tick()
    assert jobs.states == {"run": "failed", "finetune": "cancelled"} and not jobs.timer.active
    assert a.statusLabel.text == "Failed: OSError: the job folder is gone" and len(errors) == 1
    assert b.statusLabel.text == "Fine-tuning cancelled."
    assert describeRun({"stage": "segmenting", "message": ""}) == "segmenting"
    assert describeRun({}) == "Running..."


# ------------------------------------------------------------------------------------------ weights import
@pytest.fixture
def store_home(tmp_path, monkeypatch):
    """An empty user store ($DEEPSEGRECON_HOME) and an empty built-in store; version folders to import from."""
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not really torch weights, but checksummed")
    source = ModelStore(root=tmp_path / "elsewhere", builtin_root=tmp_path / "none")
    for task, version in (("teeth", "v7"), ("teeth", "v8"), ("teeth", "v9"), ("brain-tumor", "b1")):
        source.write_version(task, version, {"weights.pt": weights}, manifest={"description": f"{task} {version}"})
    return tmp_path


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{folder.name}/{f.name}")
    return path


def _store_files(home: Path) -> dict:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def test_import_weights_from_a_folder_and_a_zip(store_home):
    mrml = slicer.vtkMRMLScene()
    logic = SegmentTeethLogic(mrml)
    assert logic.model_versions() == []
    entry = logic.import_model(store_home / "elsewhere" / "teeth" / "v7")
    assert (entry.task, entry.version) == ("teeth", "v7")
    assert entry.dir == store_home / "home" / "models" / "teeth" / "v7"
    assert logic.model_versions() == ["v7"]  # what the panel's model list shows after the import

    archive = _zip(store_home / "elsewhere" / "teeth" / "v8", store_home / "teeth-v8.zip")
    entry = logic.import_model(str(archive), sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), default=True)
    assert entry.version == "v8" and entry.manifest["default"] is True
    assert logic.model_versions() == ["v8", "v7"] and ModelStore().get("teeth").version == "v8"

    # without "default", an import never changes which version unpinned runs use
    logic.import_model(_zip(store_home / "elsewhere" / "teeth" / "v9", store_home / "teeth-v9.zip"))
    assert logic.model_versions() == ["v8", "v7", "v9"] and ModelStore().get("teeth").version == "v8"
    mrml.Clear(1)


def test_refused_imports_leave_the_store_as_it_was(store_home):
    logic = SegmentTeethLogic(slicer.vtkMRMLScene())
    logic.import_model(store_home / "elsewhere" / "teeth" / "v7")
    home = store_home / "home"
    before = _store_files(home)

    good = _zip(store_home / "elsewhere" / "teeth" / "v8", store_home / "good.zip").read_bytes()
    truncated = store_home / "truncated.zip"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="not a readable model archive"):
        logic.import_model(truncated)
    garbage = store_home / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 but nothing else")
    with pytest.raises(ModelError):
        logic.import_model(garbage)
    with pytest.raises(ModelError, match="brain-tumor"):  # weights of another module
        logic.import_model(_zip(store_home / "elsewhere" / "brain-tumor" / "b1", store_home / "brain.zip"))
    with pytest.raises(ModelError, match="checksum mismatch"):
        logic.import_model(store_home / "good.zip", sha256="0" * 64)
    with pytest.raises(ModelError, match="already installed"):
        logic.import_model(store_home / "elsewhere" / "teeth" / "v7")
    with pytest.raises(InputError, match="choose a model folder"):
        logic.import_model("  ")
    with pytest.raises(InputError, match="does not exist"):
        logic.import_model(store_home / "no such folder")
    with pytest.raises(InputError, match="sha256"):
        logic.import_model("https://example.invalid/model.zip")
    assert _store_files(home) == before and logic.model_versions() == ["v7"]
    assert not [p for p in (home / "models" / "teeth").iterdir() if p.name.startswith(".")]


def test_import_weights_from_a_url(store_home, monkeypatch):
    """A download from a local HTTP server: checked against its sha256, then installed; a wrong sum installs
    nothing."""
    served = store_home / "served"
    served.mkdir()
    archive = _zip(store_home / "elsewhere" / "teeth" / "v8", served / "teeth-v8.zip")
    for name in ("no_proxy", "NO_PROXY"):  # never through a proxy the environment may name
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "log_message", lambda *a: None)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/teeth-v8.zip"
        logic = SegmentTeethLogic(slicer.vtkMRMLScene())
        with pytest.raises(ModelError, match="checksum"):
            logic.import_model(url, sha256="f" * 64)
        assert logic.model_versions() == []
        entry = logic.import_model(url, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
        assert entry.version == "v8" and logic.model_versions() == ["v8"]
    finally:
        server.shutdown()
        server.server_close()


def test_slicer_users_are_pointed_at_the_import_button(store_home):
    """No message on the Slicer side tells users to run the command line; the store's own advice is rewritten."""
    with pytest.raises(ModelError) as e:
        ModelStore().get("teeth")
    assert "deepsegrecon models import" in str(e.value)
    text = _for_slicer(str(e.value))
    assert "deepsegrecon" not in text.split("looked in")[0] and '"Import weights"' in text and '"Model weights"' in text
    assert text.startswith("no model for task 'teeth' is installed")
    slicer_side = [ROOT / "DeepSegRecon" / m / f"{m}.py" for m in
                   ("SegmentTeeth", "SegmentSlices", "SegmentBrainTumor", "ReconstructCBCT", "RegisterXray")]
    slicer_side += sorted((ROOT / "DeepSegRecon" / "DeepSegReconCommon").glob("*.py"))
    slicer_side += sorted((ROOT / "DeepSegRecon" / "deepsegrecon" / "scene").glob("*.py"))
    for py in slicer_side:
        text = py.read_text(encoding="utf-8")
        allowed = 1 if py.name == "logic.py" else 0  # the pattern _for_slicer replaces
        assert text.count("deepsegrecon models import") == allowed, py


# ------------------------------------------------------------------------------------------ overwriting
def test_only_a_segmentation_with_segments_needs_asking_before_it_is_overwritten():
    mrml = slicer.vtkMRMLScene()
    logic = SegmentTeethLogic(mrml)
    empty = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    volume = sc.image_to_volume_node(mrml, oblique_grid(), "CBCT")
    full = sc.result_to_segmentation_node(mrml, teeth_result(), reference_volume_node=volume, name="Teeth")
    assert logic.needs_overwrite_confirmation(None) is False  # the default: a new node
    assert logic.needs_overwrite_confirmation(empty) is False
    assert logic.needs_overwrite_confirmation(volume) is False
    assert logic.needs_overwrite_confirmation(full) is True
    full.GetSegmentation().RemoveAllSegments()
    assert logic.needs_overwrite_confirmation(full) is False
    mrml.Clear(1)


# ------------------------------------------------------------------------------------------ parameter node
class FakeWidget:
    """A Qt widget as PythonQt shows it: className(), connect(signal, slot) and its properties."""

    def __init__(self, class_name, **props):
        self._class, self._slots = class_name, []
        self.__dict__.update(props)

    def className(self):
        return self._class

    def connect(self, signal, slot):
        assert signal == Parameters.WIDGET_BINDINGS[self._class][0]
        self._slots.append(slot)

    def emit(self):
        for slot in self._slots:
            slot()

    # qMRMLNodeComboBox
    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node
        self.emit()  # as Qt does: a programmatic change signals too

    # QComboBox
    def findText(self, text):
        return self.items.index(text) if text in self.items else -1

    @property
    def currentText(self):
        return self.items[self.currentIndex]


def test_widget_binding_keeps_widgets_and_parameter_node_in_step():
    @Parameters.parameterNodeWrapper
    class Panel:
        inputVolume: slicer.vtkMRMLScalarVolumeNode
        device: str = "auto"
        smoothing: float = 0.5
        views: int = 10
        simulate: bool = True

    mrml = slicer.vtkMRMLScene()
    volume = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    node = mrml.AddNode(slicer.vtkMRMLScriptedModuleNode())
    widgets = {"inputVolume": FakeWidget("qMRMLNodeComboBox", node=None),
               "device": FakeWidget("QComboBox", items=["auto", "cpu", "cuda"], currentIndex=0),
               "smoothing": FakeWidget("ctkSliderWidget", value=0.0), "views": FakeWidget("QSpinBox", value=0),
               "simulate": FakeWidget("QRadioButton", checked=False)}
    changes = []
    binding = Parameters.WidgetBinding(widgets, onChange=lambda: changes.append(1))
    parameters = Panel(node)
    binding.setParameters(parameters)  # node -> widgets: the defaults
    assert (widgets["smoothing"].value, widgets["views"].value, widgets["simulate"].checked) == (0.5, 10, True)
    assert widgets["inputVolume"].node is None and parameters.smoothing == 0.5 and changes

    widgets["device"].currentIndex = 1  # the user's choice -> the node, with every other widget's value
    widgets["device"].emit()
    assert parameters.device == "cpu" and node.GetParameter("device") == "cpu"
    widgets["inputVolume"].setCurrentNode(volume)
    assert parameters.inputVolume is volume and node.GetNodeReferenceID("inputVolume") == volume.GetID()

    node.SetParameter("views", "24")  # the node changes (scene load, another panel) -> the widgets
    node.SetParameter("device", "no such device")  # a value the list lacks leaves the list as it is
    assert widgets["views"].value == 24 and widgets["device"].currentText == "cpu"
    binding.setParameters(None)  # exit(): no longer follows the node
    node.SetParameter("views", "3")
    assert widgets["views"].value == 24
    mrml.Clear(1)


def test_slicers_wrapper_is_used_where_slicer_has_it(monkeypatch):
    """Inside Slicer, ``slicer.parameterNodeWrapper`` exists and is the one the modules get."""
    fake = types.ModuleType("slicer.parameterNodeWrapper")
    fake.parameterNodeWrapper = lambda cls: cls
    monkeypatch.setitem(os.sys.modules, "slicer.parameterNodeWrapper", fake)
    spec = importlib.util.spec_from_file_location("Parameters_in_slicer", Parameters.__file__)
    inside = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inside)
    assert inside.WRAPPER == "slicer" and inside.parameterNodeWrapper is fake.parameterNodeWrapper
    assert Parameters.WRAPPER == "fallback"


def _gone(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False

