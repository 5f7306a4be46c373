"""A one-page PNG preview of a segmentation: three orthogonal slices with the labels, and a 3-D view.

Layout (one figure): axial | coronal on top, sagittal | 3-D below, a colour legend underneath.

Slices are resampled in physical space, so any direction matrix (oblique included) and any voxel
size show with the correct aspect ratio: each panel is a square-pixel grid in millimetres, aligned
with the patient's LPS axes, through the centre of the segmented structures (the median position of
the labelled voxels along the panel's normal, moved to the nearest slice that has labels).
Display follows the radiological convention, which is also Slicer's: the patient's right is on the
image's left in the axial and coronal panels, the axial panel is seen from the feet with anterior up,
the sagittal panel is seen from the patient's left with anterior on the left, superior is up.

The 3-D view shows ``surfaces`` ({segment name: vtkPolyData} in world RAS mm, as Slicer and
:mod:`deepsegrecon.scene` make them; ``surface_space="LPS"`` for LPS meshes) or, for segments without
one, a surface made from the labelmap by marching cubes. It is rendered with VTK
offscreen (EGL or OSMesa) in a child process, so a missing or broken OpenGL can never crash the caller,
and falls back to matplotlib (shaded triangles after decimation) when that fails.
``DEEPSEGRECON_PREVIEW_3D=vtk|matplotlib|auto`` forces one renderer (``auto`` is the default).

No Slicer, no Qt: matplotlib (Agg), NumPy, SciPy, scikit-image and (optionally) VTK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .files import atomic_file
from .image import Image
from .results import SegmentationResult

MAX_PANEL_PIXELS = 480  # samples along the longer side of a slice panel
MAX_TRIANGLES_MPL = 60000  # triangles drawn by the matplotlib fallback, all segments together
MAX_TRIANGLES_VTK = 2_000_000  # more triangles are decimated before VTK rendering (software OpenGL)
VTK_RENDER_SIZE = (900, 760)
VTK_TIMEOUT_S = 120
# camera for the 3-D view, in LPS: in front of the patient, a little to their right and above
VIEW_DIRECTION_LPS = np.array([-0.45, -1.0, 0.40])
CONVENTION_NOTE = ("Radiological convention (as in Slicer): patient's right on image left (axial, coronal); "
                   "axial seen from the feet, anterior up; sagittal seen from the patient's left, anterior left.")

_vtk_failed_reason: str | None = None  # set once VTK offscreen rendering failed in this process


# ----------------------------------------------------------------------------------------- public entry
def write_preview(image: Image, result: SegmentationResult, path, surfaces: dict | None = None,
                  title: str = "", surface_space: str = "RAS", renderer: str | None = None) -> Path:
    """Write one PNG: axial, coronal and sagittal slices with the label overlay, and a 3-D view.

    ``surfaces`` maps segment names to ``vtkPolyData`` in world RAS mm (Slicer's and ``deepsegrecon.scene``'s
    frame; pass ``surface_space="LPS"`` for LPS meshes); segments without a surface are made from the labelmap.
    ``renderer`` ("vtk", "matplotlib" or "auto") overrides ``$DEEPSEGRECON_PREVIEW_3D``.
    The file appears whole or not at all. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from .segio import as_3d

    path = Path(path)
    if surface_space.upper() not in ("LPS", "RAS"):
        raise ValueError(f"surface_space must be 'LPS' or 'RAS', not {surface_space!r}")
    img = as_3d(image)
    lab = as_3d(result.labelmap)
    segments = [s for s in result.segments if int(s.label) != 0]
    colors = {int(s.label): tuple(float(c) for c in s.color[:3]) for s in segments}

    bounds = _physical_bounds(img)
    centre = _label_centre(lab, bounds)
    vmin, vmax = _window(img.array)

    ncol = min(len(segments), 10) or 1
    legend_rows = -(-len(segments) // ncol)
    fig = Figure(figsize=(12.0, 10.6), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, left=0.05, right=0.98, top=0.885, bottom=0.075 + 0.018 * legend_rows,
                            wspace=0.12, hspace=0.17)
    panels = (("Axial", "axial", grid[0, 0]), ("Coronal", "coronal", grid[0, 1]), ("Sagittal", "sagittal", grid[1, 0]))
    for label, plane, cell in panels:
        ax = fig.add_subplot(cell)
        gray, labels, extent_mm, letters, axis_names = _sample_plane(img, lab, plane, centre, bounds)
        rgb = _compose(gray, labels, colors, vmin, vmax)
        w, h = extent_mm
        ax.imshow(rgb, extent=(0, w, h, 0), interpolation="nearest", aspect="equal")
        pos = {"axial": centre[2], "coronal": centre[1], "sagittal": centre[0]}[plane]
        axis_letter = {"axial": "S", "coronal": "P", "sagittal": "L"}[plane]
        ax.set_title(f"{label} ({axis_letter} = {pos:.1f} mm, LPS)", fontsize=11)
        ax.set_xlabel(axis_names[0] + " (mm)", fontsize=8)
        ax.set_ylabel(axis_names[1] + " (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
        _orientation_letters(ax, letters, w, h)

    ax3d_cell = grid[1, 1]
    meshes = _meshes(lab, segments, surfaces, surface_space.upper())
    how = _draw_3d(fig, ax3d_cell, meshes, renderer)

    sup = title or "Segmentation preview"
    fig.suptitle(sup, fontsize=15, fontweight="bold", y=0.985)
    sz = "x".join(str(n) for n in img.size)
    sp = " x ".join(f"{s:.3g}" for s in img.spacing)
    info = f"{sz} voxels, spacing {sp} mm, {len(segments)} segment{'s' if len(segments) != 1 else ''}"
    if result.absent:
        absent = ", ".join(str(a) for a in result.absent[:12]) + (" ..." if len(result.absent) > 12 else "")
        info += f"; absent: {absent}"
    fig.text(0.5, 0.945, info, ha="center", fontsize=9.5)
    fig.text(0.5, 0.925, CONVENTION_NOTE, ha="center", fontsize=8.5, style="italic", color="#444444")
    fig.text(0.99, 0.005, f"3-D: {how}", ha="right", va="bottom", fontsize=7, color="#777777")

    if segments:
        handles = [Patch(facecolor=colors[int(s.label)], edgecolor="none", label=f"{s.name} ({int(s.label)})")
                   for s in segments]
        fontsize = 8 if len(handles) <= 20 else 7
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=fontsize, frameon=False,
                   bbox_to_anchor=(0.5, 0.012), handlelength=1.4, columnspacing=1.2)

    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, facecolor="white")
    return path


