"""Classical reconstructions (FDK, SART, conjugate gradient, ADMM-TV), SART followed by the learned refiner
(``sart-unet``, :mod:`.refiner`) and the data consistency after the network, on the RTK backend when ``itk-rtk``
imports, else on the torch projector (FDK and conjugate gradient only).

Volumes are attenuation (1/mm), (k, j, i) float32 numpy; projections (view, row, column) float32 numpy.
Parameters were chosen on the chest CT's training region (3 mm, 10 noisy views; ``bench_cbct_tuning``).
"""

from __future__ import annotations

import numpy as np

from . import rtk_backend

METHODS = ("dif-gaussian", "fdk", "sart", "cg", "admm-tv", "sart-unet")
CLASSICAL = ("fdk", "sart", "cg", "admm-tv")
BACKENDS = ("auto", "rtk", "torch")
NEEDS_RTK = ("sart", "admm-tv", "sart-unet")
KEYS = {"dif-gaussian": "dif_gaussian", "fdk": "fdk", "sart": "sart", "cg": "cg", "admm-tv": "admm_tv",
        "sart-unet": "sart_unet"}
TITLES = {"dif-gaussian": "DIF-Gaussian", "fdk": "FDK", "sart": "SART", "cg": "conjugate gradient",
          "admm-tv": "ADMM-TV", "sart-unet": "SART + U-Net refiner"}
# chest training region, 10 views: SART 2/4/8 iterations x lambda 0.3/0.6/0.9 (best 8, 0.9: 23.8 dB), CG 5-30
# iterations (22.4 dB, flat after 20), ADMM-TV alpha 1e-4..20 x beta 1e-3..1e4 (best 2, 1000: 23.8 dB)
SART = {"iters": 8, "lam": 0.9}
CG = {"iters": 20}
ADMM = {"iters": 10, "alpha": 2.0, "beta": 1000.0, "cg_iters": 3}
# after the network: SART 2/4/8 x 0.3/0.6 and CG 3-20 from its volume (best SART 8, 0.6: 24.6 dB, network 21.7)
DC = {"solver": "sart", "iters": 8, "lam": 0.6}
# SART iterations (lambda DC["lam"]) after the refiner: 0/2/4/8 on the held-out chest slab's two 10-view cases,
# 4 best (centre 21.7 / 22.7 / 22.7 / 22.7 dB, wide 23.9 / 24.5 / 24.6 / 24.6; SART alone 22.1 and 22.4)
UNET_DC = {"iters": 4}
ITER_RES = 128  # the iterative methods run on at most this many voxels per axis spanning the volume (a 128-pixel
# detector resolves no more), then are resampled to the volume grid: a 512^2 CT costs what a 128^3 one does


def resolve_backend(backend: str = "auto", device: str = "cpu") -> str:
    """'rtk' or 'torch': auto takes RTK when it imports (its CPU solvers beat the torch path even beside a GPU,
    where the network still runs), else torch."""
    if backend == "rtk" and not rtk_backend.available():
        raise RuntimeError("backend 'rtk' was asked for but itk-rtk does not import")
    if backend in ("rtk", "torch"):
        return backend
    return "rtk" if rtk_backend.available() else "torch"


def simulate(mu: np.ndarray, geo, backend: str, device: str = "cpu") -> np.ndarray:
    """Noise-free line integrals of ``mu`` through ``geo``."""
    if backend == "rtk":
        return rtk_backend.forward_project(mu, geo)
    import torch

    from .projector import forward_project

    return forward_project(torch.from_numpy(mu).to(device), geo).cpu().numpy()


def fdk(proj: np.ndarray, geo, backend: str, window: str = "hann", device: str = "cpu") -> np.ndarray:
    if backend == "rtk":
        return rtk_backend.fdk(proj, geo, window)
    import torch

    from .projector import fdk as torch_fdk

    return torch_fdk(torch.from_numpy(proj).to(device), geo, window).cpu().numpy()


