"""Segment Teeth end to end with the shipped weights: accuracy on held-out phantoms, the task API,
progress and cancel, and refusal of wrong or damaged weights."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsegrecon.errors import Cancelled, ModelError
from deepsegrecon.store import ModelStore, entry_from_dir, sha256_file
from deepsegrecon.task import CancelToken, TaskContext
from deepsegrecon.teeth import labels as L
from deepsegrecon.teeth.evaluate import HELDOUT_SEEDS, score
from deepsegrecon.teeth.phantom import generate_teeth_phantom
from deepsegrecon.teeth.task import TeethTask, load_model, segment

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "Resources" / "Models" / "teeth" / "phantom-v4"  # the default
SOUP = ROOT / "Resources" / "Models" / "teeth" / "phantom-v2"  # the start of its line (v2 -> v3 -> v4), shipped
BASE = ROOT / "Resources" / "Models" / "teeth" / "phantom-v1"
SEED = 10001  # held out: never used for training
# The product bar is mean tooth Dice >= 0.90 and FDI accuracy >= 0.95 on held-out phantoms; `make bench`
# (teeth_heldout) reports where the shipped weights stand against it (phantom-v2: see the README, seeds
# 10000-10005). These floors guard this harder case (metal, two forced gaps) against regression: measured
# Dice 0.91, FDI 0.96 (phantom-v1: 0.88, 0.96).
FLOOR_DICE, FLOOR_FDI = 0.86, 0.90

pytestmark = pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="shipped teeth weights missing")


@pytest.fixture(scope="module")
def model():
    return load_model(entry_from_dir(SHIPPED))


@pytest.fixture(scope="module")
def run(model):
    """One held-out phantom (0.5 mm voxels, missing teeth forced, metal) through the registered task."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cbct, gt, info = generate_teeth_phantom(SEED, spacing=0.5, missing=[15, 42], metal=True)
    events = []
    ctx = TaskContext(device="cpu", progress=lambda stage, fraction=0.0, message="": events.append((stage, fraction)),
                      model_dir=SHIPPED)
    t = time.perf_counter()
    res = TeethTask().run({"image": cbct}, {"device": "cpu"}, ctx)
    seconds = time.perf_counter() - t
    torch.set_num_threads(threads)  # not left to the tests that follow (they assume one)
    return cbct, gt, info, res, events, seconds


def test_manifest_describes_the_weights():
    m = json.loads((SHIPPED / "manifest.json").read_text())
    assert m["task"] == "teeth" and m["version"] == "phantom-v4" and m["default"] is True
    assert m["base_version"] == "phantom-v3" and "real scans without teeth" in m["trained_on"]
    assert set(m["files"]) == {"stage1.pt", "stage2.pt"}
    for name, digest in m["files"].items():
        assert sha256_file(SHIPPED / name) == digest
    assert m["network"]["stage1"]["arch"].startswith("monai.") and m["network"]["stage2"]["out_channels"] == 17
    assert "phantom" in m["trained_on"] and "held-out" in m["trained_on"]
    assert m["metrics"]["mean_dice"] >= FLOOR_DICE and m["metrics"]["fdi_accuracy"] >= FLOOR_FDI
    assert all(s in HELDOUT_SEEDS for s in m["metrics"]["seeds"])
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 12e6
    # the built-in store finds it
    entry = ModelStore(root=ROOT / "no-such-user-store").get("teeth")
    assert entry.dir.resolve() == SHIPPED.resolve()


def test_shipped_average_names_its_ingredients():
    """phantom-v2 is the equal-share average of phantom-v1 (shipped beside it) and two fine-tunes of it."""
    m = json.loads((SOUP / "manifest.json").read_text())
    base = json.loads((BASE / "manifest.json").read_text())
    parts = {p["version"]: p for p in m["averaged_from"]}
    assert set(parts) == {"phantom-v1", "phantom-v1-ft100", "phantom-v1-ft60"}
    assert parts["phantom-v1"]["files"] == base["files"] and not base.get("default")
    assert abs(sum(p["weight"] for p in parts.values()) - 1) < 1e-5
    assert m["base_version"] == "phantom-v1" and m["network"] == base["network"]
    assert m["training"]["command"].startswith("deepsegrecon models average teeth phantom-v1 ")
    assert m["files"] != base["files"] and not m.get("default")


def test_heldout_phantom_accuracy_does_not_regress(run):
    cbct, gt, info, res, _, _ = run
    sc = score(res.labelmap.array, gt.array)
    dice = float(np.mean(list(sc["dice"].values())))
    fdi = float(np.mean(list(sc["correct"].values())))
    assert dice >= FLOOR_DICE, sc["dice"]
    assert fdi >= FLOOR_FDI, {f: ok for f, ok in sc["correct"].items() if not ok}
    assert sc["extra_teeth"] == []  # nothing invented: missing teeth stay missing
    assert sc["bone_dice"]["maxilla"] > 0.8 and sc["bone_dice"]["mandible"] > 0.8


