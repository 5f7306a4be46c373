"""RTK (``itk-rtk``) as the CPU backend: forward projection, FDK and the iterative classical reconstructions.

Geometry mapping. RTK turns the source about its y axis: at gantry angle t the source is at ``sid * (sin t, 0,
cos t)``, the detector's u axis is ``(cos t, 0, -sin t)`` and its v axis y. :class:`ConeGeometry` turns the source
about the frame's k axis (``dso * (cos a, sin a, 0)``, u ``(-sin a, cos a, 0)``, v ``k``). The rotation
``RTK = (y, z, x)`` of the frame maps one onto the other with t = a, so the volume goes to RTK with that direction
and the projections keep their (view, row, column) layout. Volumes are attenuation (1/mm), (k, j, i) numpy float32.
"""

from __future__ import annotations

import numpy as np

from .geometry import full_circle

try:  # optional: the torch projector is the fallback (and the GPU / differentiable path). ITK loads lazily: the
    import itk  # first filter costs ~20 CPU s and ~1 GB (its wrapped modules), importing this module nothing
    from itk import RTK as rtk
except Exception:  # noqa: BLE001  (a broken wheel raises more than ImportError)
    itk = rtk = None

FRAME_TO_RTK = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # rows: RTK x, y, z


def available() -> bool:
    return rtk is not None


def _need():
    if rtk is None:
        raise RuntimeError("itk-rtk is not installed or does not import; use the torch backend")
    return itk.Image[itk.F, 3]


def set_threads(n: int) -> None:
    _need()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(max(1, int(n)))


def geometry(geo):
    """RTK's circular geometry for ``geo`` (offsets live in the projection image's origin)."""
    _need()
    g = rtk.ThreeDCircularProjectionGeometry.New()
    for a in geo.angles_deg:
        g.AddProjection(geo.dso, geo.dsd, float(a), 0.0, 0.0)
    return g


def _image(arr: np.ndarray, spacing, origin, direction):
    img = itk.image_from_array(np.ascontiguousarray(arr, np.float32))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(itk.matrix_from_array(np.asarray(direction, float)))
    return img


def volume_image(arr: np.ndarray | None, geo):
    """The volume grid in RTK's frame (zeros when ``arr`` is None)."""
    if arr is None:
        arr = np.zeros(tuple(reversed(geo.volume_size)), np.float32)
    origin = FRAME_TO_RTK @ (-geo.half_extent)
    return _image(arr, geo.volume_spacing, origin, FRAME_TO_RTK)


def projection_image(proj: np.ndarray | None, geo):
    """A (view, row, column) stack as RTK projections (zeros when ``proj`` is None)."""
    nv, nu = geo.detector_shape
    if proj is None:
        proj = np.zeros((geo.n_views, nv, nu), np.float32)
    su, sv = geo.detector_spacing
    ou, ov = geo.detector_offset
    origin = (ou - (nu - 1) / 2.0 * su, ov - (nv - 1) / 2.0 * sv, 0.0)
    return _image(proj, (su, sv, 1.0), origin, np.eye(3))


def projection_matrices(geo) -> np.ndarray:
    """(views, 3, 4): frame point (homogeneous, mm) -> detector (column, row, 1) pixel coordinates, via RTK."""
    g = geometry(geo)
    nv, nu = geo.detector_shape
    su, sv = geo.detector_spacing
    ou, ov = geo.detector_offset
    to_pix = np.array([[1 / su, 0, (nu - 1) / 2.0 - ou / su], [0, 1 / sv, (nv - 1) / 2.0 - ov / sv], [0, 0, 1]])
    frame = np.eye(4)
    frame[:3, :3] = FRAME_TO_RTK
    return np.stack([to_pix @ itk.array_from_matrix(g.GetMatrix(i)) @ frame for i in range(geo.n_views)])


def _array(img) -> np.ndarray:
    return np.asarray(itk.array_from_image(img), np.float32)


