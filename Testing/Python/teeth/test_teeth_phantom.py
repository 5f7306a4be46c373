"""Synthetic dental CBCT phantoms: anatomy, labels, contrast, artefacts, grids, determinism, orientation."""

import numpy as np
import pytest

from deepsegrecon.image import Image
from deepsegrecon.teeth import labels as L
from deepsegrecon.teeth.phantom import DENTIN, ENAMEL, METAL, PULP, generate_teeth_phantom, phantom_grid

SMALL = (150, 140, 110)  # (X, Y, Z): the voxel size is chosen so that both jaws fit


@pytest.fixture(scope="module")
def phantom():
    return generate_teeth_phantom(3, shape=SMALL, metal=True, return_tissue=True)


def test_teeth_count_labels_and_grid(phantom):
    cbct, lab, info = phantom
    assert cbct.array.shape == (SMALL[2], SMALL[1], SMALL[0])
    assert lab.same_grid(cbct) and lab.array.dtype == np.uint8
    assert cbct.array.dtype == np.int16
    present = sorted(int(v) for v in np.unique(lab.array) if v in L.FDI)
    assert present == info["present"]
    wisdom_absent = info["third_molars_absent"]
    assert 0 <= len(info["missing"]) <= 4
    assert 28 <= 32 - wisdom_absent <= 32
    assert len(present) == 32 - wisdom_absent - len(info["missing"])
    assert not set(present) & set(info["missing"])
    assert set(np.unique(lab.array)) <= {0, L.MAXILLA, L.MANDIBLE, *L.FDI}
    assert (lab.array == L.MAXILLA).sum() > 1000 and (lab.array == L.MANDIBLE).sum() > 1000


def test_tissue_contrast_enamel_dentin_pulp(phantom):
    cbct, lab, info = phantom
    t, a = info["tissue"], cbct.array.astype(float)
    enamel, dentin, pulp = (np.median(a[t == c]) for c in (ENAMEL, DENTIN, PULP))
    assert enamel > dentin + 400 > pulp + 400
    air = np.median(a[lab.array == 0][:: 50])
    assert air < enamel
    # teeth are labelled exactly where tooth tissue is
    teeth = lab.array >= 11
    assert np.isin(t[teeth], [ENAMEL, DENTIN, PULP, METAL]).all()


def test_metal_when_asked(phantom):
    cbct, lab, info = phantom
    assert info["metal"], "metal=True must put at least one restoration"
    assert (info["tissue"] == METAL).any()
    assert cbct.array.max() > 4000
    assert all(f in info["present"] for f in info["metal"])
    _, _, none = generate_teeth_phantom(3, shape=(60, 56, 44), metal=False)
    assert none["metal"] == {}


def test_spacing_and_shape_vary_across_seeds():
    grids = [phantom_grid(s) for s in range(12)]
    spacings = [g[1][0] for g in grids]
    assert min(spacings) >= 0.25 - 1e-9 and max(spacings) <= 0.6 + 1e-9
    assert max(spacings) - min(spacings) > 0.08
    assert len({g[0] for g in grids}) > 6
    b = [phantom_grid(s, family="B")[1][0] for s in range(12)]
    assert np.mean(b) > np.mean(spacings)
    # the grid of a real generation is the one phantom_grid reports
    cbct, _, _ = generate_teeth_phantom(5, shape=(64, 60, 48))
    shape, sp, origin = phantom_grid(5, shape=(64, 60, 48))
    assert cbct.size == shape and np.allclose(cbct.spacing, sp) and np.allclose(cbct.origin, origin)


def test_deterministic_per_seed():
    a = generate_teeth_phantom(11, shape=(80, 76, 60))
    b = generate_teeth_phantom(11, shape=(80, 76, 60))
    c = generate_teeth_phantom(12, shape=(80, 76, 60))
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1].array, b[1].array)
    assert a[2]["missing"] == b[2]["missing"]
    assert not np.array_equal(a[0].array, c[0].array)


