"""The preview PNG: three orthogonal slices with the label overlay and a 3-D view (engine layer, no Slicer)."""

from pathlib import Path

import numpy as np
import pytest

from conftest import oblique_direction
from deepsegrecon import preview
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.results import SegmentationResult, SegmentInfo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 0.8, 0.0), (0.1, 0.3, 1.0)


def blobs(direction=None, spacing=(0.5, 0.6, 1.25), shape=(40, 80, 100)):
    """A labelmap of three blobs placed by their physical (LPS) position, and a noisy image of them.

    The grid is centred on the LPS origin. label 1 (red): sphere on the patient's right (L < 0), anterior
    (P < 0) and superior (S > 0); label 5 (green): ellipsoid on the left, posterior, inferior; label 9
    (blue): box at the centre.
    """
    d = np.eye(3) if direction is None else np.asarray(direction)
    centre_ijk = (np.array(shape[::-1]) - 1) / 2
    origin = -(d @ np.diag(spacing) @ centre_ijk)
    grid = Image(np.zeros(shape, np.float32), spacing=spacing, origin=origin, direction=d)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    pts = grid.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], 1)).reshape(shape + (3,))
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    lab = np.zeros(shape, np.int16)
    lab[(x + 10) ** 2 + (y + 8) ** 2 + (z - 7) ** 2 < 6 ** 2] = 1
    lab[((x - 10) / 8) ** 2 + ((y - 7) / 5) ** 2 + ((z + 6) / 6) ** 2 < 1] = 5
    lab[(np.abs(x) < 3) & (np.abs(y) < 10) & (np.abs(z) < 3)] = 9
    rng = np.random.default_rng(1)
    img = grid.with_array((100 + 400 * (lab > 0) + rng.normal(0, 25, shape)).astype(np.float32))
    segs = [SegmentInfo("sphere", 1, RED), SegmentInfo("ellipsoid", 5, GREEN), SegmentInfo("box", 9, BLUE)]
    return img, SegmentationResult(img.with_array(lab), segs, absent=["gone"])


def read_png(path):
    import matplotlib.image as mpimg

    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return mpimg.imread(path)[..., :3]


def colour_pixels(rgb, colour, tol=0.04):
    return int(np.all(np.abs(rgb - np.asarray(colour)) <= tol, axis=2).sum())


def test_preview_is_a_png_with_every_segment_colour(tmp_path):
    img, res = blobs()
    out = preview.write_preview(img, res, tmp_path / "p.png", title="blobs", renderer="matplotlib")
    assert out == tmp_path / "p.png" and out.is_file()
    rgb = read_png(out)
    h, w = rgb.shape[:2]
    assert 800 <= w <= 2400 and 700 <= h <= 2400
    body = rgb[: int(0.9 * h)]  # the panels, without the legend at the bottom
    for colour in (RED, GREEN, BLUE):
        assert colour_pixels(body, colour) > 150, f"overlay colour {colour} missing from the slice panels"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]  # no temporary file left behind


def test_preview_3d_view_auto_renderer(tmp_path):
    """VTK offscreen where it works (EGL/OSMesa), matplotlib otherwise: the 3-D panel shows the segment colours."""
    img, res = blobs()
    out = preview.write_preview(img, res, tmp_path / "auto.png")
    rgb = read_png(out)
    h, w = rgb.shape[:2]
    view3d = rgb[int(0.5 * h): int(0.9 * h), int(0.55 * w):]
    for colour in (RED, GREEN, BLUE):
        c = np.asarray(colour)
        # shaded surfaces: some pixels have the hue at a good fraction of full brightness
        dominant = int(np.argmax(c))
        ratio = view3d[..., dominant] / np.maximum(view3d.sum(axis=2), 1e-6)
        assert ((ratio > 0.6) & (view3d[..., dominant] > 0.3)).sum() > 200, f"{colour} missing from the 3-D view"


def test_panels_follow_radiological_convention_for_an_oblique_grid():
    """Sampled in physical space: the right-anterior-superior sphere shows left/top in every panel."""
    img, res = blobs(direction=oblique_direction((0.35, -0.25, 0.6)))
    lab = res.labelmap
    bounds = preview._physical_bounds(img)
    centre = np.array([-10.0, -8.0, 7.0])  # through the sphere
    where = {}
    for plane in ("axial", "coronal", "sagittal"):
        gray, labels, (w, h), letters, _ = preview._sample_plane(img, lab, plane, centre, bounds)
        rows, cols = np.nonzero(labels == 1)
        assert rows.size > 20, plane
        step_c, step_r = w / labels.shape[1], h / labels.shape[0]
        assert step_c == pytest.approx(step_r), "pixels must be square in millimetres"
        where[plane] = (cols.mean() / labels.shape[1], rows.mean() / labels.shape[0], letters)
        # the sphere's extent in mm matches its 12 mm diameter whatever the voxel size and rotation
        width_mm = (cols.max() - cols.min() + 1) * step_c
        assert 9.0 <= width_mm <= 14.0, (plane, width_mm)
    x, y, letters = where["axial"]
    assert letters == ("R", "L", "A", "P") and x < 0.5 and y < 0.5  # patient's right on the left, anterior up
    x, y, letters = where["coronal"]
    assert letters == ("R", "L", "S", "I") and x < 0.5 and y < 0.5  # right on the left, superior up
    x, y, letters = where["sagittal"]
    assert letters == ("A", "P", "S", "I") and x < 0.5 and y < 0.5  # anterior on the left, superior up


