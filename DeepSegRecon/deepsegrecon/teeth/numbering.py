"""FDI numbering of the split teeth, in physical space (flipped or oblique direction matrices do not matter): the
mid-sagittal line decides the side (:func:`estimate_midline`), the occlusal plane the jaw (:func:`fit_occlusal_plane`);
within a quadrant the teeth are ordered along the arch and given positions 1-8 by a dynamic program that maximises
the summed stage-2 votes with positions strictly increasing along the arch (:func:`assign_positions_spaced`): a
missing tooth leaves a gap and never shifts its neighbours, and a tooth is never invented."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from . import labels as L

SKIP_TOOTH = 1e-3  # vote-equivalent cost of dropping a tooth-sized instance
SKIP_FRAGMENT = 0.05  # ... and of dropping a smaller fragment
TOOTH_SIZED_MM3 = 100.0  # an instance this large is a tooth: numbering keeps it


class Midline:
    """The mid-sagittal line in the axial plane, in LPS mm: x = a + b * (y - y0) (x: patient left)."""

    def __init__(self, a: float, b: float = 0.0, y0: float = 0.0):
        self.a, self.b, self.y0 = float(a), float(b), float(y0)

    def signed(self, pts) -> np.ndarray:
        """Distance (mm) of LPS points from the mid-sagittal plane, positive toward the patient's left."""
        pts = np.atleast_2d(pts)
        return (pts[:, 0] - self.a - self.b * (pts[:, 1] - self.y0)) / math.sqrt(1 + self.b ** 2)

    def along(self, pts) -> np.ndarray:
        """Position (mm) along the midline, growing posteriorly."""
        pts = np.atleast_2d(pts)
        return (pts[:, 1] + self.b * pts[:, 0]) / math.sqrt(1 + self.b ** 2)

    def as_dict(self) -> dict:
        return {"x_at_y0": self.a, "slope_dx_dy": self.b, "y0": self.y0}


def _two_means(x: np.ndarray):
    lo, hi = float(x.min()), float(x.max())
    for _ in range(30):
        cut = (lo + hi) / 2
        left, right = x[x < cut], x[x >= cut]
        if left.size == 0 or right.size == 0:
            return None
        nlo, nhi = float(left.mean()), float(right.mean())
        if abs(nlo - lo) < 1e-6 and abs(nhi - hi) < 1e-6:
            break
        lo, hi = nlo, nhi
    cut = (lo + hi) / 2
    return x < cut


def estimate_midline(pts: np.ndarray, cls: np.ndarray, fallback_x: float, min_count: int = 20) -> Midline:
    """Mid-sagittal line from the left/right pairs of each tooth class (LPS points, their classes).

    Each class is split into a left and a right cluster along x; the midpoints of the pairs give the
    line (its slope too when pairs lie at different depths, which absorbs a head turned in the axial
    plane). A class with one side missing or too unequal is skipped; with no pair, x = ``fallback_x``."""
    mids, weights = [], []
    for c in np.unique(cls):
        sel = cls == c
        if sel.sum() < 2 * min_count:
            continue
        p = pts[sel]
        left_mask = _two_means(p[:, 0])
        if left_mask is None:
            continue
        nl, nr = int(left_mask.sum()), int((~left_mask).sum())
        if min(nl, nr) < min_count or min(nl, nr) / max(nl, nr) < 0.35:
            continue
        ml, mr = p[left_mask].mean(0), p[~left_mask].mean(0)
        # two teeth, not one tooth cut in halves: fewer points at the cut than around either centre
        x = p[:, 0]
        cut = (p[left_mask, 0].max() + p[~left_mask, 0].min()) / 2

        def near(v, x=x):
            return int(np.sum(np.abs(x - v) < 0.75))

        if near(cut) > 0.6 * min(near(ml[0]), near(mr[0])):
            continue
        mids.append((ml + mr) / 2)
        # the central incisors lie at the midline itself: they pin it best
        weights.append(min(nl, nr) * (3.0 if int(c) in (1, 9) else 1.0))
    if not mids:
        return Midline(fallback_x, 0.0, float(np.mean(pts[:, 1])) if len(pts) else 0.0)
    mids, w = np.array(mids), np.array(weights, float)
    y0 = float(np.average(mids[:, 1], weights=w))
    b = 0.0
    if len(mids) >= 4 and np.ptp(mids[:, 1]) > 15.0:
        # a slope (head turned in the axial plane) only when the pairs show it clearly
        keep = np.ones(len(mids), bool)
        for _ in range(3):  # least squares, dropping pairs more than 2 mm off the line
            A = np.c_[np.ones(keep.sum()), mids[keep, 1] - y0]
            sw = np.sqrt(w[keep])
            coef, *_ = np.linalg.lstsq(A * sw[:, None], mids[keep, 0] * sw, rcond=None)
            res_all = mids[:, 0] - coef[0] - coef[1] * (mids[:, 1] - y0)
            new_keep = np.abs(res_all) <= max(2.0, 2.5 * float(np.std(res_all[keep])))
            if new_keep.sum() < 4 or np.array_equal(new_keep, keep):
                break
            keep = new_keep
        res = res_all[keep]
        dy = mids[keep, 1] - mids[keep, 1].mean()
        se = math.sqrt(float(np.sum(res ** 2)) / max(int(keep.sum()) - 2, 1) / max(float(np.sum(dy ** 2)), 1e-6))
        if abs(coef[1]) > 3.0 * se and abs(coef[1]) > math.tan(math.radians(2.5)):
            b = float(np.clip(coef[1], -math.tan(math.radians(25)), math.tan(math.radians(25))))
    r = mids[:, 0] - b * (mids[:, 1] - y0)
    order = np.argsort(r)
    cw = np.cumsum(w[order])
    a = float(r[order][np.searchsorted(cw, cw[-1] / 2)])  # weighted median
    return Midline(a, b, y0)