# ------------------------------------------------------------------------------------ slice sampling
def _corners_lps(img: Image) -> np.ndarray:
    size = np.array(img.size, dtype=float)  # (i, j, k)
    corners = np.array([[a, b, c] for a in (-0.5, size[0] - 0.5) for b in (-0.5, size[1] - 0.5)
                        for c in (-0.5, size[2] - 0.5)])
    return img.physical_points(corners)


def _physical_bounds(img: Image) -> np.ndarray:
    """(3, 2) LPS min/max of the image's voxel corners."""
    c = _corners_lps(img)
    return np.stack([c.min(0), c.max(0)], axis=1)


def _lps_to_kji(img: Image, points: np.ndarray) -> np.ndarray:
    """Continuous array coordinates (k, j, i) of (N, 3) LPS points, as rows of a (3, N) array."""
    inv = np.linalg.inv(img.ijk_to_lps())
    ijk = points @ inv[:3, :3].T + inv[:3, 3]
    return ijk[:, ::-1].T


def _label_centre(lab: Image, bounds: np.ndarray) -> np.ndarray:
    """LPS point through which the panels pass: per axis, the median of the labelled voxels' positions."""
    arr = lab.array
    idx = np.argwhere(arr != 0)
    if idx.size == 0:
        return bounds.mean(axis=1)
    if len(idx) > 400000:  # a regular subsample is plenty for a median
        idx = idx[:: len(idx) // 400000 + 1]
    pts = lab.physical_points(idx[:, ::-1].astype(float))
    return np.median(pts, axis=0)


def _plane_axes(plane: str):
    """Per plane: (normal axis, column axis, column sign, row axis, row sign) in LPS index terms (0 L, 1 P, 2 S),
    the orientation letters (left, right, top, bottom) and the axis names (columns, rows)."""
    if plane == "axial":  # columns R->L, rows A->P (anterior at the top)
        return 2, 0, +1, 1, +1, ("R", "L", "A", "P"), ("right → left", "anterior → posterior")
    if plane == "coronal":  # columns R->L, rows S->I
        return 1, 0, +1, 2, -1, ("R", "L", "S", "I"), ("right → left", "superior → inferior")
    if plane == "sagittal":  # columns A->P, rows S->I
        return 0, 1, +1, 2, -1, ("A", "P", "S", "I"), ("anterior → posterior", "superior → inferior")
    raise ValueError(plane)


def _nearest_labelled(lab: Image, plane_axes, centre: np.ndarray, bounds: np.ndarray, step: float) -> float:
    """Move the plane position along its normal to the nearest position whose slice holds labels."""
    normal = plane_axes[0]
    idx = np.argwhere(lab.array != 0)
    if idx.size == 0:
        return float(centre[normal])
    if len(idx) > 400000:
        idx = idx[:: len(idx) // 400000 + 1]
    coords = lab.physical_points(idx[:, ::-1].astype(float))[:, normal]
    c = float(centre[normal])
    # a voxel contributes to the slice if it lies within half a sampling step (or half a voxel) of the plane
    tol = max(step, float(min(lab.spacing))) * 0.75
    if np.any(np.abs(coords - c) <= tol):
        return c
    return float(coords[np.argmin(np.abs(coords - c))])


def _sample_plane(img: Image, lab: Image, plane: str, centre: np.ndarray, bounds: np.ndarray):
    from scipy.ndimage import map_coordinates

    axes = _plane_axes(plane)
    normal, col_ax, col_sign, row_ax, row_sign, letters, names = axes
    extent = bounds[:, 1] - bounds[:, 0]
    step = max(float(min(img.spacing)), float(max(extent[col_ax], extent[row_ax])) / MAX_PANEL_PIXELS)
    pos = _nearest_labelled(lab, axes, centre, bounds, step)
    centre = np.array(centre, dtype=float)
    centre[normal] = pos
    ncol = max(1, int(round(extent[col_ax] / step)))
    nrow = max(1, int(round(extent[row_ax] / step)))
    cols = (np.arange(ncol) + 0.5) * step
    rows = (np.arange(nrow) + 0.5) * step
    col_coord = bounds[col_ax, 0] + cols if col_sign > 0 else bounds[col_ax, 1] - cols
    row_coord = bounds[row_ax, 0] + rows if row_sign > 0 else bounds[row_ax, 1] - rows
    pts = np.empty((nrow, ncol, 3))
    pts[..., normal] = pos
    pts[..., col_ax] = col_coord[None, :]
    pts[..., row_ax] = row_coord[:, None]
    pts = pts.reshape(-1, 3)

    arr = img.array.astype(np.float32, copy=False)
    low = float(np.nanmin(arr)) if arr.size else 0.0
    gray = map_coordinates(arr, _lps_to_kji(img, pts), order=1, mode="constant", cval=low).reshape(nrow, ncol)
    labels = map_coordinates(lab.array.astype(np.int64, copy=False), _lps_to_kji(lab, pts), order=0,
                             mode="constant", cval=0).reshape(nrow, ncol)
    return gray, labels, (ncol * step, nrow * step), letters, names


def _window(array: np.ndarray):
    a = np.asarray(array)
    if a.size > 2_000_000:
        a = a.ravel()[:: a.size // 2_000_000 + 1]
    a = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a.ravel()
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _compose(gray: np.ndarray, labels: np.ndarray, colors: dict, vmin: float, vmax: float,
             alpha: float = 0.45) -> np.ndarray:
    """RGB image: the grey slice, each label tinted with its colour and outlined in its pure colour."""
    g = np.clip((gray - vmin) / (vmax - vmin), 0.0, 1.0)
    rgb = np.repeat(g[..., None], 3, axis=2)
    if not colors:
        return rgb
    # boundary: a labelled pixel with a differently labelled 4-neighbour
    pad = np.pad(labels, 1, mode="edge")
    edge = np.zeros(labels.shape, dtype=bool)
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dr:dr + labels.shape[0], dc:dc + labels.shape[1]] != labels
    edge &= labels != 0
    for value, color in colors.items():
        m = labels == value
        if not m.any():
            continue
        c = np.asarray(color, dtype=float)
        inner = m & ~edge
        rgb[inner] = (1 - alpha) * rgb[inner] + alpha * c
        rgb[m & edge] = c
    return rgb


def _orientation_letters(ax, letters, w, h) -> None:
    left, right, top, bottom = letters
    style = dict(color="#ffd400", fontsize=11, fontweight="bold", ha="center", va="center")
    ax.text(0.03 * w, 0.5 * h, left, **style)
    ax.text(0.97 * w, 0.5 * h, right, **style)
    ax.text(0.5 * w, 0.04 * h, top, **style)
    ax.text(0.5 * w, 0.96 * h, bottom, **style)


# --------------------------------------------------------------------------------------------- meshes
def _polydata_to_arrays(poly, space: str):
    """(verts LPS (N, 3) float, faces (M, 3) int) of a vtkPolyData, triangulated."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    tri = vtk.vtkTriangleFilter()
    tri.SetInputData(poly)
    tri.PassVertsOff()
    tri.PassLinesOff()
    tri.Update()
    out = tri.GetOutput()
    if out.GetNumberOfPoints() == 0 or out.GetNumberOfPolys() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    verts = vtk_to_numpy(out.GetPoints().GetData()).astype(float)
    polys = out.GetPolys()
    if hasattr(polys, "GetConnectivityArray"):
        faces = vtk_to_numpy(polys.GetConnectivityArray()).reshape(-1, 3).astype(np.int64)
    else:  # older VTK: legacy cell array (3, a, b, c, 3, ...)
        faces = vtk_to_numpy(polys.GetData()).reshape(-1, 4)[:, 1:].astype(np.int64)
    if space == "RAS":
        verts = verts * np.array([-1.0, -1.0, 1.0])
    return verts, faces


def _labelmap_mesh(lab: Image, value: int, box=None, max_voxels: int = 1_000_000):
    """Marching-cubes surface of one label, in LPS mm (a coarser step for large structures).

    ``box``: the label's bounding box as a tuple of slices (from ``scipy.ndimage.find_objects``), if known.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.measure import marching_cubes

    if box is None:
        idx = np.argwhere(lab.array == value)
        if idx.size == 0:
            return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
        box = tuple(slice(a, b + 1) for a, b in zip(idx.min(0), idx.max(0)))
    lo = np.array([s.start for s in box])
    hi = np.array([s.stop for s in box])
    crop = np.zeros(tuple(hi - lo + 4), dtype=np.float32)  # background all round: a closed surface
    crop[2:-2, 2:-2, 2:-2] = lab.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == value
    # soften the voxel staircase: Gaussian of 0.6 of the largest voxel size, in mm, on every axis
    spacing_kji = np.array(lab.spacing[::-1], dtype=float)
    crop = gaussian_filter(crop, sigma=0.6 * spacing_kji.max() / spacing_kji, mode="constant")
    step = max(1, int(np.ceil((crop.size / max_voxels) ** (1 / 3))))
    try:
        verts, faces, _, _ = marching_cubes(crop, level=0.5, step_size=step, allow_degenerate=False)
    except (ValueError, RuntimeError):
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    kji = verts + lo - 2
    return lab.physical_points(kji[:, ::-1]), faces.astype(np.int64)


def _meshes(lab: Image, segments: list, surfaces: dict | None, space: str) -> list:
    """[(name, color, verts LPS, faces)] for every segment with a non-empty surface."""
    out = []
    surfaces = surfaces or {}
    boxes = None
    if any(surfaces.get(s.name) is None for s in segments):
        from scipy.ndimage import find_objects

        arr = lab.array
        if arr.min() >= 0 and arr.max() <= 65535:  # one pass for every label's bounding box
            boxes = find_objects(arr.astype(np.int32, copy=False))
    for s in segments:
        poly = surfaces.get(s.name)
        if poly is not None:
            verts, faces = _polydata_to_arrays(poly, space)
        else:
            value = int(s.label)
            box = None
            if boxes is not None:
                box = boxes[value - 1] if 0 < value <= len(boxes) else None
                if box is None:
                    continue  # the label is not in the labelmap
            verts, faces = _labelmap_mesh(lab, value, box)
        if len(faces):
            out.append((s.name, tuple(float(c) for c in s.color[:3]), verts, faces))
    return out


# -------------------------------------------------------------------------------------------- 3-D view
def _draw_3d(fig, cell, meshes: list, renderer: str | None) -> str:
    """Draw the 3-D panel; returns a short description of how it was rendered."""
    global _vtk_failed_reason

    choice = (renderer or os.environ.get("DEEPSEGRECON_PREVIEW_3D") or "auto").lower()
    if choice not in ("auto", "vtk", "matplotlib"):
        raise ValueError(f"unknown 3-D renderer {choice!r}: use vtk, matplotlib or auto")
    if not meshes:
        ax = fig.add_subplot(cell)
        ax.axis("off")
        ax.set_title("3-D view", fontsize=11)
        ax.text(0.5, 0.5, "no surfaces (no segment present)", ha="center", va="center", transform=ax.transAxes)
        return "none"
    if choice == "vtk" or (choice == "auto" and _vtk_failed_reason is None):
        try:
            rgb = _render_vtk(meshes)
        except Exception as e:  # noqa: BLE001 - any failure falls back to matplotlib
            _vtk_failed_reason = f"{type(e).__name__}: {e}"
            if choice == "vtk":
                raise
        else:
            ax = fig.add_subplot(cell)
            ax.imshow(rgb, interpolation="antialiased")
            ax.axis("off")
            ax.set_title("3-D view (from the front, patient's right on the left)", fontsize=11)
            return "VTK offscreen"
    _draw_mpl_3d(fig, cell, meshes)
    return "matplotlib" + (" (VTK offscreen unavailable)" if _vtk_failed_reason else "")


def _decimate(verts: np.ndarray, faces: np.ndarray, target: int):
    """About ``target`` triangles at most: VTK vertex clustering first when the mesh is large (quadric decimation of
    a million triangles takes seconds), then quadric decimation; an even subsample of faces without VTK."""
    if len(faces) <= target:
        return verts, faces
    try:
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        poly = _arrays_to_polydata(verts, faces)
        if len(faces) > max(2 * target, 100_000):
            goal = max(target, 50_000)  # then quadric decimation of at most a few 10^4 triangles
            cluster = vtk.vtkQuadricClustering()
            cluster.SetInputData(poly)
            cluster.SetAutoAdjustNumberOfDivisions(False)
            n = int(np.sqrt(goal / 10))  # a sphere in n^3 bins comes out with about 10 n^2 triangles
            cluster.SetNumberOfDivisions(n, n, n)
            cluster.Update()
            if cluster.GetOutput().GetNumberOfPolys() <= len(faces) // 2:
                poly = cluster.GetOutput()
        if poly.GetNumberOfPolys() > 1.5 * target:
            dec = vtk.vtkQuadricDecimation()
            dec.SetInputData(poly)
            dec.SetTargetReduction(1.0 - target / poly.GetNumberOfPolys())
            dec.Update()
            poly = dec.GetOutput()
        v = vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
        f = vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3).astype(np.int64)
        if len(f):
            return v, f
    except Exception:  # noqa: BLE001
        pass
    keep = np.linspace(0, len(faces) - 1, target).astype(int)
    return verts, faces[keep]


def _arrays_to_polydata(verts: np.ndarray, faces: np.ndarray):
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray

    pts = vtk.vtkPoints()
    pts.SetData(numpy_to_vtk(np.ascontiguousarray(verts, dtype=np.float64), deep=True))
    offsets = numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64), deep=True)
    conn = numpy_to_vtkIdTypeArray(np.ascontiguousarray(faces.ravel(), dtype=np.int64), deep=True)
    cells = vtk.vtkCellArray()
    cells.SetData(offsets, conn)
    poly = vtk.vtkPolyData()
    poly.SetPoints(pts)
    poly.SetPolys(cells)
    return poly


