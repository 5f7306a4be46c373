"""Reference labelling of the upper teeth of ``Cranium.inv3`` (Debian's ``invesalius-examples``), and the yardstick
the teeth pipeline is measured with on it (``Testing/Python/teeth/test_teeth_real_cranium.py``, ``make bench``'s
``teeth_real_cranium``).

The scan: a real head CT, 256 x 256 x 108 voxels of 0.957 x 0.957 x 1.5 mm, read with the project's reader
(:func:`deepsegrecon.io.read_image`, rows posterior -> anterior: direction diag(1, -1, 1)). Its lowest slices cut
through the crowns of the upper teeth; their roots run up through the alveolar bone to about 20 mm above the
lowest slice. No lower teeth are in the scan. Left and right cannot be told from it (no DICOM header is left), so
FDI numbers on it are judged up to a left-right mirror.

How the labelling is made (deterministic, from the Debian file; every number below was chosen by looking at the
axial slices):

1. the dental region: matrix indices k < 16 (24 mm), rows j 150-231, columns i 85-174 (:data:`BOX`);
2. threshold: dentin and enamel at >= :data:`CORE_HU` (1300 HU). Dentin reads 1450-2100 HU (slice medians), the
   socket bone and the palate mostly 600-1250 HU, so the roots come out as islands inside the bone; small holes
   (pulp, root canals, at most :data:`PULP_MAX_VOXELS` voxels in a slice) are filled;
3. one seed per tooth, placed by hand in the crowns (:data:`SEEDS`, three slices each, moved to the deepest point
   of the thresholded crown within 3 voxels): marker watershed of the distance map, i.e. region growing from the
   seeds within the threshold, the crowns that touch split at their narrowest neck; everything the seeds do not
   reach (mandibular rami, bits of cortical bone above the apices) is left out; one manual cut
   (:data:`TOP_SLICE`): 23's apex touches the buccal cortical plate at k = 11 and the growth would run up the
   plate to k = 14;
4. the partial-volume rim: voxels next to a tooth in the slice (4-neighbourhood), at >= :data:`RIM_HU` (1000 HU,
   about halfway between dentin and its surroundings: soft tissue near 50 HU around the crowns, 550 HU for the
   ligament and bone around the roots), join that tooth;
5. FDI numbers from the arch order: per side central incisor, lateral incisor, canine, then one premolar and the
   molars. 11 teeth: 11 12 13 15 16 17 and 21 22 23 25 27. Each side keeps one premolar (as after orthodontic
   extractions): whether it is the first or the second cannot be told at this resolution, so 14/15 and 24/25 are
   both accepted (:data:`FDI_ALTERNATIVES`); 26 is missing (a 15 mm gap between the premolar and the molar on that
   side; the molar there mirrors 17's position). Which side is the patient's right is an assumption (columns as
   in DICOM, right -> left).

The labelmap (the dental region only, with its geometry) is kept in ``cranium_upper_teeth.seg.nrrd`` next to this
script (a few kB); ``python Testing/Data/make_cranium_teeth_reference.py`` writes it again and the preview
``Resources/Screenshots/SegmentTeeth_cranium_reference.png``; ``--check`` only confirms that the file matches a
fresh run. The CT itself stays in the Debian package (``apt-get install invesalius-examples``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "DeepSegRecon") not in sys.path:
    sys.path.insert(0, str(ROOT / "DeepSegRecon"))

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
REFERENCE = Path(__file__).resolve().parent / "cranium_upper_teeth.seg.nrrd"
PREVIEW = ROOT / "Resources" / "Screenshots" / "SegmentTeeth_cranium_reference.png"
MISSING = f"{CRANIUM} is missing: apt-get install invesalius-examples (make test installs it when it can)"

BOX = ((0, 16), (150, 232), (85, 175))  # (k, j, i) matrix index ranges of the dental region
CORE_HU = 1300.0
RIM_HU = 1000.0
PULP_MAX_VOXELS = 12
SEED_SLICES = (1, 2, 3)
SEED_SNAP = 3  # voxels
# {FDI: (i, j)} matrix column and row of each crown near the lowest slices (patient's right = low i, as DICOM)
SEEDS = {11: (124, 213), 12: (119, 208), 13: (115, 203), 15: (112, 197), 16: (110, 189), 17: (107, 178),
         21: (136, 213), 22: (143, 207), 23: (148, 201), 25: (152, 195), 27: (156, 180)}
# manual cuts: {FDI: highest slice k of the tooth}; above it the growth runs along the cortical bone
TOP_SLICE = {23: 11}
FDI_ALTERNATIVES = {15: (14, 15), 25: (24, 25)}

# The bar of issue 19 for the shipped pipeline on this scan
MIN_TEETH_FOUND = 10
MAX_HEIGHT_MM = 20.0
FOUND_DICE = 0.5  # a reference tooth counts as found when one predicted tooth covers it with at least this Dice


def read_cranium(path=CRANIUM):
    """The CT, in HU, as the project reads it (LPS, rows posterior -> anterior)."""
    from deepsegrecon.io import read_image

    return read_image(path)


def crop(image, box=BOX):
    """The region ``box`` ((k0, k1), (j0, j1), (i0, i1)) of ``image`` as an Image with its own geometry."""
    from deepsegrecon.image import Image

    (k0, k1), (j0, j1), (i0, i1) = box
    origin = image.physical_points(np.array([[i0, j0, k0]]))[0]
    return Image(np.ascontiguousarray(image.array[k0:k1, j0:j1, i0:i1]), image.spacing, tuple(origin),
                 image.direction.copy())


def label_teeth(ct: np.ndarray, spacing, seeds: dict, box=BOX) -> np.ndarray:
    """Steps 2-4 of the module docstring on the dental region ``ct`` ((k, j, i) HU array); ``seeds`` in matrix
    indices of the whole scan. Returns a uint8 labelmap of FDI numbers."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    (k0, _), (j0, _), (i0, _) = box
    sp = np.asarray(spacing, float)[::-1]  # (k, j, i) mm
    core = ct >= CORE_HU
    for k in range(core.shape[0]):  # small holes: pulp and root canals
        holes = ndi.binary_fill_holes(core[k]) & ~core[k]
        lab, n = ndi.label(holes)
        if n:
            small = np.bincount(lab.ravel()) <= PULP_MAX_VOXELS
            small[0] = False
            core[k] |= small[lab]
    dist = ndi.distance_transform_edt(core, sampling=sp)
    markers = np.zeros(ct.shape, np.int32)
    r = SEED_SNAP
    for fdi, (i, j) in seeds.items():
        for k in SEED_SLICES:
            kk, jj, ii = k - k0, j - j0, i - i0
            win = dist[kk, jj - r:jj + r + 1, ii - r:ii + r + 1]
            if win.max() <= 0:
                raise ValueError(f"the seed of tooth {fdi} at (i {i}, j {j}, k {k}) is not in a tooth")
            dj, di = np.unravel_index(np.argmax(win), win.shape)
            markers[kk, jj - r + dj, ii - r + di] = fdi
    lab = watershed(-dist, markers, mask=core, connectivity=1)
    for fdi, top in TOP_SLICE.items():
        above = lab[top - k0 + 1:]
        above[above == fdi] = 0
    # partial-volume rim: one step in the slice into voxels >= RIM_HU, to the touching tooth (lowest FDI on ties)
    four = np.zeros((3, 3, 3), bool)
    four[1] = ndi.generate_binary_structure(2, 1)
    grown = lab.copy()
    for fdi in sorted(seeds, reverse=True):
        ring = ndi.binary_dilation(lab == fdi, four) & (lab == 0) & (ct >= RIM_HU)
        grown[ring] = fdi
    return grown.astype(np.uint8)


