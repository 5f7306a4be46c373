"""Cone-beam geometry: JSON, checks, point projection, frame <-> LPS with oblique, anisotropic grids."""

import json
import math

import numpy as np
import pytest

from deepsegrecon.cbct.geometry import ConeGeometry, circular_angles, geometry_for_grid
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image


def _grid(oblique_image):
    return Image(np.zeros((20, 24, 28), np.float32), (0.8, 1.1, 1.6), oblique_image.origin, oblique_image.direction)


def test_json_round_trip_keeps_every_field(tmp_path, oblique_image):
    geo = geometry_for_grid(_grid(oblique_image), 8, detector=40, arc_deg=180)
    geo.detector_offset = (1.5, -2.0)
    path = geo.save(tmp_path / "geometry.json")
    back = ConeGeometry.load(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.angles_deg == pytest.approx(circular_angles(8, 180)) and back.angles_deg[-1] == 180.0
    assert back.detector_offset == (1.5, -2.0) and back.volume_spacing == (0.8, 1.1, 1.6)
    assert np.allclose(back.volume_direction, oblique_image.direction)
    assert back.grid_image().same_grid(_grid(oblique_image))


@pytest.mark.parametrize("missing", ["dsd", "angles_deg", "detector_spacing", "volume"])
def test_missing_field_is_named(missing, oblique_image):
    d = geometry_for_grid(_grid(oblique_image), 4, detector=16).to_dict()
    del d[missing]
    with pytest.raises(InputError, match=f"missing the field.*{missing}"):
        ConeGeometry.from_dict(d)
    d = geometry_for_grid(_grid(oblique_image), 4, detector=16).to_dict()
    del d["volume"]["spacing"]
    with pytest.raises(InputError, match="volume.spacing"):
        ConeGeometry.from_dict(d)


def test_source_inside_the_volume_and_other_bad_geometry(oblique_image):
    d = geometry_for_grid(_grid(oblique_image), 4, detector=16).to_dict()
    d["dso"], d["dsd"] = 10.0, 30.0  # the volume is 22 x 26 mm in-plane
    with pytest.raises(InputError, match="source at .* inside the volume"):
        ConeGeometry.from_dict(d)
    d = geometry_for_grid(_grid(oblique_image), 4, detector=16).to_dict()
    d["dsd"] = d["dso"] * 0.9
    with pytest.raises(InputError, match="must exceed"):
        ConeGeometry.from_dict(d)
    d = geometry_for_grid(_grid(oblique_image), 4, detector=16).to_dict()
    d["angles_deg"] = [0.0]
    with pytest.raises(InputError, match="at least 2"):
        ConeGeometry.from_dict(d)


def test_frame_lps_round_trip_oblique_anisotropic(oblique_image):
    geo = geometry_for_grid(_grid(oblique_image), 4, detector=16)
    img = geo.grid_image()
    idx = np.array([[0, 0, 0], [27, 23, 19], [3, 17, 5]], float)
    lps = img.physical_points(idx)
    frame = geo.lps_to_frame(lps)
    assert np.allclose(frame, idx * img.spacing - geo.half_extent)
    assert np.allclose(geo.frame_to_lps(frame), lps)


def test_point_projection_by_similar_triangles():
    geo = ConeGeometry(900.0, 600.0, (50, 70), (0.9, 1.3), (2.0, -3.0), [0.0, 90.0, 210.0], (10, 10, 10),
                       (1.0, 1.0, 1.0)).check()
    p = np.array([[30.0, -20.0, 15.0]])
    cr = geo.project(p)
    # angle 0: the source is on +x; depth from the source is 600 - x; u along +y, v along +z
    mag = 900.0 / (600.0 - 30.0)
    assert cr[0, 0] == pytest.approx([(-20.0 * mag - 2.0) / 0.9 + 34.5, (15.0 * mag + 3.0) / 1.3 + 24.5])
    # angle 90: the source is on +y; u along -x
    mag = 900.0 / (600.0 + 20.0)
    assert cr[1, 0] == pytest.approx([(-30.0 * mag - 2.0) / 0.9 + 34.5, (15.0 * mag + 3.0) / 1.3 + 24.5])
    a = math.radians(210.0)
    mag = 900.0 / (600.0 - (30.0 * math.cos(a) - 20.0 * math.sin(a)))
    u = (-30.0 * math.sin(a) - 20.0 * math.cos(a)) * mag
    assert cr[2, 0, 0] == pytest.approx((u - 2.0) / 0.9 + 34.5)


def test_default_detector_sees_the_whole_volume(oblique_image):
    geo = geometry_for_grid(_grid(oblique_image), 12, detector=32)
    h = np.asarray(geo.volume_size) * np.asarray(geo.volume_spacing) / 2
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * h
    cr = geo.project(corners)
    assert cr.min() >= -0.5 and cr[..., 0].max() <= 31.5 and cr[..., 1].max() <= 31.5
    assert cr[..., 0].max() > 28  # and is not much larger than needed
