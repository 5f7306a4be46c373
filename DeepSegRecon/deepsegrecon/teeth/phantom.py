"""Synthetic dental CBCT phantoms with ground-truth tooth (FDI), maxilla and mandible labels.

Only numpy and scipy are used here (no SimpleITK, no torch), so phantoms can be generated for
training on a machine that has neither.

Geometry. The phantom is built in LPS physical millimetres: x toward the patient's Left, y
Posterior, z Superior. The default grid has the identity direction, so array axes (k, j, i) are
(z, y, x). The patient's right side is x < midline; quadrant 1 = upper right, 2 = upper left,
3 = lower left, 4 = lower right.

Anatomy. Upper and lower dental arches (parabolic, U, V or elliptic, of random width and depth,
with a curve of Spee and a tilted occlusal plane), 28-32 teeth (third molars optional) of the
eight FDI types with realistic sizes: crowns (incisal edges, canine cusps, occlusal fossae), a root
trunk and 1-3 tapering roots, an enamel shell (brightest), dentin, a pulp chamber and canals.
Neighbouring crowns overlap slightly at their contact points, the overlap going to the nearer
tooth, so teeth touch and an instance split is needed. Maxilla (alveolar process, palatal vault,
lateral walls with maxillary sinuses) and mandible (alveolar process and body with a cortical lower
border and the mandibular canal) hold the roots, each with a cortical shell around a trabecular
texture; sockets have a periodontal-ligament gap and a lamina dura. Soft tissue (lips, cheeks,
tongue), oral air, nasal cavity, airway and outside air complete the volume. Up to four teeth are
missing (their gap is kept), some crowns carry metal restorations with streak and dark-band
artefacts, and the image is blurred (PSF), shaded (cupping) and noisy, on a HU-like scale.

Families. ``family="A"`` (default) and ``"B"`` differ in voxel size, noise, PSF, intensity scale
(B is an uncalibrated grey scale with air at 0, as many CBCT scanners store it: 0.55 * (HU + 1000)) and arch
shapes, for domain-shift and fine-tuning experiments.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from . import labels as L

TRAIN_SEED_RANGE = (0, 10000)  # training seeds are drawn from here
HELDOUT_SEEDS = range(10000, 10100)  # never used for training: evaluation, demo, tests
DEMO_SEED = 10042

PHANTOM_VERSION = 2  # bump when the generator changes (training caches key on it and on FAMILIES)

# --------------------------------------------------------------------------------------------
# tooth catalogue: mesiodistal width, buccolingual width, crown height, root length (mm), roots
UPPER = {
    1: (8.6, 7.0, 10.5, 13.0, 1), 2: (6.6, 6.2, 9.0, 13.0, 1), 3: (7.6, 8.0, 10.0, 17.0, 1),
    4: (7.0, 9.0, 8.5, 14.0, 2), 5: (6.6, 9.0, 8.0, 14.0, 1), 6: (10.2, 11.2, 7.5, 13.0, 3),
    7: (9.2, 11.0, 7.0, 12.5, 3), 8: (8.6, 10.2, 6.5, 11.0, 3),
}
LOWER = {
    1: (5.2, 6.0, 9.0, 12.5, 1), 2: (5.8, 6.4, 9.5, 14.0, 1), 3: (7.0, 7.6, 11.0, 16.0, 1),
    4: (7.0, 7.6, 8.5, 14.0, 1), 5: (7.2, 8.2, 8.0, 14.5, 1), 6: (11.2, 10.4, 7.5, 14.0, 2),
    7: (10.6, 10.0, 7.0, 13.0, 2), 8: (10.2, 9.6, 7.0, 11.0, 2),
}

# tissue codes (intensity lookup)
AIR, SOFT, TRAB, CORT, PDL, DENTIN, ENAMEL, PULP, METAL, CANAL, INNER_AIR = range(11)
TISSUES = {AIR: "air", SOFT: "soft tissue", TRAB: "trabecular bone", CORT: "cortical bone", PDL: "periodontal ligament",
           DENTIN: "dentin", ENAMEL: "enamel", PULP: "pulp", METAL: "metal", CANAL: "mandibular canal",
           INNER_AIR: "air (sinus, nose, mouth, airway)"}
HU = {AIR: -1000.0, SOFT: 45.0, TRAB: 380.0, CORT: 1350.0, PDL: 80.0, DENTIN: 1750.0, ENAMEL: 2750.0,
      PULP: 160.0, METAL: 7000.0, CANAL: 90.0, INNER_AIR: -930.0}

FAMILIES = {
    "A": dict(spacing=(0.25, 0.5), noise=(25.0, 70.0), psf_mm=(0.3, 0.55), scale=1.0, offset=0.0,
              shapes=("parabolic", "U", "V", "elliptic"), arch_scale=(0.93, 1.07), metal_p=0.55),
    "B": dict(spacing=(0.38, 0.6), noise=(70.0, 130.0), psf_mm=(0.45, 0.8), scale=0.55, offset=550.0,
              shapes=("V", "elliptic", "V", "parabolic"), arch_scale=(0.98, 1.12), metal_p=0.7),
}

# physical field of view (mm) the default grid covers: x (L-R), y (A-P), z (I-S)
_FOV_LO = np.array([86.0, 82.0, 64.0])
_FOV_HI = np.array([104.0, 98.0, 80.0])


def _fam(family: str) -> dict:
    f = str(family).upper()
    if f not in FAMILIES:
        raise ValueError(f"unknown phantom family '{family}'; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[f]


# --------------------------------------------------------------------------------------------
# arches


def _arch_polyline(shape: str, width: float, depth: float, p: float, length: float, n: int = 1200):
    """Half arch (patient's left, x >= 0) from the midline: points (n, 2) in (x, y) with y = 0 at the front,
    cumulative arc length, extended straight along the last tangent until ``length`` is reached."""
    if shape == "elliptic":
        t = np.linspace(0.0, 1.45, n)
        pts = np.stack([width * np.sin(t), depth * (1.0 - np.cos(t))], 1)
    else:
        u = np.linspace(0.0, 1.35, n)
        pts = np.stack([width * u, depth * np.abs(u) ** p], 1)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] < length:
        tan = (pts[-1] - pts[-5]) / np.linalg.norm(pts[-1] - pts[-5])
        extra = np.linspace(0.5, length - s[-1] + 0.5, 60)
        pts = np.concatenate([pts, pts[-1] + extra[:, None] * tan], 0)
        s = np.concatenate([s, s[-1] + extra])
    keep = s <= length
    return pts[keep], s[keep]


def _at(pts, s, q):
    """Point and unit tangent at arc length q (linear interpolation)."""
    x = np.interp(q, s, pts[:, 0])
    y = np.interp(q, s, pts[:, 1])
    dq = 0.5
    x2, y2 = np.interp(q + dq, s, pts[:, 0]), np.interp(q + dq, s, pts[:, 1])
    x1, y1 = np.interp(max(q - dq, 0), s, pts[:, 0]), np.interp(max(q - dq, 0), s, pts[:, 1])
    t = np.array([x2 - x1, y2 - y1])
    t /= np.linalg.norm(t) + 1e-9
    return np.array([x, y]), t


def _unit(v):
    v = np.asarray(v, float)
    return v / (np.linalg.norm(v) + 1e-12)


# --------------------------------------------------------------------------------------------
# grid


def _grid(rng, fam, shape, spacing):
    fov = rng.uniform(_FOV_LO, _FOV_HI)
    if spacing is not None:
        sp = np.broadcast_to(np.asarray(spacing, float), (3,)).copy()
    elif shape is not None:
        sp = np.full(3, float(np.max(_FOV_LO * rng.uniform(1.0, 1.06) / np.asarray(shape, float))))
    else:
        s = rng.uniform(*fam["spacing"])
        sp = np.full(3, s)
        if rng.random() < 0.2:  # some scanners: slightly different slice spacing
            sp[2] = s * rng.uniform(0.9, 1.15)
    if shape is None:
        shape = np.maximum(np.round(fov / sp).astype(int), 16)
    shape = tuple(int(v) for v in shape)  # (i, j, k) = (X, Y, Z)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3 sizes (X, Y, Z) of at least 8, got {shape}")
    extent = (np.array(shape) - 1) * sp
    origin = -extent / 2.0 + rng.uniform(-25.0, 25.0, 3)
    centre = origin + extent / 2.0
    return shape, sp, origin, centre


# --------------------------------------------------------------------------------------------
# the generator


def phantom_grid(seed: int, shape=None, spacing=None, family: str = "A"):
    """The grid ``generate_teeth_phantom`` would use: ((X, Y, Z) shape, (i, j, k) spacing, origin), cheaply."""
    fam = _fam(family)
    rng = np.random.default_rng([int(seed), ord(str(family).upper()[0])])
    shape, sp, origin, _ = _grid(rng, fam, shape, spacing)
    return shape, tuple(sp.tolist()), tuple(origin.tolist())


def generate_teeth_phantom(seed: int, shape=None, spacing=None, family: str = "A", missing=None,
                           metal=None, third_molars=None, return_tissue: bool = False):
    """Generate a phantom CBCT and its ground-truth labelmap.

    ``shape`` is (X, Y, Z) = (i, j, k) voxels; ``spacing`` a scalar or (i, j, k) mm. Leaving them
    out picks a random voxel size of the family and a field of view of about 9-10 x 8-10 x 6-8 cm;
    giving only ``shape`` picks the voxel size that fits the jaws. ``missing`` (list of FDI numbers),
    ``metal`` (True/False or list of FDI numbers) and ``third_molars`` (True/False) override the
    random choices; ``return_tissue`` adds the tissue-class array (``TISSUES``) as ``info["tissue"]``. Returns ``(cbct, labels, info)``: two :class:`~deepsegrecon.image.Image` on the
    same grid (int16 HU-like, uint8 labels) and a dict describing the phantom.
    """
    from ..image import Image  # numpy only

    t0 = time.perf_counter()
    fam = _fam(family)
    rng = np.random.default_rng([int(seed), ord(str(family).upper()[0])])
    shape, sp, origin, centre = _grid(rng, fam, shape, spacing)
    X, Y, Z = shape
    xs = origin[0] + np.arange(X) * sp[0]
    ys = origin[1] + np.arange(Y) * sp[1]
    zs = origin[2] + np.arange(Z) * sp[2]

    # ---------------- patient layout
    arch_shape = str(rng.choice(fam["shapes"]))
    p_exp = {"parabolic": rng.uniform(1.8, 2.2), "U": rng.uniform(2.8, 3.8), "V": rng.uniform(1.25, 1.55),
             "elliptic": 2.0}[arch_shape]
    scale = rng.uniform(*fam["arch_scale"])
    width = rng.uniform(23.0, 28.0) * scale
    depth = rng.uniform(30.0, 40.0) * scale
    tooth_scale = rng.uniform(0.94, 1.06)
    mid_x = centre[0] + rng.uniform(-3.0, 3.0)
    y_front = centre[1] - rng.uniform(38.0, 44.0) * min(scale, 1.0)
    z_occ0 = centre[2] + rng.uniform(-3.0, 3.0)
    spee = rng.uniform(0.0, 3.0)
    pitch = math.radians(rng.uniform(-6.0, 6.0))
    gap = rng.uniform(-0.3, 1.2)  # vertical gap between the arches (<0: in firm occlusion)
    overjet = rng.uniform(1.5, 3.5)
    lower_scale = rng.uniform(0.9, 0.96)

    def z_occ(y, q):
        return z_occ0 + spee * (q / 60.0) ** 2 + math.tan(pitch) * (y - y_front)

    # ---------------- which teeth
    present = set(L.FDI)
    if third_molars is None:
        for q in L.QUADRANTS:
            if rng.random() < 0.35:
                present.discard(q * 10 + 8)
    elif not third_molars:
        present -= {q * 10 + 8 for q in L.QUADRANTS}
    n_wisdom_missing = len({q * 10 + 8 for q in L.QUADRANTS} - present)
    if missing is None:
        k = int(rng.choice([0, 1, 1, 2, 2, 3, 4]))
        cands = [f for f in sorted(present) if L.position(f) != 8]
        missing = sorted(int(v) for v in rng.choice(cands, size=k, replace=False)) if k else []
    else:
        missing = sorted(int(v) for v in missing)
    present -= set(missing)
    if metal is None:
        n_metal = int(rng.integers(1, 4)) if rng.random() < fam["metal_p"] else 0
    elif metal is True:
        n_metal = int(rng.integers(1, 4))
    elif metal is False:
        n_metal = 0
    else:
        n_metal = -1
    if n_metal >= 0:
        post = [f for f in sorted(present) if L.position(f) >= 4]
        metal_teeth = sorted(int(v) for v in rng.choice(post, size=min(n_metal, len(post)), replace=False))
    else:
        metal_teeth = sorted(int(v) for v in metal if int(v) in present)

    # ---------------- arches and tooth frames (all 32 positions are laid out; missing ones leave a gap)
    teeth = {}
    arches = {}
    for upper in (True, False):
        cat = UPPER if upper else LOWER
        widths = {p: cat[p][0] * tooth_scale * rng.uniform(0.97, 1.03) for p in L.POSITIONS}
        total = sum(widths.values())
        sc = 1.0 if upper else lower_scale
        y0 = y_front + (0.0 if upper else overjet)
        pts, s = _arch_polyline(arch_shape, width * sc, depth * sc, p_exp, total + 16.0)
        arches[upper] = (pts, s, y0, total)
        for right in (True, False):
            sign = -1.0 if right else 1.0
            acc = 0.0
            for p in L.POSITIONS:
                w = widths[p]
                q = acc + w / 2.0
                acc += w
                fdi = L.fdi_from(upper, right, p)
                xy, tan = _at(pts, s, q)
                pos_xy = np.array([mid_x + sign * xy[0], y0 + xy[1]])
                m = np.array([sign * tan[0], tan[1], 0.0])  # mesiodistal, pointing distally
                b = _unit(np.array([m[1], -m[0], 0.0]) * (1 if right else -1))  # buccal (outward)
                if np.dot(b[:2], pos_xy - np.array([mid_x, y0 + depth * 0.6])) < 0:
                    b = -b
                _, bl, hc, hr, nroots = cat[p]
                bl *= tooth_scale * rng.uniform(0.96, 1.04)
                hc *= tooth_scale * rng.uniform(0.95, 1.05)
                hr *= tooth_scale * rng.uniform(0.9, 1.1)
                # crown axis (root -> crown), tilted buccally (incisors proclined) and mesiodistally
                incl = math.radians({1: 18, 2: 16, 3: 10, 4: 5, 5: 4, 6: 2, 7: 0, 8: -2}[p] * (1 if upper else 0.7)
                                    + rng.uniform(-4, 4))
                if not upper and p >= 6:
                    incl = math.radians(-rng.uniform(2, 8))
                tip = math.radians(rng.uniform(-3, 3) + (2 if p <= 3 else 0))
                vz = -1.0 if upper else 1.0
                v = _unit(np.array([0, 0, vz]) * math.cos(incl) + b * math.sin(incl) - m * math.sin(tip))
                m2 = _unit(m - np.dot(m, v) * v)
                b2 = _unit(np.cross(v, m2))
                if np.dot(b2, b) < 0:
                    b2 = -b2
                z_tip = z_occ(pos_xy[1], q) + (gap / 2 if upper else -gap / 2)
                if upper and p <= 3:
                    z_tip -= rng.uniform(1.0, 2.5)  # overbite of the upper front teeth
                cej = np.array([pos_xy[0], pos_xy[1], z_tip]) - hc * v
                cej[:2] = pos_xy - 0.65 * hc * v[:2]  # the contact height (widest part) sits on the arch slot
                teeth[fdi] = dict(fdi=fdi, upper=upper, right=right, pos=p, s=q, cej=cej, v=v, m=m2, b=b2,
                                  md=w, bl=bl, hc=hc, hr=hr, nroots=nroots if not (upper and p == 4 and rng.random() < 0.3) else 1,
                                  z_crest=cej[2] + (1.6 if upper else -1.6))

    # ---------------- volumes
    tissue = np.full((Z, Y, X), AIR, np.uint8)
    lab = np.zeros((Z, Y, X), np.uint8)

    # soft-tissue envelope (face and neck), tongue, airway
    fx = width * scale + rng.uniform(22, 30)
    fy_front = y_front - rng.uniform(10, 16)
    fy_back = y_front + depth + rng.uniform(30, 50)
    cy = (fy_front + fy_back) / 2
    ry = (fy_back - fy_front) / 2
    X2 = xs[None, :]
    Y2 = ys[:, None]
    env2 = ((X2 - mid_x) / fx) ** 2 + ((Y2 - cy) / ry) ** 2 <= 1.0
    tissue[:, env2] = SOFT
    airway_y = y_front + depth * 1.05 + rng.uniform(14, 22)
    airway2 = ((X2 - mid_x) / rng.uniform(7, 11)) ** 2 + ((Y2 - airway_y) / rng.uniform(5, 8)) ** 2 <= 1.0
    tissue[:, airway2 & env2] = INNER_AIR

    # per-jaw 2-D maps: distance to the arch line, arc position and inside-the-arch flag
    maps = {}
    dx2 = float(sp[0])
    for upper in (True, False):
        pts, s, y0, total = arches[upper]
        ext = 6.0 if upper else 14.0  # maxillary tuberosity / mandibular body behind the last molar
        keep = s <= total + ext
        P = pts[keep]
        S = s[keep]
        full = np.concatenate([np.stack([mid_x - P[::-1, 0], y0 + P[::-1, 1]], 1),
                               np.stack([mid_x + P[:, 0], y0 + P[:, 1]], 1)])
        fs = np.concatenate([S[::-1], S])
        # rasterise the polyline densely onto the (j, i) grid
        fine = max(4, int(np.ceil(1.5 * np.max(np.linalg.norm(np.diff(full, axis=0), axis=1)) / min(sp[:2]))))
        tt = np.linspace(0, 1, fine + 1)[:-1]
        seg = full[:-1, None, :] * (1 - tt[None, :, None]) + full[1:, None, :] * tt[None, :, None]
        seg = seg.reshape(-1, 2)
        segs = (fs[:-1, None] * (1 - tt[None]) + fs[1:, None] * tt[None]).reshape(-1)
        ii = np.round((seg[:, 0] - origin[0]) / sp[0]).astype(int)
        jj = np.round((seg[:, 1] - origin[1]) / sp[1]).astype(int)
        ok = (ii >= 0) & (ii < X) & (jj >= 0) & (jj < Y)
        line = np.ones((Y, X), bool)
        sval = np.zeros((Y, X), np.float32)
        line[jj[ok], ii[ok]] = False
        sval[jj[ok], ii[ok]] = segs[ok]
        if ok.sum() == 0:
            dist = np.full((Y, X), 1e3, np.float32)
            near_s = np.zeros((Y, X), np.float32)
        else:
            dist, ind = ndi.distance_transform_edt(line, sampling=(sp[1], sp[0]), return_indices=True)
            near_s = sval[ind[0], ind[1]]
        # inside the arch: behind the front teeth, between the two sides, in front of the last molars
        half = np.interp(Y2 - y0, P[:, 1], P[:, 0], left=0.0, right=P[-1, 0])
        inside = (np.abs(X2 - mid_x) < half) & (Y2 > y0) & (Y2 < y0 + P[-1, 1])
        # crest height along the arch: interpolate the teeth's crest heights by arc position
        qs = np.array([teeth[L.fdi_from(upper, True, p)]["s"] for p in L.POSITIONS])
        zc_r = np.array([teeth[L.fdi_from(upper, True, p)]["z_crest"] for p in L.POSITIONS])
        zc_l = np.array([teeth[L.fdi_from(upper, False, p)]["z_crest"] for p in L.POSITIONS])
        right_side = X2 < mid_x
        zcrest = np.where(right_side, np.interp(near_s, qs, zc_r), np.interp(near_s, qs, zc_l)).astype(np.float32)
        maps[upper] = dict(dist=dist.astype(np.float32), s=near_s, inside=inside, zcrest=zcrest)
    del dx2

    # bone: alveolar process (band around the arch line), palatal vault, maxillary walls, mandibular body
    tc = rng.uniform(1.1, 1.8)  # cortical thickness
    Zc = zs[:, None, None].astype(np.float32)
    for upper in (True, False):
        mp = maps[upper]
        depthz = (Zc - mp["zcrest"][None]) * (1 if upper else -1)  # mm into the bone from the crest
        hw = (5.6 + 2.2 * np.clip(depthz / 14.0, 0, 1)).astype(np.float32) * np.float32(scale)
        dist = mp["dist"][None]
        if upper:
            band = (depthz >= 0) & (dist <= hw)
            # palatal vault: rises from the crest toward the middle of the palate
            d_in = np.where(mp["inside"], mp["dist"], 0.0)
            vault = (3.0 + 0.95 * np.minimum(d_in, 14.0)).astype(np.float32)
            pal_t = rng.uniform(2.0, 4.0)
            palate = mp["inside"][None] & (depthz >= vault[None] - 0.5) & (depthz <= vault[None] + pal_t)
            bone = band | palate
            cortical = band & ((hw - dist < tc) | (depthz < tc)) | palate & (
                (depthz - vault[None] < 0.9) | (vault[None] + pal_t - depthz < 0.9))
            # maxillary sinuses above the posterior roots, nasal cavity above the palate
            apex = max(t["hr"] for f, t in teeth.items() if t["upper"]) + 2.5
            sinus = band & (depthz > apex) & (dist < hw - tc) & (mp["s"][None] > 24.0)
            nasal = mp["inside"][None] & (depthz > vault[None] + pal_t) & (
                np.abs(X2 - mid_x) > 1.0)[None]
            tissue[nasal & (tissue[:] != AIR)] = INNER_AIR
            # oral air between tongue and palate
            oral = mp["inside"][None] & (depthz > -rng.uniform(2, 5)) & (depthz < vault[None] - 1.0) & (
                Y2 > arches[True][2] + rng.uniform(8, 14))[None]
            tissue[oral] = INNER_AIR
        else:
            hmax = rng.uniform(26.0, 34.0)
            band = (depthz >= 0) & (depthz <= hmax) & (dist <= hw)
            bone = band
            cortical = band & ((hw - dist < tc) | (depthz < tc) | (hmax - depthz < tc * 1.8))
            sinus = None
            # mandibular canal along the body, below the roots
            dc = max(t["hr"] for f, t in teeth.items() if not t["upper"]) + 4.0
            canal = band & (dist < 1.3) & (np.abs(depthz - dc) < 1.3) & (mp["s"][None] > 20.0)
        tissue[bone] = TRAB
        tissue[cortical] = CORT
        lab[bone] = L.MAXILLA if upper else L.MANDIBLE
        if upper:
            tissue[sinus] = INNER_AIR
            lab[sinus] = 0
        else:
            tissue[canal] = CANAL
        del depthz, hw, band, bone, cortical

    # teeth, each in its own bounding box; overlaps go to the tooth whose surface is farther
    best = np.full((Z, Y, X), np.float16(np.inf), np.float16)
    metal_info = {}
    tooth_info = {}
    for fdi in sorted(teeth):
        t = teeth[fdi]
        if fdi not in present:
            continue
        has_metal = fdi in metal_teeth
        mkind = str(rng.choice(["onlay", "crown", "filling"])) if has_metal else None
        _raster_tooth(t, origin, sp, shape, tissue, lab, best, rng, mkind)
        tooth_info[fdi] = {"cej": t["cej"].tolist(), "axis": t["v"].tolist(), "crown_height": t["hc"],
                           "root_length": t["hr"], "mesiodistal": t["md"], "roots": t["nroots"]}
        if has_metal:
            metal_info[fdi] = mkind
    del best

    # ---------------- intensities
    jitter = {k: v for k, v in HU.items()}
    for k in (TRAB, CORT, DENTIN, ENAMEL, SOFT, PULP):
        jitter[k] = HU[k] * rng.uniform(0.92, 1.08) if HU[k] > 100 else HU[k] + rng.uniform(-20, 20)
    lut = np.array([jitter[k] for k in range(11)], np.float32)
    vol = lut[tissue]
    # trabecular texture (coarse noise, upsampled) and soft-tissue variation
    tex = _smooth_noise(rng, (Z, Y, X), sp, 1.2)
    trab = tissue == TRAB
    vol[trab] += (260.0 * np.tanh(1.6 * tex[trab])).astype(np.float32)
    soft = tissue == SOFT
    vol[soft] += (25.0 * tex[soft]).astype(np.float32)
    del tex, trab, soft

    # metal artefacts: radiating streaks and dark bands between metal objects, slice by slice
    if metal_info:
        _metal_streaks(vol, tissue, origin, sp, rng)

    # CBCT shading (cupping), PSF blur, noise
    rr = ((X2 - centre[0]) / (X * sp[0] / 2)) ** 2 + ((Y2 - centre[1]) / (Y * sp[1] / 2)) ** 2
    cup = (1.0 - rng.uniform(0.0, 0.06) * np.minimum(rr, 1.5)).astype(np.float32)
    vol = (vol + 1000.0) * cup[None] - 1000.0
    psf = rng.uniform(*fam["psf_mm"])
    vol = ndi.gaussian_filter(vol, sigma=tuple(psf / sp[::-1]), mode="nearest", truncate=3.0)
    nstd = rng.uniform(*fam["noise"])
    noise = rng.standard_normal((Z, Y, X), dtype=np.float32)
    noise = ndi.gaussian_filter(noise, 0.6, truncate=2.5)
    noise *= np.float32(nstd / 0.42)  # the filter keeps ~0.42 of the std
    vol += noise
    del noise
    vol = vol * np.float32(fam["scale"]) + np.float32(fam["offset"])
    cbct = np.clip(np.round(vol), -1024, 15000).astype(np.int16)

    meta = {"phantom": "teeth", "seed": int(seed), "family": str(family).upper()}
    direction = np.eye(3)
    cbct_img = Image(cbct, tuple(sp), tuple(origin), direction, dict(meta))
    lab_img = Image(lab, tuple(sp), tuple(origin), direction.copy(), dict(meta))
    info = {
        "seed": int(seed), "family": str(family).upper(), "shape": list(shape), "spacing": sp.tolist(),
        "origin": origin.tolist(), "present": sorted(int(v) for v in np.unique(lab) if v in L.FDI),
        "missing": sorted(missing), "third_molars_absent": n_wisdom_missing, "metal": metal_info,
        "arch_shape": arch_shape, "arch_width": width, "arch_depth": depth, "midline_x": mid_x,
        "occlusal_z": z_occ0, "noise_std": nstd, "psf_mm": psf, "teeth": tooth_info,
        "intensity": {"scale": fam["scale"], "offset": fam["offset"]},
        "time_s": round(time.perf_counter() - t0, 2),
    }
    if return_tissue:
        info["tissue"] = tissue
    return cbct_img, lab_img, info


def _smooth_noise(rng, shape, sp, corr_mm):
    """Gaussian noise with a correlation length of about ``corr_mm``, unit std, made on a coarse grid."""
    f = max(1, int(round(corr_mm / float(np.min(sp)) / 1.5)))
    cs = tuple(max(2, -(-n // f) + 1) for n in shape)
    c = rng.standard_normal(cs).astype(np.float32)
    c = ndi.gaussian_filter(c, 0.8)
    c /= c.std() + 1e-6
    if f == 1:
        return c[: shape[0], : shape[1], : shape[2]]
    out = ndi.zoom(c, f, order=1, prefilter=False, grid_mode=False)
    return out[: shape[0], : shape[1], : shape[2]]


def _profile(t, base, peak_at, top):
    """Crown half-width along the crown height t in [0, 1]: base at the CEJ, 1 at ``peak_at``, ``top`` at the tip."""
    up = base + (1 - base) * np.sin(0.5 * np.pi * np.clip(t / peak_at, 0, 1))
    down = 1 - (1 - top) * np.clip((t - peak_at) / (1 - peak_at), 0, 1) ** 2
    return np.where(t < peak_at, up, down)


def _raster_tooth(t, origin, sp, shape, tissue, lab, best, rng, metal_kind):
    X, Y, Z = shape
    p = t["pos"]
    hc, hr, md, bl = t["hc"], t["hr"], t["md"], t["bl"]
    a0 = md / 2 * 1.03  # slightly wider than the slot: neighbours overlap at the contact points
    b0 = bl / 2
    R = max(a0, b0) * 1.5 + 0.2 * hr
    corners = np.array([t["cej"] + su * R * t["m"] + sw * R * t["b"] + h * t["v"]
                        for su in (-1, 1) for sw in (-1, 1) for h in (-hr - 1.5, hc + 0.8)])
    lo = np.floor((corners.min(0) - origin) / sp).astype(int)
    hi = np.ceil((corners.max(0) - origin) / sp).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array([X, Y, Z]))
    if np.any(hi <= lo):
        return
    xs = (origin[0] + np.arange(lo[0], hi[0]) * sp[0] - t["cej"][0]).astype(np.float32)
    ys = (origin[1] + np.arange(lo[1], hi[1]) * sp[1] - t["cej"][1]).astype(np.float32)
    zs = (origin[2] + np.arange(lo[2], hi[2]) * sp[2] - t["cej"][2]).astype(np.float32)
    dz, dy, dx = zs[:, None, None], ys[None, :, None], xs[None, None, :]
    m, b, v = t["m"].astype(np.float32), t["b"].astype(np.float32), t["v"].astype(np.float32)
    u = dx * m[0] + dy * m[1] + dz * m[2]
    w = dx * b[0] + dy * b[1] + dz * b[2]
    h = dx * v[0] + dy * v[1] + dz * v[2]
    inf = np.float32(np.inf)

    # ---- crown
    tt = h / hc
    if p <= 2:  # incisors: wide incisal edge, thin bucco-lingually
        A = a0 * _profile(tt, 0.72, 0.75, 0.92)
        B = b0 * _profile(tt, 0.85, 0.35, 0.28)
        cap = 0.93
    elif p == 3:  # canine: pointed cusp
        A = a0 * _profile(tt, 0.7, 0.55, 0.3)
        B = b0 * _profile(tt, 0.85, 0.45, 0.4)
        cap = 0.85
    else:  # premolars and molars: bulging crown, rounded occlusal table
        A = a0 * _profile(tt, 0.78, 0.62, 0.84)
        B = b0 * _profile(tt, 0.8, 0.45, 0.8)
        cap = 0.78
    e = 2.6
    with np.errstate(divide="ignore", invalid="ignore"):
        rc = ((np.abs(u) / A) ** e + (np.abs(w) / B) ** e) ** (1.0 / e)
        capz = np.maximum(tt - cap, 0) / (1 - cap)
        val_c = np.sqrt(rc ** 2 + capz ** 2).astype(np.float32)
    val_c[h < 0] = inf
    if p >= 4:  # occlusal fossa
        fossa = (u / (0.45 * a0)) ** 2 + (w / (0.42 * b0)) ** 2 + ((h - hc * 1.04) / (0.2 * hc)) ** 2 < 1
        val_c[fossa] = inf
    # enamel: the outer shell of the crown, thinning to nothing at the CEJ
    te = (1.2 if p >= 4 else 0.9) * np.clip(tt / 0.3, 0, 1)
    te_top = 1.8 if p >= 4 else 1.3
    with np.errstate(divide="ignore", invalid="ignore"):
        Ai, Bi = np.maximum(A - te, 0.05), np.maximum(B - te, 0.05)
        rci = ((np.abs(u) / Ai) ** e + (np.abs(w) / Bi) ** e) ** (1.0 / e)
        hci = hc - te_top
        capi = np.maximum(h / hci - cap, 0) / (1 - cap)
        inner = np.sqrt(rci ** 2 + capi ** 2) <= 1
    chamber = (((u / (0.33 * a0)) ** 2 + (w / (0.36 * b0)) ** 2) <= 1) & (h > -1.0) & (h < 0.5 * hc)

    # ---- root trunk and roots
    d = -h  # depth below the CEJ
    A0, B0 = a0 * 0.74, b0 * 0.82
    nroots = t["nroots"]
    val_r = np.full(u.shape, inf, np.float32)
    dist_r = np.full(u.shape, inf, np.float32)
    canal = np.zeros(u.shape, bool)
    if nroots == 1:
        roots = [(0.0, 0.0, A0, B0, hr)]
        dfurc = 0.0
    else:
        dfurc = rng.uniform(2.5, 4.0)
        if nroots == 2 and t["upper"]:  # upper first premolar: buccal and palatal roots
            roots = [(0.0, 0.5 * B0, A0 * 0.85, B0 * 0.5, hr), (0.0, -0.5 * B0, A0 * 0.8, B0 * 0.48, hr * 0.95)]
        elif nroots == 2:  # lower molars: mesial and distal roots
            roots = [(-0.5 * A0, 0.0, A0 * 0.45, B0 * 0.85, hr), (0.5 * A0, 0.0, A0 * 0.42, B0 * 0.8, hr * 0.93)]
        else:  # upper molars: two buccal roots and a palatal one
            roots = [(-0.45 * A0, 0.45 * B0, A0 * 0.4, B0 * 0.42, hr * 0.92),
                     (0.45 * A0, 0.45 * B0, A0 * 0.38, B0 * 0.4, hr * 0.88),
                     (0.0, -0.5 * B0, A0 * 0.5, B0 * 0.45, hr)]
        trunk_s = 1 - 0.15 * np.clip(d / dfurc, 0, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rt = np.sqrt((u / (A0 * trunk_s)) ** 2 + (w / (B0 * trunk_s)) ** 2)
        ok = (d >= 0) & (d <= dfurc + 0.5)
        val_r = np.where(ok, rt, inf).astype(np.float32)
        dist_r = np.where(ok, (rt - 1) * np.minimum(A0, B0) * trunk_s, inf).astype(np.float32)
        canal |= ok & (rt < 0.3)
    for (ou, ow, ru, rw, L_) in roots:
        x = np.clip(d / L_, 0, None)
        spread = (0.35 + 0.65 * np.clip(d / max(dfurc, 1e-3), 0, 1)) * (1 + 0.25 * x) if dfurc > 0 else 1.0
        cu, cw = ou * spread, ow * spread
        taper = np.sqrt(np.clip(1 - x ** 2.2, 0, None)) * (1 - 0.35 * x) + 1e-3
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt(((u - cu) / (ru * taper)) ** 2 + ((w - cw) / (rw * taper)) ** 2)
        ok = (d >= max(dfurc - 1.0, 0.0) if dfurc > 0 else d >= 0) & (x <= 1.0)
        r = np.where(ok, r, inf).astype(np.float32)
        val_r = np.minimum(val_r, r)
        dist_r = np.minimum(dist_r, np.where(ok, (r - 1) * np.minimum(ru, rw) * taper, inf).astype(np.float32))
        canal |= ok & (r < 0.28) & (x < 0.93)

    val = np.minimum(val_c, val_r)
    inside = val <= 1.0
    sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    T, Lb, Bst = tissue[sl], lab[sl], best[sl]
    # periodontal ligament and lamina dura around the roots, where there is bone
    pdl_w = 0.25
    bone_here = (Lb == L.MAXILLA) | (Lb == L.MANDIBLE)
    ring = bone_here & ~inside & (dist_r > 0) & (dist_r <= pdl_w + 0.6)
    T[ring & (dist_r <= pdl_w)] = PDL
    Lb[ring & (dist_r <= pdl_w)] = 0
    T[ring & (dist_r > pdl_w)] = CORT
    # the tooth itself
    win = inside & (val.astype(np.float16) < Bst)
    tis = np.where(inner | (h < 0), DENTIN, ENAMEL).astype(np.uint8)
    tis[(chamber | canal)] = PULP
    if metal_kind == "onlay":
        tis[(h > hc * rng.uniform(0.55, 0.7)) & (np.abs(u) < 0.75 * a0)] = METAL
    elif metal_kind == "crown":
        tis[(h > hc * 0.15) & ~((u / (0.55 * a0)) ** 2 + (w / (0.55 * b0)) ** 2 < 1) | (h > hc * 0.85)] = METAL
    elif metal_kind == "filling":
        tis[((u - 0.2 * a0) / (0.4 * a0)) ** 2 + (w / (0.35 * b0)) ** 2 + ((h - hc) / (0.45 * hc)) ** 2 < 1] = METAL
    T[win] = tis[win]
    Lb[win] = t["fdi"]
    Bst[win] = val[win].astype(np.float16)


def _metal_streaks(vol, tissue, origin, sp, rng):
    """Radiating bright/dark streaks around metal, and dark bands between metal objects in the same slices."""
    Z, Y, X = vol.shape
    metal = tissue == METAL
    zk = np.nonzero(metal.any(axis=(1, 2)))[0]
    if zk.size == 0:
        return
    lab3, n = ndi.label(metal)
    objs = ndi.find_objects(lab3)
    cents = ndi.center_of_mass(metal, lab3, range(1, n + 1))
    jj = np.arange(Y, dtype=np.float32)[:, None] * sp[1]
    ii = np.arange(X, dtype=np.float32)[None, :] * sp[0]
    streak2 = np.zeros((Y, X), np.float32)
    for c in cents:
        cy, cx = c[1] * sp[1], c[2] * sp[0]
        r = np.sqrt((jj - cy) ** 2 + (ii - cx) ** 2) + 1e-3
        th = np.arctan2(jj - cy, ii - cx)
        nstreak = int(rng.integers(6, 14))
        phase = rng.uniform(0, 2 * np.pi)
        pattern = np.cos(nstreak * th + phase) + 0.5 * np.cos(2.3 * nstreak * th + 2 * phase)
        streak2 += (rng.uniform(250, 550) * pattern * np.exp(-r / rng.uniform(18, 30))
                    * (1 - np.exp(-(r / 3.0) ** 2))).astype(np.float32)
    for a in range(len(cents)):
        for bb in range(a + 1, len(cents)):
            p0 = np.array([cents[a][1] * sp[1], cents[a][2] * sp[0]])
            p1 = np.array([cents[bb][1] * sp[1], cents[bb][2] * sp[0]])
            dvec = p1 - p0
            ln = np.linalg.norm(dvec) + 1e-6
            tt = np.clip(((jj - p0[0]) * dvec[0] + (ii - p0[1]) * dvec[1]) / ln ** 2, 0, 1)
            dd = np.sqrt((jj - p0[0] - tt * dvec[0]) ** 2 + (ii - p0[1] - tt * dvec[1]) ** 2)
            streak2 -= (rng.uniform(300, 600) * np.exp(-(dd / 2.0) ** 2) * (1 - np.exp(-((ln / 10) ** 2)))).astype(np.float32)
    # weight per slice: metal content of the slice, with a short fall-off above and below
    content = metal.sum(axis=(1, 2)).astype(np.float32)
    wz = np.clip(content / max(content.max(), 1), 0, 1) ** 0.5
    wz = ndi.gaussian_filter1d(wz, 1.0 / sp[2])
    wz /= max(wz.max(), 1e-6)
    for k in np.nonzero(wz > 0.02)[0]:
        vol[k] += wz[k] * streak2
    del lab3, objs


# --------------------------------------------------------------------------------------------
# writing


def write_phantom(seed: int, out_dir, shape=None, family: str = "A", spacing=None, **kw) -> dict:
    """Write ``out_dir/cbct.nrrd`` and ``out_dir/labels.seg.nrrd`` (segments tooth_11..tooth_48,
    maxilla, mandible); returns the phantom's info dict with the two paths added."""
    from ..files import check_writable_dir
    from ..io import write_image
    from ..results import SegmentationResult
    from ..segio import write_seg_nrrd

    out_dir = check_writable_dir(Path(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    cbct, lab, info = generate_teeth_phantom(seed, shape=shape, spacing=spacing, family=family, **kw)
    present = [int(v) for v in np.unique(lab.array) if v]
    result = SegmentationResult(lab, L.segment_infos(present), absent=[L.segment_name(f) for f in info["missing"]],
                                report={"phantom": {k: info[k] for k in ("seed", "family", "present", "missing")}})
    cpath = write_image(cbct, out_dir / "cbct.nrrd")
    lpath = write_seg_nrrd(result, out_dir / "labels.seg.nrrd")
    info = dict(info, cbct=str(cpath), labels=str(lpath))
    return info


def write_demo_volume(path, seed: int = DEMO_SEED, shape=(162, 154, 116), spacing: float = 0.52, quantum: int = 8):
    """Write the demo CBCT (``Resources/Data/demo_cbct.nrrd``): held-out phantom ``seed`` on a tight field
    of view, grey values rounded to ``quantum`` HU (well under the noise) so the compressed file stays
    under 3 MB. Returns the phantom's info (missing teeth, metal, ...). Needs SimpleITK (io)."""
    from ..io import write_image

    cbct, _, info = generate_teeth_phantom(seed, shape=shape, spacing=spacing)
    q = (np.round(cbct.array.astype(np.float32) / quantum) * quantum).astype(np.int16)
    write_image(cbct.with_array(q, demo=f"teeth phantom seed {seed} (held out)"), Path(path))
    return info
