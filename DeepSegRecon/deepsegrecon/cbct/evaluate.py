"""Accuracy of CBCT reconstruction weights on held-out real CT (PSNR/SSIM): the DIF-Gaussian network on the
chest CT's held-out slab, the SART refiner on the held-out abdomen and that slab. Shared by the training scripts
(the figures in a version's manifest), the tests and ``make bench``."""

from __future__ import annotations

import numpy as np
import torch


def evaluate_dif_gaussian(model, views=(6, 8, 10), detector: int = 128, seed: int = 1) -> dict:
    """Held-out chest slab: DIF-Gaussian and FDK PSNR/SSIM per case and view count."""
    from .data import chest_ct_path, chest_split, heldout_cases, load_ct
    from .geometry import geometry_for_grid
    from .projector import add_noise, fdk, forward_project, hu_to_mu, mu_to_hu
    from .recon import metrics, reconstruct, value_to_hu

    _, held = chest_split(load_ct(chest_ct_path()))
    out = {}
    for name, case in heldout_cases(held):
        for n in views:
            geo = geometry_for_grid(case, n, detector=detector)
            proj = add_noise(forward_project(hu_to_mu(torch.from_numpy(case.array)), geo), seed=seed)
            rec = value_to_hu(reconstruct(model, proj, geo)).numpy()
            f = mu_to_hu(fdk(proj, geo)).numpy()
            out[f"{name}/{n}"] = {"dif_gaussian": metrics(rec, case.array), "fdk": metrics(f, case.array)}
    return out


def abdomen_3mm():
    """The held-out abdomen (3D-IRCADb-01 patient 1) at 3 mm: evaluation only, never trained on."""
    from ..io import read_image
    from .data import dicom_ct_dir, resample_iso

    return resample_iso(read_image(dicom_ct_dir().parents[1] / "ct_volumes_2mm" / "ircadb1_1_abdomen.nii.gz"), 3.0)


def psnr_vol(model, pair) -> tuple:
    """(SART PSNR, refined PSNR) of one pair, in the metrics window."""
    from .recon import metrics
    from .refiner import apply

    tgt = pair["target"].astype(np.float32)
    sart = pair["sart"].astype(np.float32)
    return metrics(sart, tgt)["psnr_db"], metrics(apply(model, sart), tgt)["psnr_db"]


def evaluate_refiner(model, views=(6, 8, 10), dc_iters=None) -> dict:
    """PSNR/SSIM of SART and SART + refiner (+ ``dc_iters`` SART iterations; default: none and the task's) on the
    held-out abdomen and the held-out chest slab's two cases, noisy views simulated as the task does (seed 0)."""
    from . import methods as M
    from .data import chest_ct_path, chest_split, heldout_cases, load_ct
    from .geometry import geometry_for_grid
    from .projector import add_noise, hu_to_mu, mu_to_hu
    from .recon import metrics

    _, held = chest_split(load_ct(chest_ct_path()))
    out = {}
    for name, case in [("abdomen-3mm", abdomen_3mm())] + heldout_cases(held):
        for n in views:
            geo = geometry_for_grid(case, n, detector=128)
            proj = add_noise(torch.from_numpy(M.simulate(hu_to_mu(case.array), geo, "rtk")), 1e5, 10.0, 0).numpy()
            kept = {}
            row = {"sart": metrics(mu_to_hu(M.classical("sart", proj, geo, "rtk", keep=kept)), case.array)}
            for d in (0, M.UNET_DC["iters"]) if dc_iters is None else dc_iters:
                hu = mu_to_hu(M.sart_unet(proj, geo, model, "rtk", kept["sart"], d))
                row["sart_unet" + ("" if d == M.UNET_DC["iters"] else f"_dc{d}")] = metrics(hu, case.array)
            out[f"{name}/{n}"] = {k: v["psnr_db"] for k, v in row.items()} | \
                {k + "_ssim": v["ssim"] for k, v in row.items()}
    return out