def make_reference(ct_image=None):
    """The reference labelmap (an Image on the dental region's grid, values FDI numbers)."""
    ct_image = read_cranium() if ct_image is None else ct_image
    region = crop(ct_image)
    return region.with_array(label_teeth(region.array, region.spacing, SEEDS), task="teeth-reference")


def as_result(labelmap):
    from deepsegrecon.results import SegmentationResult
    from deepsegrecon.teeth import labels as L

    present = [int(v) for v in np.unique(labelmap.array) if v]
    return SegmentationResult(labelmap, L.segment_infos(present), [],
                              {"source": "Testing/Data/make_cranium_teeth_reference.py", "fdi_alternatives":
                               {str(k): list(v) for k, v in FDI_ALTERNATIVES.items()}})


def write_reference(labelmap, path=REFERENCE):
    from deepsegrecon.segio import write_seg_nrrd

    return write_seg_nrrd(as_result(labelmap), path, compression_level=9)


def load_reference(path=REFERENCE):
    """The stored reference labelmap (made again from the Debian file when the stored one is absent)."""
    from deepsegrecon.segio import read_seg_nrrd

    if Path(path).is_file():
        return read_seg_nrrd(path).labelmap
    return make_reference()


def on_grid(labelmap, grid):
    """``labelmap`` placed on ``grid`` (an Image with the same spacing and direction; integer voxel offset)."""
    off = np.linalg.solve(grid.ijk_to_lps(), labelmap.ijk_to_lps() @ [0, 0, 0, 1])[:3]
    o = np.round(off).astype(int)
    if not (np.allclose(off, o, atol=1e-3) and np.allclose(labelmap.spacing, grid.spacing, atol=1e-4)
            and np.allclose(labelmap.direction, grid.direction, atol=1e-4)):
        raise ValueError("the labelmap is not on a sub-grid of the scan")
    out = np.zeros(grid.array.shape, labelmap.array.dtype)
    k, j, i = labelmap.array.shape
    out[o[2]:o[2] + k, o[1]:o[1] + j, o[0]:o[0] + i] = labelmap.array
    return out


