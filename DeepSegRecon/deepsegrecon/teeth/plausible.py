"""Plausibility gate: do the pieces the networks call teeth form a real dentition?

The networks were trained on jaw phantoms only; on a skull, a chest or an abdomen they fire on sinus walls,
vertebrae or ribs. Two checks follow them:

1. Before stage 2 (:func:`dental_window`): the stage-1 teeth mask is cut to the window the size of a whole
   dentition (both arches, open mouth, head tilted) that holds most of it. Stage 2 runs only there, so its box,
   run time and memory are bounded whatever the field of view.
2. After the numbering (:func:`gate`), in LPS millimetres: each piece must have a tooth's volume, length, width,
   thickness (not a plate) and brightness (dentin and enamel); the pieces must fit in a dentition-sized span,
   stand nearly parallel (their median lean) in one or two layers across that direction (the jaws), each with a tooth
   beside it in its jaw or opposite it in the other jaw, at most 32 of them. Pieces that fail are dropped and named
   in the report; when fewer than 4 teeth hang together, the whole result is withheld (:class:`NoTeethFound`,
   exit code 2: the image shows no dental arch to segment).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

# A whole dentition fits in this box (mm; canonical axes S, P, L): both arches with roots (upper and lower teeth
# are 16-27 mm long; an open mouth adds up to 25 mm), an arch 45-60 mm deep and 55-75 mm wide, a head tilted 15 deg.
DENTAL_BOX_MM = (75.0, 75.0, 85.0)
CELL_MM = 4.0  # the window is searched on cells this large

# Tooth size and shape (crown + root). Published averages (Wheeler's dental anatomy; Ash & Nelson): total length
# 16 mm (lower central incisor) to 27 mm (upper canine, up to about 32 mm); crowns 5-11.5 mm mesiodistal and
# 6-11.5 mm buccolingual; volumes 250-1100 mm3 (the phantoms span the same: 235-1190 mm3, 16-29 mm, 5-12 mm).
MIN_TOOTH_MM3 = 60.0  # whole teeth are >= 250 mm3; one the networks saw in part (an incisor crown: 90) still counts
MAX_TOOTH_MM3 = 2000.0  # about twice the largest molar
MAX_LENGTH_MM = 36.0  # longest extent (the longest canines are about 32 mm)
MAX_WIDTH_MM = 24.0  # second extent: molar crowns and flared roots are up to about 13 mm; two merged: 22
# third extent: teeth are about as thick as wide (crowns 5-11.5 x 6-11.5 mm; third / second extent 0.7-1 on the
# phantoms, down to 0.5 after the networks, two merged incisors); a plate (the networks' misfires on the walls of a
# skull's sinuses: 0.16-0.35) is not a tooth
MIN_THICKNESS_MM = 3.0
MIN_ROUNDNESS = 0.4
# Teeth are the densest tissue: dentin 1500-2500 HU and enamel 2500-3000+ HU on CT; on the phantoms (HU, and the
# uncalibrated grey scale of family B) the 90th percentile of every tooth is >= 1600; bone at CT resolution stays
# below about 1000 (the abdominal CT's "teeth" on the spine: <= 1000).
MIN_BRIGHTNESS = 1200.0  # 90th percentile of a piece's values (the networks' HU-like scale)
# Metal is not a tooth: a piece mostly at metal's values is a filling on its own, an implant or an object (the real
# chest CT's shoulder piece: 56-82 % of voxels >= 3000); phantom teeth with metal crowns stay below 47 %.
METAL_VALUE = 3000.0
MAX_METAL_SHARE = 0.5

MAX_TEETH = 32
MIN_TEETH = 4  # fewer tooth-like pieces do not show an arch: the result is withheld


class NoTeethFound(InputError):
    """The image shows no dental arch: nothing is segmented (exit code 2, input refused)."""


CORE_MM = 3.0  # the window goes where the mask is thick (crowns are 5-11 mm across) ...
MIN_CORE_MM3 = 300.0  # ... not where it is thin (skull tables, sinus walls, plates a network takes for teeth)


def thick_core(mask: np.ndarray, spacing) -> np.ndarray:
    """``mask`` opened by about :data:`CORE_MM` (less where that leaves under :data:`MIN_CORE_MM3`)."""
    from scipy import ndimage as ndi

    sp = np.asarray(spacing, float)
    cross = ndi.generate_binary_structure(3, 1)
    for r in range(max(1, int(round(CORE_MM / float(sp.mean())))), 0, -1):
        core = ndi.binary_opening(mask, structure=cross, iterations=r)
        if np.count_nonzero(core) * float(np.prod(sp)) >= MIN_CORE_MM3:
            return core
    return mask


CROWN_LEVEL_MM = 5.0  # pieces off the crowns' height by more than this, and not joined to a crown, are dropped


def near_crowns(mask: np.ndarray, spacing) -> np.ndarray:
    """The pieces of ``mask`` (canonical grid, axis 0 the height) joined to its thick core (the crowns, roots with
    them) or lying at the core's height; what lies above or below on its own (nasal walls, the palate, the skull
    base) is dropped, so stage 2's box holds the teeth only."""
    from scipy import ndimage as ndi

    core = thick_core(mask, spacing)
    if core is mask or not core.any():
        return mask
    lab, n = ndi.label(mask)
    z = np.nonzero(core.any((1, 2)))[0]
    pad = int(round(CROWN_LEVEL_MM / float(spacing[0])))
    level = np.zeros(mask.shape[0], bool)
    level[max(0, z.min() - pad):z.max() + pad + 1] = True
    keep = np.zeros(n + 1, bool)
    keep[np.unique(lab[core])] = True
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        if sl is not None and level[sl[0]].any():
            keep[i] = True
    keep[0] = False
    return keep[lab]