def test_panels_pass_through_the_segmented_structures():
    img, res = blobs()
    centre = preview._label_centre(res.labelmap, preview._physical_bounds(img))
    bounds = preview._physical_bounds(img)
    for plane in ("axial", "coronal", "sagittal"):
        _, labels, _, _, _ = preview._sample_plane(img, res.labelmap, plane, centre, bounds)
        assert (labels != 0).sum() > 50, plane


def test_surfaces_given_as_world_ras_polydata(tmp_path):
    vtk = pytest.importorskip("vtk")
    img, res = blobs()
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(10.0, 8.0, 7.0)  # RAS of the LPS point (-10, -8, 7)
    sphere.SetRadius(6.0)
    sphere.SetThetaResolution(24)
    sphere.SetPhiResolution(24)
    sphere.Update()
    verts, faces = preview._polydata_to_arrays(sphere.GetOutput(), "RAS")
    assert np.allclose(verts.mean(0), [-10.0, -8.0, 7.0], atol=0.5)
    assert faces.shape[1] == 3 and len(faces) > 100
    # world RAS is the default: what Slicer and deepsegrecon.scene hand over
    out = preview.write_preview(img, res, tmp_path / "s.png", surfaces={"sphere": sphere.GetOutput()},
                                renderer="matplotlib")
    assert colour_pixels(read_png(out), RED) > 100
    verts, _ = preview._polydata_to_arrays(sphere.GetOutput(), "LPS")
    assert np.allclose(verts.mean(0), [10.0, 8.0, 7.0], atol=0.5)
    with pytest.raises(ValueError, match="surface_space"):
        preview.write_preview(img, res, tmp_path / "x.png", surface_space="IJK")


def test_2d_image_and_empty_result(tmp_path):
    img = Image(np.random.default_rng(0).normal(size=(30, 40)).astype(np.float32), spacing=(0.8, 0.8))
    lab = np.zeros((30, 40), np.uint8)
    lab[10:20, 5:15] = 3
    res = SegmentationResult(img.with_array(lab), [SegmentInfo("square", 3, GREEN)])
    out = preview.write_preview(img, res, tmp_path / "2d.png", renderer="matplotlib")
    assert colour_pixels(read_png(out), GREEN) > 50
    empty = SegmentationResult(img.with_array(np.zeros_like(lab)), [], absent=["square"])
    out = preview.write_preview(img, empty, tmp_path / "empty.png", title="nothing found")
    read_png(out)


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    img, res = blobs()
    target = tmp_path / "p.png"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        preview.write_preview(img, res, target, renderer="matplotlib")
    assert target.read_bytes() == b"old"  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_read_only_folder_is_refused(readonly_dir):
    img, res = blobs()
    with pytest.raises(InputError, match="read-only"):
        preview.write_preview(img, res, readonly_dir / "p.png", renderer="matplotlib")
    assert not any(readonly_dir.iterdir())


def test_unknown_renderer_is_refused(tmp_path):
    img, res = blobs()
    with pytest.raises(ValueError, match="renderer"):
        preview.write_preview(img, res, tmp_path / "p.png", renderer="opengl")


def test_vtk_renderer_falls_back_when_the_child_fails(tmp_path, monkeypatch):
    """A crashing OpenGL (e.g. no EGL and no OSMesa) never takes the caller down: matplotlib draws the 3-D view."""
    img, res = blobs()

    def crash(meshes):
        raise RuntimeError("VTK offscreen rendering failed (exit -11)")

    monkeypatch.setattr(preview, "_render_vtk", crash)
    monkeypatch.setattr(preview, "_vtk_failed_reason", None)
    out = preview.write_preview(img, res, tmp_path / "p.png", renderer="auto")
    assert preview._vtk_failed_reason and "exit -11" in preview._vtk_failed_reason
    read_png(out)
    with pytest.raises(RuntimeError, match="exit -11"):
        preview.write_preview(img, res, tmp_path / "q.png", renderer="vtk")