def _mirror(fdi: int) -> int:
    q, p = divmod(int(fdi), 10)
    return {1: 2, 2: 1, 3: 4, 4: 3}.get(q, q) * 10 + p


def head_middle_y(ct_image) -> float:
    """LPS y (mm) of the middle of the head from front to back (the body: voxels above -300 HU)."""
    idx = np.argwhere(ct_image.array > -300)[:, ::-1]
    y = ct_image.physical_points(idx)[:, 1]
    return float((y.min() + y.max()) / 2)


def compare(pred: np.ndarray, ref: np.ndarray, ct_image) -> dict:
    """Scores of a teeth labelmap ``pred`` (on the scan's grid) against the reference ``ref`` (same grid).

    A reference tooth is matched to the predicted tooth (any label 11-48) that overlaps it most; Dice per
    reference tooth against that predicted tooth; found = Dice >= FOUND_DICE. FDI agreement: the share of
    reference teeth whose match carries their number, with the numbers as they are or mirrored left-right
    (whichever agrees more; premolar alternatives accepted). The issue's bar: at least MIN_TEETH_FOUND teeth
    found, no lower teeth, no tooth voxel more than MAX_HEIGHT_MM above the lowest slice or in the back half
    of the head."""
    from deepsegrecon.teeth import labels as L

    tooth = np.isin(pred, L.FDI)
    pred_teeth = sorted(int(v) for v in np.unique(pred[tooth]))
    ref_teeth = sorted(int(v) for v in np.unique(ref) if v)
    per_tooth, matches = {}, {}
    for r in ref_teeth:
        m = ref == r
        hits = np.bincount(pred[m & tooth].astype(np.int64), minlength=49)
        p = int(np.argmax(hits)) if hits.any() else 0
        dice = 2.0 * hits[p] / (m.sum() + np.count_nonzero(pred == p)) if p else 0.0
        matches[r] = p
        per_tooth[str(r)] = {"matched": p or None, "dice": round(float(dice), 4),
                             "found": bool(dice >= FOUND_DICE), "voxels": int(m.sum())}

    def agree(mapping):
        return sum(1 for r, p in matches.items() if p and mapping(p) in FDI_ALTERNATIVES.get(r, (r,)))

    direct, mirrored = agree(lambda p: p), agree(_mirror)
    found = [int(r) for r, v in per_tooth.items() if v["found"]]
    # where the predicted teeth are
    idx = np.argwhere(tooth)  # (k, j, i)
    k_low = 0 if ct_image.direction[2, 2] > 0 else ct_image.array.shape[0] - 1  # the lowest slice
    z_low = ct_image.physical_points(np.array([[0, 0, k_low]]))[0, 2]
    y_mid = head_middle_y(ct_image)
    if len(idx):
        pts = ct_image.physical_points(idx[:, ::-1])
        height = pts[:, 2] - z_low
        max_height = float(height.max())
        n_high = int(np.count_nonzero(height > MAX_HEIGHT_MM))
        n_back = int(np.count_nonzero(pts[:, 1] > y_mid))
    else:
        max_height, n_high, n_back = None, 0, 0
    in_ref = ref > 0
    outside = {}
    for p in pred_teeth:
        m = pred == p
        share = float(np.count_nonzero(m & in_ref) / np.count_nonzero(m))
        if share < 0.5:
            c = ct_image.physical_points(np.argwhere(m)[:, ::-1]).mean(0)
            outside[str(p)] = {"share_on_reference_teeth": round(share, 3), "centroid_lps": [round(float(v), 1)
                                                                                             for v in c]}
    lower = [p for p in pred_teeth if not L.is_upper(p)]
    dices = [v["dice"] for v in per_tooth.values()]
    result = {
        "reference_teeth": ref_teeth, "predicted_teeth": pred_teeth, "teeth_found": len(found),
        "found": sorted(found), "dice_per_tooth": {k: v["dice"] for k, v in per_tooth.items()},
        "mean_dice": round(float(np.mean(dices)), 4) if dices else 0.0, "per_tooth": per_tooth,
        "fdi_agreement_up_to_mirror": round(max(direct, mirrored) / len(ref_teeth), 4) if ref_teeth else 0.0,
        "fdi_agreement_as_is": direct, "fdi_agreement_mirrored": mirrored,
        "predicted_lower_teeth": lower, "predicted_off_reference": outside,
        "tooth_voxels": int(len(idx)), "max_tooth_height_above_lowest_slice_mm":
            None if max_height is None else round(max_height, 1),
        "tooth_voxels_above_20mm": n_high, "tooth_voxels_in_back_half": n_back,
    }
    result["bar_failures"] = bar_failures(result)
    result["meets_bar"] = not result["bar_failures"]
    return result