def _draw_mpl_3d(fig, cell, meshes: list) -> None:
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    ax = fig.add_subplot(cell, projection="3d")
    total = sum(len(f) for _, _, _, f in meshes)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])  # plot in RAS: right-handed like matplotlib's axes
    light = np.array([0.3, 0.9, 0.5])
    light /= np.linalg.norm(light)
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for _name, color, verts, faces in meshes:
        budget = max(200, int(MAX_TRIANGLES_MPL * len(faces) / max(total, 1)))
        v, f = _decimate(verts, faces, budget)
        disp = v * lps_to_ras
        tris = disp[f]
        n = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        n = n / np.where(norm > 0, norm, 1)
        # light both sides: the winding of marching-cubes and VTK triangles differs
        shade = 0.35 + 0.65 * np.abs(n @ light)
        fc = np.clip(np.asarray(color)[None, :] * shade[:, None], 0, 1)
        ax.add_collection3d(Poly3DCollection(tris, facecolors=fc, edgecolors="none", linewidths=0))
        lo = np.minimum(lo, disp.min(0))
        hi = np.maximum(hi, disp.max(0))
    centre = (lo + hi) / 2
    half = max(float((hi - lo).max()) / 2, 1e-3)
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_zlim(centre[2] - half, centre[2] + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.35)
    d = VIEW_DIRECTION_LPS * lps_to_ras
    ax.view_init(elev=float(np.degrees(np.arcsin(d[2] / np.linalg.norm(d)))),
                 azim=float(np.degrees(np.arctan2(d[1], d[0]))))
    ax.set_axis_off()
    ax.set_title("3-D view (from the front, patient's right on the left)", fontsize=11)