def forward_project(mu: np.ndarray, geo) -> np.ndarray:
    """Joseph line integrals of ``mu`` (k, j, i): (views, rows, columns)."""
    img = _need()
    g, p, v = geometry(geo), projection_image(None, geo), volume_image(mu, geo)  # referenced until Update
    f = rtk.JosephForwardProjectionImageFilter[img, img].New()
    f.SetInput(0, p)
    f.SetInput(1, v)
    f.SetGeometry(g)
    f.Update()
    return _array(f.GetOutput())


def _parker(proj_img, geo, g):

    if full_circle(geo.angles_deg):
        return proj_img
    p = rtk.ParkerShortScanImageFilter[_need()].New()
    p.SetInput(proj_img)
    p.SetGeometry(g)
    p.Update()
    return p.GetOutput()


def fdk(proj: np.ndarray, geo, window: str = "hann", cut: float = 1.0) -> np.ndarray:
    """FDK (Parker weights for a short scan): ``window`` 'ram-lak', 'shepp-logan' or 'hann' (cut-off ``cut`` x
    Nyquist)."""
    img = _need()
    g, v = geometry(geo), volume_image(None, geo)
    p = _parker(projection_image(proj, geo), geo, g)
    f = rtk.FDKConeBeamReconstructionFilter[img].New()
    f.SetInput(0, v)
    f.SetInput(1, p)
    f.SetGeometry(g)
    ramp = f.GetRampFilter()
    if window == "hann":
        ramp.SetHannCutFrequency(float(cut))
    elif window == "shepp-logan":
        ramp.SetSheppLoganCutFrequency(float(cut))
    elif window != "ram-lak":
        raise ValueError(f"unknown FDK window '{window}'; use ram-lak, shepp-logan or hann")
    ramp.SetTruncationCorrection(0.0)
    f.Update()
    return _array(f.GetOutput())


def _joseph(f):
    f.SetForwardProjectionFilter(f.ForwardProjectionType_FP_JOSEPH)
    f.SetBackProjectionFilter(f.BackProjectionType_BP_JOSEPH)


def _run(filt, geo, proj, init):
    g, v, p = geometry(geo), volume_image(init, geo), projection_image(proj, geo)  # referenced until Update
    filt.SetInput(0, v)
    filt.SetInput(1, p)
    filt.SetGeometry(g)
    filt.Update()
    return _array(filt.GetOutput())


def sart(proj: np.ndarray, geo, iters: int = 4, lam: float = 0.5, init: np.ndarray | None = None,
         positivity: bool = True) -> np.ndarray:
    """SART: ``iters`` passes over the views with relaxation ``lam``; ``x >= 0`` when ``positivity``."""
    img = _need()
    f = rtk.SARTConeBeamReconstructionFilter[img, img].New()
    f.SetNumberOfIterations(int(iters))
    f.SetLambda(float(lam))
    f.SetEnforcePositivity(bool(positivity))
    return _run(f, geo, proj, init)


def conjugate_gradient(proj: np.ndarray, geo, iters: int = 10, init: np.ndarray | None = None,
                       tikhonov: float = 0.0) -> np.ndarray:
    """Conjugate gradient on the least-squares problem ``|A x - p|^2 (+ tikhonov |x|^2)`` from ``init``."""
    img = _need()
    f = rtk.ConjugateGradientConeBeamReconstructionFilter[img].New()
    f.SetNumberOfIterations(int(iters))
    f.SetTikhonov(float(tikhonov))
    f.SetDisableDisplacedDetectorFilter(True)
    return _run(f, geo, proj, init)


def admm_tv(proj: np.ndarray, geo, iters: int = 10, alpha: float = 1.0, beta: float = 1000.0, cg_iters: int = 3,
            init: np.ndarray | None = None) -> np.ndarray:
    """ADMM with a total-variation penalty (``alpha``: TV weight, ``beta``: augmented-Lagrangian weight)."""
    img = _need()
    f = rtk.ADMMTotalVariationConeBeamReconstructionFilter[img].New()
    f.SetAL_iterations(int(iters))
    f.SetCG_iterations(int(cg_iters))
    f.SetAlpha(float(alpha))
    f.SetBeta(float(beta))
    f.SetDisableDisplacedDetectorFilter(True)
    return _run(f, geo, proj, init)