def fit_occlusal_plane(points_upper: np.ndarray, points_lower: np.ndarray):
    """Plane (point, unit normal pointing to the upper jaw) separating upper from lower tooth points (LPS mm).

    The normal starts as +z (superior) and is refined by a least-squares plane through the midpoints
    of nearby upper/lower point pairs; it is kept within 35 degrees of +z."""
    up = np.asarray(points_upper, float)
    lo = np.asarray(points_lower, float)
    if len(up) == 0 and len(lo) == 0:
        return np.zeros(3), np.array([0.0, 0.0, 1.0])
    if len(up) == 0 or len(lo) == 0:
        pts = up if len(up) else lo
        z = pts[:, 2].min() - 1.0 if len(up) else pts[:, 2].max() + 1.0
        return np.array([pts[:, 0].mean(), pts[:, 1].mean(), z]), np.array([0.0, 0.0, 1.0])
    from scipy.spatial import cKDTree

    # the lowest upper points and the highest lower points face each other across the plane
    tree = cKDTree(lo[:, :2])
    d, j = tree.query(up[:, :2], k=1)
    close = d < 2.0
    mids = []
    if close.sum() >= 10:
        # per upper column take the nearest lower point; keep pairs with the upper point above
        pu, pl = up[close], lo[j[close]]
        ok = pu[:, 2] > pl[:, 2]
        mids = (pu[ok] + pl[ok]) / 2
    if len(mids) >= 10:
        centre = mids.mean(0)
        A = np.c_[mids[:, 0] - centre[0], mids[:, 1] - centre[1], np.ones(len(mids))]
        coef, *_ = np.linalg.lstsq(A, mids[:, 2] - centre[2], rcond=None)
        normal = np.array([-coef[0], -coef[1], 1.0])
        normal /= np.linalg.norm(normal)
        if normal[2] < math.cos(math.radians(35)):
            normal = np.array([0.0, 0.0, 1.0])
        centre = centre + np.array([0, 0, coef[2]])
    else:
        centre = (up.mean(0) + lo.mean(0)) / 2
        normal = np.array([0.0, 0.0, 1.0])
    # re-centre: the plane passes halfway between the two sets along the normal
    hu = np.percentile((up - centre) @ normal, 5)
    hl = np.percentile((lo - centre) @ normal, 95)
    centre = centre + normal * (hu + hl) / 2
    return centre, normal


def _expected_gap(widths, p_from: int, p_to: int) -> float:
    """Expected centre-to-centre distance (mm) between the teeth at positions p_from < p_to."""
    w = widths
    return w[p_from - 1] / 2 + sum(w[p_from:p_to - 1]) + w[p_to - 1] / 2


