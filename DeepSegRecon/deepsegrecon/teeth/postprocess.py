"""Instance split of touching teeth and FDI numbering.

Input: the stage-2 output on its grid (teeth foreground probability and the 16 tooth-class
probabilities: upper/lower x position 1-8), the grid's voxel size and a function that maps grid
indices to LPS physical points. Output: an instance map whose values are FDI numbers, and a
per-tooth report.

1. Foreground = teeth probability > 0.5, small components removed.
2. Midline: the x position (patient left-right) that best separates each position class into a
   left and a right tooth (median over classes); side = which side of that line.
3. Markers: connected cores of voxels that agree on (jaw, position, side); a marker-controlled
   watershed on the distance transform splits touching teeth at their contact points; adjacent
   pieces with the same key are merged (unless together far larger than one tooth) and fragments too
   small for a tooth are merged or dropped; a piece still far larger than a typical tooth is cut at its
   narrowest section along the arch (neighbours touch at small contact points).
4. Numbering (:mod:`.numbering`), in physical space (so flipped or oblique direction matrices do not matter): the
   occlusal plane is fitted between the upper-class and lower-class voxels and decides the jaw,
   the mid-sagittal line decides the side, so the quadrant follows; within a quadrant the teeth
   are ordered along the arch and given positions 1-8 by a dynamic program that maximises the
   summed stage-2 votes with positions strictly increasing along the arch: a missing tooth leaves
   a gap and never shifts its neighbours, and a tooth is never invented; a piece left without a
   position joins the numbered tooth it touches most.
5. Where the image is given: the borders between the numbered teeth are re-decided at its dark gaps inside
   the teeth mask (the thin bone between roots that the blurred mask bridges), numbering kept.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from . import labels as L
from .numbering import TOOTH_SIZED_MM3, estimate_midline, number_teeth
from .refine import AXIAL_PLANE, contrast_around

MIN_TOOTH_MM3 = 25.0
MIN_COMPONENT_MM3 = 8.0
MIN_MARKER_MM3 = 6.0
CORE_MM = 1.0  # markers lie farther than this from the surface of their class region
OVERSIZE = 1.6  # a piece this many times a typical tooth of its class is re-split with class markers
HMAX_MIN_MM3 = 250.0  # only cores this large are checked for several distance maxima
H_MAXIMA_MM = 0.7  # a distance maximum is a tooth of its own when it stands this much above the saddle
MERGE_SECTION = 0.6  # same-key pieces merge when their contact area >= this x volume^(2/3)
_EPS = 1e-4
OVERSIZE_PROFILE = 1.2  # a piece this many times a typical tooth (patient-scaled) is cut at its narrowest section
MAX_DEPTH = 0.92  # ... if that section is at most this share of the smaller crown beside it
MERGED_MAX = 1.7  # two same-class pieces together this many times a typical tooth are two teeth
GAP_LEVEL = 0.5  # image gaps: a teeth-mask voxel darker than lo + this x (hi - lo) ...
GAP_DIP = 0.3  # ... or this much x (hi - lo) below the grey closing over GAP_DIP_MM around it
GAP_DIP_MM = 1.0
GAP_CORE = 0.7  # re-split at the gaps: a tooth's core lies at >= this share of its largest gap-cut distance
GAP_MAX_LOSS = 0.5  # ... and a tooth that would lose more than this share of itself is left as it was


# typical tooth volume (mm3) by stage-2 class (1..8 upper, 9..16 lower); index 0 (no class) is a neutral 1
_TYPICAL_BY_CLASS = np.array([1.0] + list(L.TYPICAL_VOLUME_MM3["upper"]) + list(L.TYPICAL_VOLUME_MM3["lower"]))


def _typical_volume(key: int) -> float:
    """Typical volume (mm3) of the tooth class in ``key`` (class + 16 * side); the smallest tooth if unknown."""
    return float(_TYPICAL_BY_CLASS[int(key) % 16 or 16]) if key else float(min(L.TYPICAL_VOLUME_MM3["lower"]))


def _class_counts(inst, n, key):
    """(n + 1, 17) voxel counts of each instance per stage-2 class (class 0 left out)."""
    sel = inst > 0
    counts = np.bincount(inst[sel].astype(np.int64) * 17 + key[sel], minlength=(n + 1) * 17).reshape(n + 1, 17)
    counts[:, 0] = 0
    return counts


def _components(mask, min_vox):
    lab, n = ndi.label(mask)
    if n == 0:
        return lab, 0
    sizes = np.bincount(lab.ravel())
    small = sizes < min_vox
    small[0] = False
    if small.any():
        lab[small[lab]] = 0
    return lab, n


def _adjacency(lab: np.ndarray) -> dict:
    """{(a, b): number of face contacts} for labels a < b, both > 0."""
    pairs = {}
    for ax in range(3):
        a = np.moveaxis(lab, ax, 0)
        x, y = a[:-1].ravel(), a[1:].ravel()
        sel = (x != y) & (x > 0) & (y > 0)
        if not sel.any():
            continue
        lo, hi = np.minimum(x[sel], y[sel]), np.maximum(x[sel], y[sel])
        key = lo.astype(np.int64) * 1_000_003 + hi
        u, cnt = np.unique(key, return_counts=True)
        for k, n in zip(u, cnt):
            p = (int(k // 1_000_003), int(k % 1_000_003))
            pairs[p] = pairs.get(p, 0) + int(n)
    return pairs


def _geometric_markers(mask, dist, side, vox, min_marker):
    """Markers from the shape alone: the maxima of the distance to the teeth surface that stand out by
    H_MAXIMA_MM (tooth bodies; neighbours meet at lower saddles), cut at the midline where one lies across it."""
    from skimage.morphology import h_maxima

    peaks = h_maxima(np.round(dist * 20).astype(np.int32), int(round(H_MAXIMA_MM * 20))) > 0
    peaks &= dist > CORE_MM
    lab, m = ndi.label(peaks, structure=np.ones((3, 3, 3)))
    if m == 0:
        return ndi.label(mask)[0].astype(np.int32)
    if side is None:
        return lab.astype(np.int32)
    sel = lab > 0
    nl = np.bincount(lab[sel & ~side], minlength=m + 1)
    nr = np.bincount(lab[sel & side], minlength=m + 1)
    straddle = (np.minimum(nl, nr) >= 0.25 * np.maximum(nl + nr, 1)) & (np.minimum(nl, nr) >= 1)
    ids = lab.astype(np.int64) * 2 + np.where(straddle[lab], side, 0)
    _, inv = np.unique(ids[sel], return_inverse=True)
    out = np.zeros(mask.shape, np.int32)
    out[sel] = inv + 1
    return out


def _split_disconnected(inst: np.ndarray, n: int) -> np.ndarray:
    """Relabel so that every instance is one connected piece (its largest); stray bits join nothing."""
    out = np.zeros_like(inst)
    objs = ndi.find_objects(inst)
    nxt = 0
    for i, sl in enumerate(objs, 1):
        if sl is None:
            continue
        m = inst[sl] == i
        lab, k = ndi.label(m)
        if k > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            m = lab == int(np.argmax(sizes))
        nxt += 1
        out[sl][m] = nxt
    return out


def profile_split(mask: np.ndarray, spacing, k: int):
    """Cut ``mask`` (several teeth merged side by side) into ``k`` pieces at the narrowest sections across its
    long axis in the axial plane (array axes 1, 2: teeth touch at small contact points).
    Returns (piece map 0..k, depth: the cut's section / the smaller peak beside it; 1 = no valley)."""
    idx = np.argwhere(mask)
    xy = idx[:, 1:] * np.asarray(spacing[1:], float)
    xy -= xy.mean(0)
    _, _, vt = np.linalg.svd(xy[:: max(1, len(xy) // 20000)], full_matrices=False)
    t = xy @ vt[0]
    bin_mm = float(max(spacing[1:]))  # no finer than the voxels (finer bins alias into false valleys)
    edges = np.arange(t.min(), t.max() + bin_mm, bin_mm)
    prof = ndi.gaussian_filter1d(np.histogram(t, edges)[0].astype(float), 1.5)
    cdf = np.cumsum(prof) / prof.sum()
    cuts, depth = [], 1.0
    for c in range(1, k):  # each cut near its share of the volume, at the profile's lowest point there
        win = np.nonzero((cdf > (c - 0.5) / k) & (cdf < (c + 0.5) / k))[0]
        if win.size:
            # the deepest valley there: section / the smaller of the two peaks beside it
            left = np.maximum.accumulate(prof)
            right = np.maximum.accumulate(prof[::-1])[::-1]
            rel = prof[win] / np.maximum(np.minimum(left[win], right[win]), 1e-9)
            b = win[np.argmin(rel)]
            cuts.append(edges[b + 1])
            depth = min(depth, float(rel.min()))
    out = np.zeros(mask.shape, np.int32)
    out[tuple(idx.T)] = 1 + np.searchsorted(np.sort(cuts), t)
    return out, depth


def _split_oversized(inst, n, key, spacing):
    """Pieces still far larger than a typical tooth of their majority class, all of one jaw, are neighbours
    merged side by side: cut each at its narrowest sections (:func:`profile_split`). Returns the new map,
    the new count and the pairs of pieces that must not be merged back."""
    vox = float(np.prod(spacing))
    counts = _class_counts(inst, n, key)
    top = counts.argmax(1)
    upper = counts[:, 1:9].sum(1)
    one_jaw = np.maximum(upper, counts[:, 9:].sum(1)) >= 0.85 * counts.sum(1)
    ratio = counts.sum(1) * vox / _TYPICAL_BY_CLASS[top]
    sized = one_jaw & (counts.sum(1) * vox >= TOOTH_SIZED_MM3)
    sized[0] = False
    if sized.sum() >= 6:  # this patient's tooth size relative to the typical one (robust to a few merges)
        ratio = ratio / float(np.median(ratio[sized]))
    no_merge = set()
    for i in np.nonzero(one_jaw & (ratio > OVERSIZE_PROFILE))[0]:
        if i == 0:
            continue
        sl = ndi.find_objects((inst == i).astype(np.int8))[0]
        sub = inst[sl] == i
        k = int(np.clip(round(ratio[i]), 2, 3))
        pieces, depth = profile_split(sub, spacing, k)
        if depth > MAX_DEPTH:  # no narrow section: one large tooth
            continue
        view = inst[sl]
        ids = [i] + list(range(n + 1, n + k))
        for j in range(2, k + 1):
            view[pieces == j] = ids[j - 1]
        no_merge.update((a, b) for a in ids for b in ids if a < b)
        n += k - 1
    return inst, n, no_merge


def image_gaps(fg: np.ndarray, image: np.ndarray, spacing) -> np.ndarray | None:
    """Dark voxels of the teeth mask ``fg`` in ``image`` (same grid): the thin bone between neighbouring roots
    (or crowns) that the blurred mask bridges. Against the contrast around the mask (``hi``: median 1-2 mm
    inside, ``lo``: 1-2 mm outside): darker than ``lo + GAP_LEVEL * (hi - lo)``, or a narrow valley (under
    its grey closing over GAP_DIP_MM by GAP_DIP * (hi - lo)); holes closed in the axial plane (the pulp)
    are not gaps. None where the image shows no tooth contrast."""
    sp = np.asarray(spacing, float)
    image = np.asarray(image, np.float32)
    contrast = contrast_around(image, fg, ndi.distance_transform_edt(fg, sampling=sp),
                               ndi.distance_transform_edt(~fg, sampling=sp), 1.0)
    if contrast is None:
        return None
    hi, lo = contrast
    size = tuple(int(2 * math.ceil(GAP_DIP_MM / s) + 1) for s in sp)
    dip = ndi.grey_closing(image, size=size) - image
    gaps = fg & ((image < lo + GAP_LEVEL * (hi - lo)) | (dip > GAP_DIP * (hi - lo)))
    gaps &= ~ndi.binary_fill_holes(fg & ~gaps, structure=AXIAL_PLANE)
    return gaps


def resplit_at_gaps(fdi_map: np.ndarray, gaps: np.ndarray, spacing) -> np.ndarray:
    """Borders between the numbered teeth of ``fdi_map`` re-decided at the image's ``gaps`` (:func:`image_gaps`);
    the numbering is kept. Each tooth's core (the largest connected part where the distance to the surface
    of the teeth mask without the gaps is at least GAP_CORE x its largest) floods the teeth mask on that
    distance: neighbours meet at the gaps, e.g. a root the mask bridged to its neighbour's goes back to its crown.
    A tooth that would lose more than GAP_MAX_LOSS of itself keeps its voxels."""
    from skimage.segmentation import watershed

    mask = fdi_map > 0
    dist = ndi.distance_transform_edt(mask & ~gaps, sampling=spacing)
    markers = np.zeros(fdi_map.shape, np.int32)
    for f, sl in enumerate(ndi.find_objects(fdi_map), 1):
        if sl is None:
            continue
        d = np.where(fdi_map[sl] == f, dist[sl], 0.0)
        if d.max() <= 0:
            continue
        core, k = ndi.label(d >= GAP_CORE * d.max())
        if k > 1:
            sizes = np.bincount(core.ravel())
            sizes[0] = 0
            core = core == int(np.argmax(sizes))
        markers[sl][core > 0] = f
    out = watershed(-dist, markers, mask=mask).astype(fdi_map.dtype)
    # a tooth that would lose more than GAP_MAX_LOSS of itself keeps all of it (its core was misplaced)
    n = np.bincount(fdi_map.ravel(), minlength=256)
    lost = np.bincount(fdi_map[mask & (out != fdi_map)], minlength=256)
    keep = lost > GAP_MAX_LOSS * np.maximum(n, 1)
    keep[0] = False
    back = mask & keep[fdi_map]
    out[back] = fdi_map[back]
    return out


def split_instances(fg: np.ndarray, key: np.ndarray, spacing, min_tooth_mm3: float = MIN_TOOTH_MM3,
                    side: np.ndarray = None, step=None, mode: str = "geometry"):
    """Split the teeth foreground into instances (marker-controlled watershed on the distance map).

    ``fg``: bool mask; ``key``: int map (>0 inside fg) of class keys (jaw x position); ``side``: bool map,
    the patient's left of the midline. Markers (``mode``):

    - ``"geometry"`` (default): the distance maxima of the teeth mask (one per tooth body), cut at the
      midline where one lies across it (the two central incisors); robust to noisy class maps;
    - ``"class"``: the cores of each class region (several when distance maxima show several teeth),
      each taking the side most of it is on, cut at the midline where it lies across it.

    Adjacent pieces with the same key (majority class + side) that meet over a broad section are one
    tooth and are merged; pieces too small for a tooth join their largest neighbour or are dropped.
    Returns (instances int32 map 0..n, {instance: key = class + 16 * side}).
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    vox = float(np.prod(spacing))
    mask, _ = _components(fg, max(1, int(MIN_COMPONENT_MM3 / vox)))
    mask = mask > 0
    if not mask.any():
        return np.zeros(fg.shape, np.int32), {}
    markers = np.zeros(fg.shape, np.int32)
    marker_key = {}
    n = 0
    min_marker = max(1, int(MIN_MARKER_MM3 / vox))
    keyed = np.where(mask, key, 0)
    objs = ndi.find_objects(np.clip(keyed, 0, None).astype(np.int32)) if mode == "class" else []
    if mode == "geometry":
        if step:
            step(0.2)
        dist = ndi.distance_transform_edt(mask, sampling=spacing)
        markers = _geometric_markers(mask, dist, side, vox, min_marker)
        n = int(markers.max())
    for k0, sl in enumerate(objs):
        k = k0 + 1
        if step:
            step(0.1 + 0.5 * k0 / len(objs))
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        region = keyed[sl] == k
        # markers: the regional maxima of the distance to the region's surface that stand out by
        # H_MAXIMA_MM (one per tooth body: two neighbours of the same key meet at a lower saddle);
        # thin parts (roots, incisal edges) are reached by the watershed later
        if region.sum() < min_marker:
            continue
        dist = ndi.distance_transform_edt(region, sampling=spacing)
        lab, m = ndi.label(dist > CORE_MM)
        if m == 0:
            lab, m = ndi.label(region)
        sizes = np.bincount(lab.ravel(), minlength=m + 1)
        valid = sizes >= min_marker
        valid[0] = False
        if not valid.any():
            valid[int(np.argmax(sizes[1:])) + 1] = True
        # a large core holding several distance maxima that stand out by H_MAXIMA_MM is several teeth
        # (neighbours of the same key meet at a lower saddle): its maxima become the markers
        for c in np.nonzero(valid & (sizes * vox >= HMAX_MIN_MM3))[0]:
            csl = ndi.find_objects((lab == c).astype(np.int8))[0]
            comp = lab[csl] == c
            peaks = h_maxima(np.round(np.where(comp, dist[csl], 0) * 20).astype(np.int32),
                             int(round(H_MAXIMA_MM * 20))) > 0
            plab, pm = ndi.label(peaks & comp, structure=np.ones((3, 3, 3)))
            if pm > 1:
                sub = lab[csl]
                sub[comp] = 0
                sub[plab > 0] = m + plab[plab > 0]
                valid = np.concatenate([valid, np.ones(pm, bool)])
                valid[c] = False
                m += pm
        sel = (lab > 0) & valid[lab]
        if side is not None:
            sd = side[sl]
            nl = np.bincount(lab[sel & ~sd], minlength=m + 1)
            nr = np.bincount(lab[sel & sd], minlength=m + 1)
            lo_, hi_ = np.minimum(nl, nr), nl + nr
            straddle = (lo_ >= 0.25 * np.maximum(hi_, 1)) & (lo_ >= min_marker)  # across the midline: two teeth
            comp_side = np.where(straddle[lab], sd, (nr > nl)[lab]).astype(np.int64)
        else:
            comp_side = np.zeros(lab.shape, np.int64)
        ids = lab.astype(np.int64) * 2 + comp_side
        uniq, inv = np.unique(ids[sel], return_inverse=True)
        if uniq.size == 0:
            continue
        view = markers[sl]
        view[sel] = (n + 1 + inv).astype(np.int32)
        for j, u in enumerate(uniq):
            marker_key[n + 1 + j] = int(k) + 16 * int(u % 2)
        n += len(uniq)
    if n == 0:
        lab, m = ndi.label(mask)
        return lab.astype(np.int32), {i: 0 for i in range(1, m + 1)}
    if mode != "geometry":
        dist = ndi.distance_transform_edt(mask, sampling=spacing)
    if step:
        step(0.5)
    inst = watershed(-dist, markers, mask=mask).astype(np.int32)
    no_merge = set()
    if mode == "geometry":
        # a piece that is largely upper-jaw class and largely lower-jaw class is an upper and a lower
        # tooth touching across the occlusal plane: split it with class markers
        # ... and a piece far larger than one tooth of its class is several teeth: split it likewise
        sel = inst > 0
        upper_cls = (key >= 1) & (key <= 8)
        nu = np.bincount(inst[sel & upper_cls], minlength=n + 1)
        nlw = np.bincount(inst[sel & ~upper_cls], minlength=n + 1)
        both = np.minimum(nu, nlw) >= np.maximum(0.25 * (nu + nlw), 4 * min_marker)
        counts = _class_counts(inst, n, key)
        top = counts.argmax(1)
        too_big = counts.sum(1) * vox > OVERSIZE * _TYPICAL_BY_CLASS[top]
        both |= too_big
        both[0] = False
        for i in np.nonzero(both)[0]:
            sl = ndi.find_objects((inst == i).astype(np.int8))[0]
            sub = inst[sl] == i
            sub_inst, _ = split_instances(sub, np.where(sub, key[sl], 0), spacing, min_tooth_mm3,
                                          side=None if side is None else side[sl], mode="class")
            if sub_inst.max() > 1:
                view = inst[sl]
                extra = sub_inst > 1
                view[extra] = n + sub_inst[extra] - 1
                n += int(sub_inst.max()) - 1
    if mode == "geometry" and side is not None:
        # a piece lying across the midline is the two central incisors: cut it there
        sel = inst > 0
        nl = np.bincount(inst[sel & ~side], minlength=n + 1)
        nr = np.bincount(inst[sel & side], minlength=n + 1)
        straddle = np.minimum(nl, nr) >= np.maximum(0.25 * (nl + nr), min_marker)
        straddle[0] = False
        if straddle.any():
            cut = sel & straddle[inst] & side
            ids = np.nonzero(straddle)[0]
            new_id = np.zeros(n + 1, np.int32)
            new_id[ids] = n + 1 + np.arange(len(ids))
            inst[cut] = new_id[inst[cut]]
            n += len(ids)
            inst = _split_disconnected(inst, n)
            n = int(inst.max())
    if mode == "geometry":
        inst, n, no_merge = _split_oversized(inst, n, key, spacing)
        # each piece's key: its majority class and side
        full_key = np.where(mask, key.astype(np.int64) + (16 * side if side is not None else 0), 0)
        sel = inst > 0
        pair = inst[sel].astype(np.int64) * 64 + full_key[sel]
        counts = np.bincount(pair, minlength=(n + 1) * 64).reshape(n + 1, 64)
        counts[:, 0] = 0
        major = counts.argmax(1)
        marker_key = {i: int(major[i]) for i in range(1, n + 1)}

    # merge adjacent pieces of the same key, then fragments too small to be a tooth
    parent = {i: i for i in range(1, n + 1)}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    adj = _adjacency(inst)
    sizes = np.bincount(inst.ravel(), minlength=n + 1)
    face = float(np.prod(spacing)) ** (2.0 / 3.0)
    for (a, b), cnt in sorted(adj.items(), key=lambda kv: -kv[1]):
        # pieces of one tooth meet over a broad section; neighbours touch at a small contact point
        broad = cnt * face >= MERGE_SECTION * (min(sizes[a], sizes[b]) * vox) ** (2.0 / 3.0)
        # ... unless together they are far larger than one tooth: two neighbours whose classes were confused
        both_teeth = (sizes[a] + sizes[b]) * vox >= MERGED_MAX * _typical_volume(marker_key.get(a, 0))
        if marker_key.get(a) == marker_key.get(b) and broad and not both_teeth and (a, b) not in no_merge:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
    remap = np.zeros(n + 1, np.int32)
    for i in range(1, n + 1):
        remap[i] = find(i)
    inst = remap[inst]
    min_vox = max(1, int(min_tooth_mm3 / vox))
    for _ in range(3):
        sizes = np.bincount(inst.ravel(), minlength=n + 1)
        small = (sizes > 0) & (sizes < min_vox)
        small[0] = False
        if not small.any():
            break
        # each small piece joins the large neighbour it touches most, or is dropped
        best = {}
        for (a, b), cnt in _adjacency(inst).items():
            for i, j in ((a, b), (b, a)):
                if small[i] and not small[j] and cnt > best.get(i, (0, 0))[0]:
                    best[i] = (cnt, j)
        remap = np.arange(n + 1, dtype=np.int32)
        remap[small] = 0
        for i, (_, j) in best.items():
            remap[i] = j
        inst = remap[inst]
    # relabel 1..m
    ids = [i for i in np.unique(inst) if i > 0]
    remap = np.zeros(n + 1, np.int32)
    keys = {}
    for new, old in enumerate(ids, 1):
        remap[old] = new
        keys[new] = marker_key.get(int(old), 0)
    return remap[inst], keys


def _rejoin_unnumbered(inst, fdi: dict, details: dict) -> dict:
    """A piece the numbering left out (its position was taken) that touches a numbered tooth is part of it."""
    fdi = dict(fdi)
    adj = _adjacency(inst)
    for _ in range(3):
        best = {}
        for (a, b), cnt in adj.items():
            for i, j in ((a, b), (b, a)):
                if not fdi.get(i) and fdi.get(j) and cnt > best.get(i, (0, 0))[0]:
                    best[i] = (cnt, fdi[j])
        if not best:
            break
        for i, (_, f) in best.items():
            fdi[i] = f
            details[i]["fdi"] = f
            details[i]["joined"] = True
    return fdi


STACKED = 2.0  # two touching pieces of one jaw whose centres are this many times farther apart in height than
STACKED_MM = 4.0  # across (and at least this far in height) are a crown and its root, not two neighbours


def merge_stacked(inst: np.ndarray, key: np.ndarray, index_to_lps) -> np.ndarray:
    """Join a root cut off its crown: touching pieces of the same jaw (majority class of ``key``: 1-8 upper,
    9-16 lower) lying one above the other. Neighbouring teeth stand side by side; opposing teeth are of the
    other jaw."""
    adj = _adjacency(inst)
    if not adj:
        return inst
    ids = [int(i) for i in np.unique(inst) if i > 0]
    objs = ndi.find_objects(inst)
    cent, upper = {}, {}
    for i in ids:
        sl = objs[i - 1]
        m = inst[sl] == i
        idx = np.argwhere(m) + np.array([s.start for s in sl])
        cent[i] = index_to_lps(idx[:: max(1, len(idx) // 2000)]).mean(0)
        k = key[sl][m]
        upper[i] = np.count_nonzero((k >= 1) & (k <= 8)) * 2 > np.count_nonzero(k)
    root = {i: i for i in ids}

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    for (a, b), _ in sorted(adj.items(), key=lambda kv: -kv[1]):
        if a not in cent or b not in cent or upper[a] != upper[b]:
            continue
        d = cent[a] - cent[b]
        dz, dxy = abs(float(d[2])), float(np.hypot(d[0], d[1]))
        if dz >= STACKED_MM and dz > STACKED * dxy:
            root[find(b)] = find(a)
    lut = np.arange(int(inst.max()) + 1, dtype=inst.dtype)
    for i in ids:
        lut[i] = find(i)
    return lut[inst]


ENAMEL_SHARE = 0.15  # the brightest share of the teeth voxels: the crowns' enamel
ONE_ARCH = 0.3  # the crowns in the lowest (or highest) this share of the teeth's height: one arch only


def single_arch(heights: np.ndarray, values: np.ndarray):
    """"upper", "lower" or None (both arches, or unclear) from where the crowns lie in the teeth's height:
    an upper tooth has its crown below its roots, a lower tooth above them, and two arches meet at the crowns.
    ``heights``: superior coordinate (LPS z, mm) of the teeth voxels; ``values``: their intensities."""
    if len(heights) < 200:
        return None
    lo, hi = np.percentile(heights, [2, 98])
    if hi - lo < 8.0:
        return None
    crowns = heights[values >= np.percentile(values, 100 * (1 - ENAMEL_SHARE))]
    f = (float(np.median(crowns)) - lo) / (hi - lo)
    return "upper" if f < ONE_ARCH else "lower" if f > 1 - ONE_ARCH else None


def postprocess(fg_prob: np.ndarray, class_prob: np.ndarray, spacing, index_to_lps, mid_hint: float,
                x_axis_index: int = 2, min_tooth_mm3: float = MIN_TOOTH_MM3, step=None, image: np.ndarray = None):
    """Stage-2 probabilities -> (FDI map on the same grid, per-tooth details).

    ``class_prob`` is (16, ...) (upper 1..8, lower 1..8), ``mid_hint`` a fallback midline (grid index
    along ``x_axis_index``), ``index_to_lps`` maps grid indices to LPS mm; ``step(fraction)`` is called
    often (progress and cancel). ``image`` (optional): the intensities on the same grid; the borders between
    the numbered teeth are then re-decided at its dark gaps inside the teeth mask (:func:`resplit_at_gaps`)."""
    fg = fg_prob > 0.5
    if not fg.any():
        return np.zeros(fg.shape, np.uint8), {}
    idx = np.argwhere(fg)
    pts = index_to_lps(idx)
    jaw = single_arch(pts[:, 2], image[tuple(idx.T)]) if image is not None else None
    if jaw is not None:  # one arch only: every tooth is of that jaw, whatever the network's jaw votes
        both = class_prob[:8] + class_prob[8:]
        class_prob = np.concatenate([both, np.zeros_like(both)] if jaw == "upper" else [np.zeros_like(both), both])
    cls = np.argmax(class_prob, 0).astype(np.int16) + 1  # 1..16
    centre_idx = np.array([[float(v) for v in np.array(fg.shape) / 2.0 - 0.5]])
    centre_idx[0, x_axis_index] = mid_hint
    fallback_x = float(index_to_lps(centre_idx)[0, 0])
    sub = slice(None, None, max(1, len(idx) // 300000))
    midline = estimate_midline(pts[sub], cls[tuple(idx[sub].T)], fallback_x,
                               min_count=max(5, int(4.0 / float(np.prod(spacing)))))
    side = np.zeros(fg.shape, bool)
    side[tuple(idx.T)] = midline.signed(pts) >= 0  # patient's left
    del pts, idx
    key = np.where(fg, cls, 0).astype(np.int16)
    inst, _ = split_instances(fg, key, spacing, min_tooth_mm3, side=side, step=step)
    inst = merge_stacked(inst, key, index_to_lps)
    fdi, details = number_teeth(inst, class_prob, index_to_lps, spacing, midline, step=step)
    fdi = _rejoin_unnumbered(inst, fdi, details)
    lut = np.zeros(int(inst.max()) + 1, np.uint8)
    for i, f in fdi.items():
        lut[i] = f
    out = lut[inst]
    gaps = image_gaps(fg, image, spacing) if image is not None else None
    if gaps is not None:
        out = resplit_at_gaps(out, gaps, spacing)
    return out, {"midline": midline.as_dict(), "instances": details}