def bar_failures(m: dict) -> list:
    """The issue's bar on this scan, as a list of what fails (empty: met)."""
    fails = []
    if m["teeth_found"] < MIN_TEETH_FOUND:
        fails.append(f"{m['teeth_found']} upper teeth found in the mouth (Dice >= {FOUND_DICE}), at least "
                     f"{MIN_TEETH_FOUND} needed")
    if m["predicted_lower_teeth"]:
        fails.append(f"lower teeth claimed: {m['predicted_lower_teeth']}")
    if m["tooth_voxels_above_20mm"]:
        fails.append(f"{m['tooth_voxels_above_20mm']} tooth voxels more than {MAX_HEIGHT_MM:g} mm above the lowest "
                     f"slice (highest {m['max_tooth_height_above_lowest_slice_mm']} mm)")
    if m["tooth_voxels_in_back_half"]:
        fails.append(f"{m['tooth_voxels_in_back_half']} tooth voxels in the back half of the head")
    return fails


def write_preview_png(ct_region, labelmap, path=PREVIEW, slices=(0, 2, 4, 6, 8, 10)) -> Path:
    """Axial slices of the dental region (seen from the feet, anterior up, patient's right on the left) with the
    teeth coloured and numbered, and a view from the front (maximum intensity of the labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepsegrecon.files import atomic_file
    from deepsegrecon.teeth import labels as L

    lab, ct = labelmap.array, ct_region.array
    teeth = [int(v) for v in np.unique(lab) if v]
    lut = np.zeros((256, 3))
    for f in teeth:
        lut[f] = L.color(f)
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.6), dpi=110)
    sj, si = labelmap.spacing[1], labelmap.spacing[0]

    def show(ax, grey, labels, extent, title, text=True):
        ax.imshow(np.clip((grey + 200) / 2700, 0, 1), cmap="gray", extent=extent, origin="upper",
                  interpolation="nearest")
        rgba = np.zeros(labels.shape + (4,))
        rgba[..., :3] = lut[labels]
        rgba[..., 3] = np.where(labels > 0, 0.5, 0)
        ax.imshow(rgba, extent=extent, origin="upper", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    # rows run posterior -> anterior: flip them so that anterior is up
    extent = (0, lab.shape[2] * si, 0, lab.shape[1] * sj)
    for ax, k in zip(axes.ravel(), slices):
        show(ax, ct[k, ::-1], lab[k, ::-1], extent, f"axial, {k * labelmap.spacing[2]:.1f} mm above the lowest slice")
        for f in teeth:
            jj, ii = np.nonzero(lab[k] == f)
            if len(jj) >= 3:
                ax.text((ii.mean() + 0.5) * si, (jj.mean() + 0.5) * sj, str(f), color="white", fontsize=7,
                        ha="center", va="center", fontweight="bold")
    # from the front: maximum along the rows; superior up
    ax = axes.ravel()[6]
    front_lab = np.zeros(lab.shape[::2], int)
    depth = np.full(lab.shape[::2], -1)
    for j in range(lab.shape[1]):  # the most anterior tooth voxel wins (largest j)
        m = lab[:, j, :] > 0
        front_lab[m] = lab[:, j, :][m]
        depth[m] = j
    show(ax, ct.max(1)[::-1], front_lab[::-1], (0, lab.shape[2] * si, 0, lab.shape[0] * labelmap.spacing[2]),
         "from the front (patient's right on the left)")
    ax.set_aspect("equal")
    ax = axes.ravel()[7]
    ax.axis("off")
    vox = float(np.prod(labelmap.spacing))
    rows = [f"{f}: {np.count_nonzero(lab == f) * vox / 1000:.2f} cm3" for f in teeth]
    ax.text(0.0, 1.0, f"Cranium.inv3 upper teeth, reference\n{len(teeth)} teeth (FDI up to a left-right "
            "mirror;\n15/25 may be 14/24)\n\n" + "\n".join(rows), va="top", fontsize=8, family="monospace")
    fig.suptitle("Reference labelling: threshold 1300 HU, seeded watershed, 1000 HU rim "
                 "(Testing/Data/make_cranium_teeth_reference.py)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the stored file matches a fresh run")
    ap.add_argument("--out", default=str(REFERENCE))
    ap.add_argument("--preview", default=str(PREVIEW))
    args = ap.parse_args(argv)
    if not CRANIUM.is_file():
        print(MISSING, file=sys.stderr)
        return 2
    ct = read_cranium()
    ref = make_reference(ct)
    teeth = [int(v) for v in np.unique(ref.array) if v]
    if args.check:
        stored = load_reference(args.out)
        same = stored.same_grid(ref) and np.array_equal(stored.array, ref.array)
        print(f"{args.out}: {'matches' if same else 'DIFFERS FROM'} a fresh run ({len(teeth)} teeth)")
        return 0 if same else 1
    write_reference(ref, args.out)
    write_preview_png(crop(ct), ref, args.preview)
    vox = float(np.prod(ref.spacing))
    print(f"{len(teeth)} teeth: " + ", ".join(f"{f} ({np.count_nonzero(ref.array == f) * vox:.0f} mm3)"
                                             for f in teeth))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes) and {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