def assign_positions_spaced(scores: np.ndarray, skip, dist: np.ndarray, widths, lateral=None,
                            spacing_weight: float = 1.0):
    """Positions for instances ordered along the arch from votes *and* spacing.

    Like :func:`assign_positions` (strictly increasing positions, instances may be dropped at ``skip``
    cost), plus a Gaussian log-likelihood of each distance between consecutive assigned teeth
    (``dist[j, i]``, mm) given the typical widths of the positions between them: a gap the size of a
    tooth means a missing tooth, so its neighbours keep their numbers even when their votes waver.
    ``lateral``: distance of each instance from the mid-sagittal plane (mm), a prior for the first
    tooth when it would be a central or lateral incisor."""
    n = scores.shape[0]
    if n == 0:
        return []
    skip = np.broadcast_to(np.asarray(skip, float), (n,))
    csk = np.concatenate([[0.0], np.cumsum(skip)])  # csk[i] = sum of skip[:i]
    NEG = -1e18

    def gauss(d, e):
        sd = 0.12 * e + 1.0
        return -0.5 * ((d - e) / sd) ** 2 * spacing_weight

    f = np.full((n, 9), NEG)
    back = {}
    for i in range(n):
        for p in range(1, 9):
            start = csk[i]
            if lateral is not None and p <= 2:
                start += gauss(lateral[i], widths[0] / 2 if p == 1 else widths[0] + widths[1] / 2)
            best, arg = start, None
            for j in range(i):
                for q in range(1, p):
                    if f[j, q] <= NEG / 2:
                        continue
                    v = f[j, q] + gauss(dist[j, i], _expected_gap(widths, q, p)) + (csk[i] - csk[j + 1])
                    if v > best:
                        best, arg = v, (j, q)
            f[i, p] = best + scores[i, p - 1]
            back[(i, p)] = arg
    # best end state (the rest skipped), or nothing assigned at all
    total_best, end = csk[n], None
    for i in range(n):
        for p in range(1, 9):
            v = f[i, p] + (csk[n] - csk[i + 1])
            if v > total_best:
                total_best, end = v, (i, p)
    out = [0] * n
    while end is not None:
        i, p = end
        out[i] = p
        end = back[(i, p)]
    return out


def smooth_votes(v: np.ndarray) -> np.ndarray:
    """Position votes with some mass moved to the neighbouring positions (confusions are mostly +-1)
    and a small floor, so that a tooth voted like its neighbour can still take the next position."""
    v = np.asarray(v, float)
    v = v / max(v.sum(), 1e-12)
    nb = np.zeros_like(v)
    nb[1:] += v[:-1]
    nb[:-1] += v[1:]
    return 0.8 * v + 0.08 * nb + 0.04 / len(v) + 1e-6


SKIP_PENALTY = math.log(0.02)


def assign_positions(scores: np.ndarray, skip_penalty=SKIP_PENALTY):
    """Best strictly increasing positions for instances ordered along the arch.

    ``scores``: (n, 8) log-votes of each instance for positions 1..8. An instance may be left
    unassigned at ``skip_penalty`` (a number, or one per instance; it is then dropped, never renamed
    into a tooth it is not). Returns a list of positions (1..8) or 0 for unassigned, in order."""
    n = scores.shape[0]
    skip = np.broadcast_to(np.asarray(skip_penalty, float), (n,))
    NEG = -1e18
    # best[i][p]: best total for the first i instances with the last assigned position <= p (p = 0..8)
    best = np.full((n + 1, 9), NEG)
    best[0, :] = 0.0
    choice = np.zeros((n + 1, 9), np.int64)  # position given to instance i-1 (0 = skipped)
    for i in range(1, n + 1):
        for p in range(0, 9):
            # skip instance i-1
            cand = best[i - 1, p] + skip[i - 1]
            ch = 0
            if p >= 1:
                # assign position p to instance i-1: previous instances use positions < p
                v = best[i - 1, p - 1] + scores[i - 1, p - 1]
                if v > cand:
                    cand, ch = v, p
                # or the last position used is < p (carry over)
                if best[i, p - 1] > cand:
                    cand, ch = best[i, p - 1], -1
            best[i, p] = cand
            choice[i, p] = ch
    # backtrack
    out = [0] * n
    i, p = n, 8
    while i > 0:
        ch = choice[i, p]
        if ch == -1:
            p -= 1
            continue
        if ch == 0:
            out[i - 1] = 0
            i -= 1
            continue
        out[i - 1] = int(ch)
        i -= 1
        p = ch - 1
    return out


