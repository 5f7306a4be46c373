"""The X-ray capability's output files, shared by the CLI and the batch: the DRR with its C-arm geometry (NRRD),
the pose as an ITK transform file Slicer reads as a linear transform node, and the registration preview."""

from __future__ import annotations

from pathlib import Path


def write_drr(image, carm: dict, path: Path) -> None:
    """A DRR as NRRD with its C-arm geometry in the header (read back by :func:`xrayio.read_xray`)."""
    import SimpleITK as sitk

    from ..files import atomic_file
    from .xrayio import META_PREFIX

    img = image.to_sitk()
    for key in ("sdd", "delx", "dely", "x0", "y0", "sid", "view"):
        img.SetMetaData(META_PREFIX + key, str(carm[key]))
    with atomic_file(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def write_transform(matrix_lps, path: Path) -> None:
    """An ITK transform file Slicer reads as a linear transform node whose "to parent" is ``matrix_lps``
    (in RAS): ITK files hold the resampling direction (from parent), so the inverse is written."""
    import numpy as np
    import SimpleITK as sitk

    from ..files import atomic_file

    inv = np.linalg.inv(np.asarray(matrix_lps, float))
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(inv[:3, :3].ravel()))
    tx.SetTranslation(tuple(inv[:3, 3]))
    with atomic_file(path) as tmp:
        sitk.WriteTransform(tx, str(tmp))


def read_transform(path):
    """The "to parent" LPS matrix of a transform file written by :func:`write_transform`."""
    import numpy as np
    import SimpleITK as sitk

    tx = sitk.AffineTransform(sitk.ReadTransform(str(path)))
    m = np.eye(4)
    m[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    m[:3, 3] = np.asarray(tx.GetTranslation()) + c - m[:3, :3] @ c
    return np.linalg.inv(m)


def write_preview(xray, result, path: Path) -> None:
    """The preprocessed X-ray, the final DRR and their overlay side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from ..files import atomic_file
    from .xrayio import crop, line_integral, minmax, to_tensor

    drr = result.images["drr"].array[0]
    cols, rows = result.report.get("collimator_crop_px", (0, 0))
    shown = line_integral(crop(xray, rows, cols).array[0], result.report.get("values", "attenuation"))
    xr = to_tensor(shown, *drr.shape)[0, 0].numpy()  # what was registered: cropped, attenuation
    dn = minmax(torch.from_numpy(drr)[None, None])[0, 0].numpy()
    fig, ax = plt.subplots(1, 3, figsize=(9, 3.2))
    for a, img, title in zip(ax, (xr, dn, np.stack([xr, dn, xr], -1)), ("X-ray", "DRR at the pose", "overlay")):
        a.imshow(img, cmap="gray")
        a.set_title(title)
        a.axis("off")
    fig.suptitle(f"NCC {result.report['ncc']:.3f}" + (f", mTRE {result.report['mtre_mm']:.2f} mm"
                                                     if "mtre_mm" in result.report else ""))
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