def test_family_b_differs():
    a, _, ia = generate_teeth_phantom(4, shape=(80, 76, 60), family="A")
    b, _, ib = generate_teeth_phantom(4, shape=(80, 76, 60), family="B")
    assert ib["family"] == "B" and ib["intensity"]["scale"] != ia["intensity"]["scale"]
    assert np.percentile(b.array, 1) > np.percentile(a.array, 1) + 100  # air is not at -1000 in family B
    with pytest.raises(ValueError):
        generate_teeth_phantom(4, shape=(40, 40, 40), family="Z")


def _centroids(lab: Image) -> dict:
    out = {}
    for f in np.unique(lab.array):
        if f in L.FDI:
            kji = np.argwhere(lab.array == f)
            out[int(f)] = lab.physical_points(kji[:, ::-1]).mean(0)
    return out


def test_fdi_quadrants_follow_patient_sides(phantom):
    """LPS: x grows toward the patient's left, z upward; 1 upper right, 2 upper left, 3 lower left, 4 lower right."""
    _, lab, info = phantom
    c = _centroids(lab)
    mid = info["midline_x"]
    for f, p in c.items():
        assert (p[0] < mid) == L.is_right(f), f
    upper_z = [p[2] for f, p in c.items() if L.is_upper(f)]
    lower_z = [p[2] for f, p in c.items() if not L.is_upper(f)]
    assert min(upper_z) > max(lower_z)
    # along each quadrant, positions go from the front (small y) backwards
    for q in L.QUADRANTS:
        ys = [c[f][1] for f in sorted(c) if f // 10 == q]
        assert ys == sorted(ys)


def test_flipped_direction_keeps_physical_labels(phantom):
    """Flipping the array along i with direction[:, 0] negated (origin moved) is the same object in space."""
    cbct, lab, _ = phantom
    d = lab.direction.copy()
    d[:, 0] = -d[:, 0]
    n = lab.array.shape[2]
    origin = np.asarray(lab.origin) + lab.direction[:, 0] * lab.spacing[0] * (n - 1)
    flipped = Image(lab.array[:, :, ::-1].copy(), lab.spacing, origin, d)
    a, b = _centroids(lab), _centroids(flipped)
    assert a.keys() == b.keys()
    for f in a:
        assert np.allclose(a[f], b[f], atol=1e-6)


def test_write_phantom_files(tmp_path):
    from deepsegrecon.io import read_image
    from deepsegrecon.segio import read_seg_nrrd
    from deepsegrecon.teeth.phantom import write_phantom

    info = write_phantom(21, tmp_path / "ph", shape=(70, 66, 52))
    cbct = read_image(tmp_path / "ph" / "cbct.nrrd")
    seg = read_seg_nrrd(tmp_path / "ph" / "labels.seg.nrrd")
    assert cbct.array.shape == (52, 66, 70)
    assert seg.labelmap.same_grid(cbct)
    names = {s.name for s in seg.segments}
    assert {"maxilla", "mandible"} <= names
    assert {n for n in names if n.startswith("tooth_")} == {f"tooth_{f}" for f in info["present"]}
    for s in seg.segments:
        assert s.label == L.label_of(s.name)
        assert np.any(seg.labelmap.array == s.label)


def test_labels_module():
    assert len(L.FDI) == 32 and L.FDI[0] == 11 and L.FDI[-1] == 48
    infos = L.segment_infos([1, 2, 11, 48, 21])
    assert [i.name for i in infos] == ["maxilla", "mandible", "tooth_11", "tooth_21", "tooth_48"]
    colours = {tuple(np.round(L.color(f), 3)) for f in [1, 2, *L.FDI]}
    assert len(colours) == 34
    for v in [1, 2, *L.FDI]:
        term = L.terminology(v)
        parts = term.split("~")
        assert len(parts) == 7 and parts[0].startswith("Segmentation category and type - DICOM master list")
        assert all(len(p.split("^")) == 3 for p in (parts[1], parts[2], parts[3], parts[5], parts[6]))
    assert "SCT^38199008^Tooth" in L.terminology(11) and "Right" in L.terminology(11)
    assert "Left" in L.terminology(21) and "Left" in L.terminology(31) and "Right" in L.terminology(41)
    assert L.fdi_from(True, True, 6) == 16 and L.fdi_from(False, True, 6) == 46 and L.fdi_from(False, False, 1) == 31