def _render_vtk(meshes: list) -> np.ndarray:
    """Render the meshes with VTK offscreen in a child process; returns an RGB(A) float image."""
    import matplotlib.image as mpimg

    with tempfile.TemporaryDirectory(prefix="deepsegrecon-preview-") as tmp:
        tmp = Path(tmp)
        arrays, meta = {}, []
        total = sum(len(f) for _, _, _, f in meshes)
        for n, (name, color, verts, faces) in enumerate(meshes):
            if total > MAX_TRIANGLES_VTK:
                verts, faces = _decimate(verts, faces, max(500, int(MAX_TRIANGLES_VTK * len(faces) / total)))
            arrays[f"v{n}"] = np.asarray(verts, dtype=np.float32)
            arrays[f"f{n}"] = np.asarray(faces, dtype=np.int64)
            meta.append({"name": name, "color": list(color)})
        np.savez(tmp / "meshes.npz", **arrays)
        (tmp / "meshes.json").write_text(json.dumps({
            "meshes": meta, "size": list(VTK_RENDER_SIZE), "view": VIEW_DIRECTION_LPS.tolist()}))
        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "deepsegrecon.preview", "render-3d", str(tmp)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                              timeout=VTK_TIMEOUT_S)
        out = tmp / "render.png"
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise RuntimeError(f"VTK offscreen rendering failed (exit {proc.returncode}): {' | '.join(tail)}")
        return _trim_white(mpimg.imread(out))