def _torch_cg(proj: np.ndarray, geo, iters: int, init: np.ndarray | None, device: str = "cpu") -> np.ndarray:
    """Conjugate gradient on ``A^T A x = A^T p`` with the torch projector (its adjoint by autograd): the fallback
    when RTK is absent (slower)."""
    import torch

    from .projector import forward_project

    p = torch.from_numpy(proj).to(device)
    shape = tuple(reversed(geo.volume_size))

    def normal(x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = forward_project(x, geo, step_voxels=1.0)
            (g,) = torch.autograd.grad(y, x, y.detach())
        return g

    def adjoint(r):
        with torch.enable_grad():
            x = torch.zeros(shape, device=device, requires_grad=True)
            (g,) = torch.autograd.grad(forward_project(x, geo, step_voxels=1.0), x, r)
        return g

    x = torch.zeros(shape, device=device) if init is None else torch.from_numpy(init).to(device).float()
    r = adjoint(p) - (normal(x) if init is not None else 0)
    d, rr = r.clone(), float((r * r).sum())
    for _ in range(int(iters)):
        q = normal(d)
        alpha = rr / max(float((d * q).sum()), 1e-30)
        x = x + alpha * d
        r = r - alpha * q
        rr_new = float((r * r).sum())
        d = r + (rr_new / max(rr, 1e-30)) * d
        rr = rr_new
    return x.cpu().numpy()


def on_grid(mu: np.ndarray, geo_from, geo_to) -> np.ndarray:
    """A (k, j, i) volume on ``geo_from``'s grid resampled trilinearly to ``geo_to``'s (the same box)."""
    if geo_from is geo_to:
        return mu
    import torch

    from .recon import to_grid

    return to_grid(torch.from_numpy(np.ascontiguousarray(mu, np.float32)), geo_to).numpy()


def classical(method: str, proj: np.ndarray, geo, backend: str, window: str = "hann",
              init: np.ndarray | None = None, device: str = "cpu", keep: dict | None = None) -> np.ndarray:
    """One classical reconstruction with the tuned parameters on ``geo``'s grid (the iterative ones on at most
    :data:`ITER_RES` voxels per axis; ``init``: their start volume, on ``geo``'s grid; ``keep``: a dict that
    receives the volume on that iterative grid under the method's name)."""
    if method == "fdk":
        return fdk(proj, geo, backend, window, device)
    from .recon import query_geometry

    geo_i = query_geometry(geo, ITER_RES)
    if init is not None:
        init = on_grid(init, geo, geo_i)
    out = _iterative(method, proj, geo_i, backend, init, device)
    if keep is not None:
        keep[method] = out
    return on_grid(out, geo_i, geo)


def sart_unet(proj: np.ndarray, geo, model, backend: str, sart: np.ndarray | None = None,
              dc_iters: int = 0) -> np.ndarray:
    """SART (:data:`SART`) then the learned refiner ``model`` on the iterative grid (at most :data:`ITER_RES` per
    axis, the grid it was trained on), then ``dc_iters`` SART data-consistency iterations (:data:`DC`), resampled
    to ``geo``'s grid. ``sart``: SART's volume on that grid when already computed."""
    from .projector import hu_to_mu, mu_to_hu
    from .recon import query_geometry
    from .refiner import apply

    geo_i = query_geometry(geo, ITER_RES)
    if sart is None:
        sart = _iterative("sart", proj, geo_i, backend, None, "cpu")
    mu = hu_to_mu(apply(model, mu_to_hu(sart))).clip(min=0.0).astype(np.float32)
    if dc_iters:
        mu = rtk_backend.sart(proj, geo_i, dc_iters, DC["lam"], init=mu)
    return on_grid(mu, geo_i, geo)


def _iterative(method, proj, geo, backend, init, device):
    if method in NEEDS_RTK and backend != "rtk":
        raise RuntimeError(f"{TITLES[method]} needs itk-rtk (backend '{backend}')")
    if method == "sart":
        return rtk_backend.sart(proj, geo, SART["iters"], SART["lam"], init)
    if method == "cg":
        if backend == "rtk":
            return rtk_backend.conjugate_gradient(proj, geo, CG["iters"], init)
        return _torch_cg(proj, geo, CG["iters"], init, device)
    if method == "admm-tv":
        return rtk_backend.admm_tv(proj, geo, ADMM["iters"], ADMM["alpha"], ADMM["beta"], ADMM["cg_iters"], init)
    raise ValueError(f"unknown method '{method}'; use one of {', '.join(CLASSICAL)}")


def data_consistency(mu: np.ndarray, proj: np.ndarray, geo, iters: int = DC["iters"]) -> np.ndarray:
    """RTK's iterative solver (:data:`DC`) started from the network's volume ``mu`` (on ``geo``'s grid): ``iters``
    iterations on at most :data:`ITER_RES` voxels per axis, resampled back to ``geo``'s grid."""
    from .recon import query_geometry

    geo_i = query_geometry(geo, ITER_RES)
    mu = on_grid(mu, geo, geo_i)
    if DC["solver"] == "sart":
        out = rtk_backend.sart(proj, geo_i, iters, DC["lam"], init=mu)
    else:
        out = rtk_backend.conjugate_gradient(proj, geo_i, iters, init=mu)
    return on_grid(out, geo_i, geo)


def available(backend: str) -> tuple:
    """The methods this backend runs."""
    return METHODS if backend == "rtk" else tuple(m for m in METHODS if m not in NEEDS_RTK)


# The task's method unless one is named. On the held-out abdomen (10 views) SART + refiner + 4 SART iterations beat
# SART, the best classical method, by 1.8 dB (DIF-Gaussian + data consistency by 0.6 dB; README, "Measured").
DEFAULT = "sart-unet"
DEFAULT_TORCH = "dif-gaussian"  # without RTK: SART is not available; the network + FDK-residual steps