def test_result_on_the_input_grid_with_report(run):
    cbct, gt, info, res, events, seconds = run
    assert res.labelmap.same_grid(cbct) and res.labelmap.array.shape == cbct.array.shape
    present = {int(v) for v in np.unique(res.labelmap.array) if v}
    assert {s.label for s in res.segments} == present
    assert {s.name for s in res.segments} == {L.segment_name(v) for v in present}
    assert "tooth_15" in res.absent and "tooth_42" in res.absent
    assert not ({L.label_of(a) for a in res.absent} & present)
    teeth = res.report["teeth"]
    assert teeth and all(t["volume_mm3"] > 20 for t in teeth.values())
    assert set(res.report["timings_s"]) >= {"stage1_s", "stage2_s", "instances_s", "output_s", "total_s"}
    stages = [s for s, _ in events]
    assert {"stage1", "stage2", "instances", "output"} <= set(stages)
    assert len(events) > 20  # reported often (cancel is checked at each report)


def test_flipped_direction_gives_the_same_teeth(model, run):
    """The same volume flipped along i with direction[:, 0] negated: identical labels in physical space."""
    from deepsegrecon.image import Image

    cbct, gt, info, res, _, _ = run
    d = cbct.direction.copy()
    d[:, 0] = -d[:, 0]
    origin = np.asarray(cbct.origin) + cbct.direction[:, 0] * cbct.spacing[0] * (cbct.array.shape[2] - 1)
    flipped = Image(cbct.array[:, :, ::-1].copy(), cbct.spacing, origin, d)
    res2 = segment(flipped, model, "cpu")
    assert np.array_equal(res2.labelmap.array[:, :, ::-1], res.labelmap.array)


def test_cancel_stops_within_seconds(model):
    cbct, _, _ = generate_teeth_phantom(10002, spacing=0.6, shape=(150, 140, 110))
    token = CancelToken()
    seen = {}

    def progress(stage, fraction=0.0, message=""):
        if stage == "stage2" and "t" not in seen:
            seen["t"] = time.perf_counter()
            token.cancel()

    ctx = TaskContext(device="cpu", progress=progress, cancel=token, model_dir=SHIPPED)
    with pytest.raises(Cancelled):
        TeethTask().run({"image": cbct}, {"device": "cpu"}, ctx)
    assert time.perf_counter() - seen["t"] < 5.0


def _copy(tmp_path) -> Path:
    dst = tmp_path / "teeth" / "phantom-v4"
    shutil.copytree(SHIPPED, dst)
    return dst


def _rewrite_manifest(folder: Path, **changes):
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    m["files"] = {n: sha256_file(folder / n) for n in m["files"]}
    (folder / "manifest.json").write_text(json.dumps(m))


def test_wrong_task_weights_are_refused(tmp_path):
    folder = _copy(tmp_path)
    _rewrite_manifest(folder, task="brain")
    with pytest.raises(ModelError, match="brain"):
        load_model(entry_from_dir(folder))
    cbct, _, _ = generate_teeth_phantom(10003, shape=(40, 40, 32))
    with pytest.raises(ModelError):
        TeethTask().run({"image": cbct}, {"device": "cpu"}, TaskContext(model_dir=folder))


def test_corrupt_stage_file_is_refused(tmp_path):
    folder = _copy(tmp_path)
    data = bytearray((folder / "stage2.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "stage2.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        load_model(entry_from_dir(folder))
    # garbage whose checksum the manifest was made to match: not a weights file
    (folder / "stage2.pt").write_bytes(b"not a torch file" * 100)
    _rewrite_manifest(folder)
    with pytest.raises(ModelError, match="corrupt|refusing|not a"):
        load_model(entry_from_dir(folder))
    # real weights of another network: they do not fit the manifest's network
    torch.save({"weight": torch.zeros(3, 3)}, folder / "stage2.pt")
    _rewrite_manifest(folder)
    with pytest.raises(ModelError, match="does not fit"):
        load_model(entry_from_dir(folder))
    # stage1 swapped for stage2: wrong shapes
    shutil.copyfile(SHIPPED / "stage2.pt", folder / "stage1.pt")
    shutil.copyfile(SHIPPED / "stage2.pt", folder / "stage2.pt")
    _rewrite_manifest(folder)
    with pytest.raises(ModelError):
        load_model(entry_from_dir(folder))


def test_store_finds_user_version_and_task_loads_it(tmp_path, monkeypatch):
    """A version imported into the user store is found by the task through ModelStore."""
    store = ModelStore(root=tmp_path / "models", builtin_root=tmp_path / "none")
    store.import_file(SHIPPED, version="mine")
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path))
    entry = ModelStore(builtin_root=tmp_path / "none").get("teeth", "mine")
    m = load_model(entry)
    assert m.version == "mine"