def number_teeth(inst: np.ndarray, probs: np.ndarray, index_to_lps, spacing, midline: Midline, step=None):
    """FDI number for each instance.

    ``inst``: instance map; ``probs``: (16, ...) tooth-class probabilities on the same grid (upper
    positions 1..8 then lower 1..8); ``index_to_lps``: maps (N, 3) grid indices (array order) to LPS
    mm; ``midline``: the mid-sagittal line (LPS). Returns ({instance: FDI or 0}, per-instance details).
    """
    ids = [int(i) for i in np.unique(inst) if i > 0]
    if not ids:
        return {}, {}
    vox = float(np.prod(spacing))
    objs = ndi.find_objects(inst)
    details = {}
    up_pts, lo_pts = [], []
    for n_i, i in enumerate(ids):
        if step:
            step(0.7 + 0.25 * n_i / len(ids))
        sl = objs[i - 1]
        m = inst[sl] == i
        idx = np.argwhere(m) + np.array([s.start for s in sl])
        pr = probs[(slice(None),) + sl][:, m]  # (16, n)
        votes = pr.sum(1)
        upper_v = float(votes[:8].sum())
        lower_v = float(votes[8:].sum())
        pos_v = votes[:8] + votes[8:]
        pos_v = pos_v / max(pos_v.sum(), 1e-9)
        pts = index_to_lps(idx)
        details[i] = {"volume_mm3": float(m.sum() * vox), "centroid": pts.mean(0), "pos_votes": pos_v,
                      "upper_vote": upper_v / max(upper_v + lower_v, 1e-9), "n": int(m.sum())}
        # voxel samples for the occlusal plane, by the voxel's own jaw vote
        up = pr[:8].sum(0) > pr[8:].sum(0)
        every = max(1, len(pts) // 400)
        up_pts.append(pts[up][::every])
        lo_pts.append(pts[~up][::every])
    up_pts = np.concatenate(up_pts) if up_pts else np.zeros((0, 3))
    lo_pts = np.concatenate(lo_pts) if lo_pts else np.zeros((0, 3))
    centre, normal = fit_occlusal_plane(up_pts, lo_pts)

    # quadrant: jaw from the occlusal plane (the jaw vote only very near it), side from the midline
    quads = {q: [] for q in L.QUADRANTS}
    for i in ids:
        c = details[i]["centroid"]
        h = float(np.dot(c - centre, normal))
        upper = h > 0 if abs(h) > 1.5 else details[i]["upper_vote"] >= 0.5
        lr = float(midline.signed(c)[0])
        details[i].update(upper=bool(upper), right=bool(lr < 0), height_mm=h, midline_mm=lr)
        q = L.fdi_from(upper, lr < 0, 1) // 10
        quads[q].append(i)

    # order along the arch: angle around the arch centre, measured from the front
    allc = np.array([details[i]["centroid"] for i in ids])
    arch_c = float(np.mean(midline.along(allc)))
    fdi = {}
    for q, members in quads.items():
        if not members:
            continue
        ang = []
        for i in members:
            c = details[i]["centroid"]
            ang.append(math.atan2(abs(float(midline.signed(c)[0])), -(float(midline.along(c)[0]) - arch_c)))
        order = [members[k] for k in np.argsort(ang)]
        scores = np.log(np.array([smooth_votes(details[i]["pos_votes"]) for i in order]))
        # a tooth-sized instance is kept (at its best free position); a small fragment may be dropped
        skip = [math.log(SKIP_TOOTH if details[i]["volume_mm3"] >= TOOTH_SIZED_MM3 else SKIP_FRAGMENT)
                for i in order]
        cents = np.array([details[i]["centroid"] for i in order])
        dist = np.linalg.norm((cents[:, None, :2] - cents[None, :, :2]), axis=2)  # axial-plane distances
        lateral = np.abs(midline.signed(cents))
        widths = L.MESIODISTAL_MM["upper" if q in L.UPPER_QUADRANTS else "lower"]
        pos = assign_positions_spaced(scores, skip, dist, widths, lateral)
        for i, p in zip(order, pos):
            fdi[i] = q * 10 + p if p else 0
            details[i]["fdi"] = fdi[i]
    return fdi, details