def _trim_white(rgb: np.ndarray, margin: float = 0.12) -> np.ndarray:
    """Crop a rendered image to its non-white content, keeping a margin (a fraction of the content size)."""
    ink = np.any(rgb[..., :3] < 0.98, axis=2)
    if not ink.any():
        return rgb
    rows, cols = np.where(ink.any(1))[0], np.where(ink.any(0))[0]
    pad = int(margin * max(rows[-1] - rows[0], cols[-1] - cols[0]))
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, rgb.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, rgb.shape[1])
    return rgb[r0:r1, c0:c1]


def _render_vtk_child(folder) -> int:
    """Child process: render ``meshes.npz`` offscreen to ``render.png``; exit 0 only on a non-blank image."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    folder = Path(folder)
    spec = json.loads((folder / "meshes.json").read_text())
    data = np.load(folder / "meshes.npz")
    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.SetMultiSamples(0)  # FXAA instead: multisampling is slow on software OpenGL (llvmpipe)
    win.SetSize(*spec["size"])
    ren = vtk.vtkRenderer()
    ren.SetBackground(1.0, 1.0, 1.0)
    ren.UseFXAAOn()
    win.AddRenderer(ren)
    for n, m in enumerate(spec["meshes"]):
        poly = _arrays_to_polydata(data[f"v{n}"].astype(np.float64), data[f"f{n}"])
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputData(poly)
        normals.SplittingOff()  # smooth shading; the meshes are closed surfaces
        normals.ConsistencyOff()  # marching cubes and Slicer's surfaces are consistently oriented already
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*m["color"])
        prop.SetDiffuse(0.85)
        prop.SetAmbient(0.15)
        prop.SetSpecular(0.2)
        prop.SetSpecularPower(20)
        ren.AddActor(actor)
    ren.ResetCamera()
    cam = ren.GetActiveCamera()
    focal = np.array(cam.GetFocalPoint())
    dist = cam.GetDistance()
    view = np.asarray(spec["view"], dtype=float)
    view /= np.linalg.norm(view)
    cam.SetPosition(*(focal + dist * view))
    cam.SetViewUp(0.0, 0.0, 1.0)  # superior up
    ren.ResetCamera()
    cam.Zoom(1.15)
    ren.ResetCameraClippingRange()
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.ShouldRerenderOff()  # just rendered
    grab.Update()
    pixels = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
    if pixels.size == 0 or int(pixels.min()) == int(pixels.max()):
        print("the rendered image is blank", file=sys.stderr)
        return 3
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(folder / "render.png"))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return 0


if __name__ == "__main__":  # python -m deepsegrecon.preview render-3d FOLDER (used by _render_vtk)
    if len(sys.argv) == 3 and sys.argv[1] == "render-3d":
        sys.exit(_render_vtk_child(sys.argv[2]))
    print("usage: python -m deepsegrecon.preview render-3d FOLDER", file=sys.stderr)
    sys.exit(2)