def dental_window(mask: np.ndarray, spacing, box_mm=DENTAL_BOX_MM):
    """The part of ``mask`` (stage-1 teeth, canonical grid of ``spacing`` mm) inside the dentition-sized window
    that holds most of its thick core (:func:`thick_core`), and that window (lo, hi) in voxels; the mask itself
    when it fits in one window."""
    sp = np.asarray(spacing, float)
    shape = np.array(mask.shape)
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return mask, (np.zeros(3, int), shape)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx]) + 1
    win = np.maximum(np.round(np.asarray(box_mm) / sp).astype(int), 1)
    if np.all(hi - lo <= win):
        return mask, (lo, hi)
    # voxel counts of the mask's thick parts in cells of about CELL_MM, then the window (in cells) with the largest sum
    core = np.nonzero(thick_core(mask, sp))
    c = np.maximum(np.round(CELL_MM / sp).astype(int), 1)
    n = -(-shape // c)
    cells = np.zeros(n, np.int64)
    np.add.at(cells, tuple(i // k for i, k in zip(core, c)), 1)
    w = np.minimum(-(-win // c), n)
    sat = np.zeros(n + 1, np.int64)
    sat[1:, 1:, 1:] = cells.cumsum(0).cumsum(1).cumsum(2)
    a, b, d = (np.arange(n[k] - w[k] + 1) for k in range(3))
    A, B, D = np.ix_(a, b, d)
    sums = (sat[A + w[0], B + w[1], D + w[2]] - sat[A, B + w[1], D + w[2]] - sat[A + w[0], B, D + w[2]]
            - sat[A + w[0], B + w[1], D] + sat[A, B, D + w[2]] + sat[A, B + w[1], D] + sat[A + w[0], B, D]
            - sat[A, B, D])
    best = np.array(np.unravel_index(int(np.argmax(sums)), sums.shape))
    wlo = best * c
    whi = np.minimum((best + w) * c, shape)
    out = np.zeros_like(mask)
    sl = tuple(slice(a, b) for a, b in zip(wlo, whi))
    out[sl] = mask[sl]
    return out, (wlo, whi)


# The teeth of a dentition: their centroids fit in this span (mm; LPS x left-right, y front-back, z up-down: molars
# 45-60 mm apart across, incisors to third molars 45-50 mm deep, upper and lower centroids 15-45 mm apart, a head
# tilted 15 deg), and each has a neighbour (the next tooth along the arch, 6-11 mm away, or the opposing tooth)
# within NEIGHBOUR_MM: one missing tooth leaves up to 19 mm between the centroids of its neighbours.
ARCH_SPAN_MM = (75.0, 65.0, 60.0)
NEIGHBOUR_MM = 20.0
# Teeth stand across the occlusal plane: their long axes agree within about 30 deg (incisors lean forward; single
# pieces the networks cut or merged along the arch may lie flat, so only the median lean is checked), and
# the centroids of one jaw lie in a layer across that direction (crown and root lengths, the curve of Spee: a few
# mm); the two jaws' layers are 15-45 mm apart.
MEDIAN_LEAN_DEG = 20.0  # the teeth stand nearly parallel: the median lean of their long axes from the common one
ELONGATED = 1.4  # ... counting the pieces whose long axis is clear: length / width at least this
LAYER_MM = 10.0  # the most a tooth's centroid may lie off its jaw's layer (its median height)
JAWS_APART_MM = 10.0  # two layers when the heights split into two groups this far apart
OPPOSING_MM = 10.0  # an upper and a lower tooth oppose when their centroids are this close across the normal


def measure_pieces(fdi_map: np.ndarray, index_to_lps, voxel_mm3: float, image: np.ndarray = None,
                   scale: float = 1.0) -> dict:
    """{label: {"centroid" (LPS mm), "volume_mm3", "extent_mm" (3 principal extents, longest first), "axis" (unit
    vector of the longest extent), "brightness", "metal"}} of each piece of ``fdi_map``. ``index_to_lps`` maps (N, 3)
    grid indices to LPS mm; ``brightness``: the 90th percentile of ``image`` (same grid, times ``scale``) in the piece
    and ``metal`` the share of its voxels at metal's values, when ``image`` is given."""
    from scipy import ndimage as ndi

    pieces = {}
    for label, sl in enumerate(ndi.find_objects(fdi_map), 1):
        if sl is None:
            continue
        idx = np.argwhere(fdi_map[sl] == label) + np.array([s.start for s in sl])
        pts = index_to_lps(idx)
        c = pts.mean(0)
        ext, axis = np.zeros(3), np.array([0.0, 0.0, 1.0])
        if len(pts) > 3:
            _, vec = np.linalg.eigh(np.cov((pts - c).T))
            ext, axis = np.ptp((pts - c) @ vec, 0)[::-1], vec[:, 2]
        # a piece n voxels across spans n voxels, not n - 1
        ext = ext + voxel_mm3 ** (1.0 / 3.0)
        pieces[label] = {"centroid": c, "volume_mm3": float(len(idx) * voxel_mm3), "extent_mm": ext, "axis": axis}
        if image is not None:
            values = image[sl][fdi_map[sl] == label] * scale
            pieces[label]["brightness"] = float(np.percentile(values, 90))
            pieces[label]["metal"] = float(np.mean(values >= METAL_VALUE))
    return pieces


def shape_problem(p: dict):
    """Why a piece cannot be a tooth (size or shape), or None."""
    vol, (length, width, thick) = p["volume_mm3"], p["extent_mm"]
    if vol < MIN_TOOTH_MM3:
        return f"too small for a tooth ({vol:.0f} mm3)"
    if vol > MAX_TOOTH_MM3:
        return f"too large for a tooth ({vol:.0f} mm3; the largest molars are about 1100 mm3)"
    if length > MAX_LENGTH_MM:
        return f"too long for a tooth ({length:.0f} mm; the longest are about 32 mm)"
    if width > MAX_WIDTH_MM:
        return f"too wide for a tooth ({width:.0f} mm across)"
    if thick < MIN_THICKNESS_MM or thick < MIN_ROUNDNESS * width:
        return f"too flat for a tooth ({thick:.1f} x {width:.1f} mm across: a plate, such as a bone wall)"
    if p.get("brightness", np.inf) < MIN_BRIGHTNESS:
        return f"too faint for a tooth (90th percentile {p['brightness']:.0f}; dentin and enamel are above 1500)"
    if p.get("metal", 0.0) > MAX_METAL_SHARE:
        return f"metal, not a tooth ({p['metal']:.0%} of it at {METAL_VALUE:.0f} or more: a filling, implant or object)"
    return None


def _densest_span(pts: np.ndarray, span) -> np.ndarray:
    """Mask of the points inside the axis-aligned box of size ``span`` that holds the most of them (a best box has
    a point on each of its lower faces: every combination of the points' coordinates is tried)."""
    if np.all(np.ptp(pts, 0) <= span):
        return np.ones(len(pts), bool)
    inside = [(pts[None, :, a] >= pts[:, None, a]) & (pts[None, :, a] <= pts[:, None, a] + span[a]) for a in range(3)]
    counts = np.einsum("ip,jp,kp->ijk", *(m.astype(np.int32) for m in inside))
    i, j, k = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return inside[0][i] & inside[1][j] & inside[2][k]


def _occlusal_layers(pieces: dict, kept: list, dropped: dict):
    """Pieces standing along the teeth's common long-axis direction (the occlusal normal), in one or two layers
    across it (the jaws). Returns (kept labels, their layers 0/1, the normal)."""
    axes = np.array([pieces[k].get("axis", (0.0, 0.0, 1.0)) for k in kept], float).reshape(-1, 3)
    ext = np.array([pieces[k]["extent_mm"] for k in kept], float).reshape(-1, 3)
    clear = ext[:, 0] >= ELONGATED * ext[:, 1]
    # the common direction: the principal axis of the clear long axes (each a line: its sign does not matter)
    a = axes[clear] if clear.sum() >= 2 else np.array([[0.0, 0.0, 1.0]])
    normal = np.linalg.eigh(a.T @ a)[1][:, 2]
    lean = np.degrees(np.arccos(np.clip(np.abs(axes @ normal), 0, 1)))
    if clear.sum() >= MIN_TEETH and np.median(lean[clear]) > MEDIAN_LEAN_DEG:
        for k in kept:
            dropped[k] = (f"not parallel to the others: the pieces' long axes lean {np.median(lean[clear]):.0f} deg "
                          "from their common direction (median); teeth stand side by side")
        return [], np.zeros(0, int), normal
    h = np.array([float(np.dot(pieces[k]["centroid"], normal)) for k in kept])
    group = np.zeros(len(h), int)
    if len(h) >= 2:  # one or two layers: the best split of the sorted heights in two groups, if they lie apart
        order = np.argsort(h)
        hs = h[order]
        cost = [np.var(hs[:i]) * i + np.var(hs[i:]) * (len(hs) - i) for i in range(1, len(hs))]
        i = int(np.argmin(cost)) + 1
        if np.median(hs[i:]) - np.median(hs[:i]) >= JAWS_APART_MM:
            group[order[i:]] = 1
    out, layer = [], []
    for k, hk, g in zip(kept, h, group):
        off = abs(hk - np.median(h[group == g]))
        if off > LAYER_MM:
            dropped[k] = f"off the occlusal plane: {off:.0f} mm from its jaw's other teeth"
        else:
            out.append(k)
            layer.append(g)
    return out, np.array(layer, int), normal


def gate(pieces: dict):
    """Plausibility of the pieces called teeth. ``pieces``: {label: {"centroid", "volume_mm3", "extent_mm", "axis",
    "brightness"}} (:func:`measure_pieces`; axis and brightness optional).

    Returns (kept labels, {dropped label: reason}, verdict): verdict is None when the kept teeth form a dentition,
    else the reason the whole result must be withheld."""
    dropped = {}
    for label, p in pieces.items():
        why = shape_problem(p)
        if why:
            dropped[label] = why
    kept = [k for k in pieces if k not in dropped]
    if len(kept) > MAX_TEETH:
        return [], {**dropped, **{k: "one of too many tooth-shaped pieces" for k in kept}}, (
            f"{len(kept)} tooth-shaped pieces: a dentition has at most {MAX_TEETH} teeth")
    if kept:
        pts = np.array([pieces[k]["centroid"] for k in kept], float)
        inside = _densest_span(pts, ARCH_SPAN_MM)
        for k, ok in zip(kept, inside):
            if not ok:
                dropped[k] = "outside the dental arch that holds the other teeth"
        kept = [k for k, ok in zip(kept, inside) if ok]
    kept, layer, normal = _occlusal_layers(pieces, kept, dropped)
    # neighbours: side by side in one jaw, or opposing across the occlusal plane; isolated pieces go, repeatedly
    pts = np.array([pieces[k]["centroid"] for k in kept], float).reshape(-1, 3)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    across = pts - np.outer(pts @ normal, normal)
    offset = np.linalg.norm(across[:, None] - across[None], axis=2)
    same = layer[:, None] == layer[None]
    near = np.where(same, d <= NEIGHBOUR_MM, offset <= OPPOSING_MM)
    np.fill_diagonal(near, False)
    alive = np.ones(len(kept), bool)
    while alive.any():
        alone = alive & ~(near & alive[None]).any(1)
        if not alone.any():
            break
        alive &= ~alone
    for k, ok in zip(kept, alive):
        if not ok:
            dropped[k] = "isolated: no tooth beside it in its jaw or opposite it in the other jaw"
    # the teeth that hang together (neighbour to neighbour) must be enough for an arch
    biggest = 0
    if alive.any():
        from scipy.sparse.csgraph import connected_components

        _, comp = connected_components(near & alive[None] & alive[:, None], directed=False)
        biggest = int(np.bincount(comp[alive]).max())
    kept = [k for k, ok in zip(kept, alive) if ok]
    verdict = None
    if biggest < MIN_TEETH:
        verdict = _why_none(len(pieces), biggest, dropped)
        dropped.update({k: "too few teeth to form a dental arch" for k in kept})
        kept = []
    return kept, dropped, verdict


def _why_none(n_pieces: int, n_kept: int, dropped: dict) -> str:
    if n_pieces == 0:
        return "the networks found no tooth-like structure"
    if n_kept == n_pieces:
        return (f"the networks marked only {n_pieces} piece{'s' if n_pieces != 1 else ''} as teeth, and a dental arch "
                f"needs at least {MIN_TEETH}")
    counts = {}
    for why in dropped.values():
        key = why.split(" (")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    detail = ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"the networks marked {n_pieces} piece{'s' if n_pieces != 1 else ''} as teeth, but "
            f"{'only ' + str(n_kept) if n_kept else 'none'} of them {'has' if n_kept == 1 else 'have'} a tooth's size, "
            f"shape and brightness and {'stands' if n_kept == 1 else 'stand'} side by side on a dental arch, which "
            f"needs at least {MIN_TEETH}{' (' + detail + ')' if detail else ''}")


def no_teeth_message(verdict: str) -> str:
    """The message of a withheld result."""
    return (f"no teeth found: {verdict}. The image shows no dental arch, so nothing was segmented; Segment Teeth "
            "needs a CT or CBCT that shows the teeth")
