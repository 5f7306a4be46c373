"""Head phantoms: the jaw phantom of :mod:`.phantom` inside a whole head, for the stage-1 network to learn
what is *not* a tooth (issue 19).

Around the jaws: skin and soft tissue, the cranial vault (two cortical tables and the diploe) with the brain,
the skull base with the dense petrous bones, orbits (fat, eyes, bony rims), the nasal cavity with its septum
and turbinates, maxillary and frontal sinuses (air behind thin bony walls), nasal bones, zygomatic arches,
the mandibular rami, the cervical spine (bodies, discs, arches, spinous processes), the pharynx, the hyoid,
sometimes earrings and a head holder or chin rest. The head can be tilted (up to 15 degrees), the mouth
opened, and the field of view runs from one arch to the whole head, or above or below the teeth only (no
teeth at all). Rendering as CT (HU, thin or thick slices) or CBCT (uncalibrated grey values, noise,
cupping, rings, metal streaks, a truncated field of view).

Labels as the jaw phantom's (maxilla, mandible, FDI teeth); everything else is background. Only numpy and
scipy. Coordinates: LPS mm, arrays (z, y, x), identity direction, as in :mod:`.phantom`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from . import labels as L
from .phantom import (
    AIR,
    CORT,
    DENTIN,
    ENAMEL,
    HU,
    INNER_AIR,
    METAL,
    SOFT,
    TRAB,
    _metal_streaks,
    _smooth_noise,
    generate_teeth_phantom,
)

BRAIN, FAT, PLASTIC, SKULL = 11, 12, 13, 14
HEAD_HU = dict(HU) | {BRAIN: 35.0, FAT: -90.0, PLASTIC: 150.0, SKULL: 1800.0}
FIELDS = ("head", "large", "jaws", "upper", "lower", "above", "below")
FIELD_P = (0.22, 0.26, 0.14, 0.14, 0.08, 0.1, 0.06)


def _ell(X, Y, Z, c, r):
    """Normalised ellipsoid radius: <= 1 inside."""
    return np.sqrt(((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2)


def _anatomy(X, Y, Z, a, rng):
    """Tissue codes of the head (without the jaw block) on the grid (X, Y, Z broadcastable arrays)."""
    x0, yf, z0 = a["x0"], a["yf"], a["z0"]
    shape = np.broadcast_shapes(X.shape, Y.shape, Z.shape)
    t = np.full(shape, AIR, np.uint8)
    s = a["s"]  # head size factor
    # skin envelope: cranium, face, neck
    crc, crr = (x0, yf + 95 * s, z0 + 95 * s), (72 * s, 98 * s, 88 * s)
    q = _ell(X, Y, Z, crc, crr)
    face = (((X - x0) / (a["w"] + 27)) ** 2 + ((Y - (yf + 55 * s)) / (70 * s)) ** 2 <= 1) & (Z > z0 - 70) & (Z < z0 + 90)
    neck = (((X - x0) / (52 * s)) ** 2 + ((Y - (yf + 85 * s)) / (50 * s)) ** 2 <= 1) & (Z < z0 - 20)
    t[(q <= 1) | face | neck] = SOFT
    nose = _ell(X, Y, Z, (x0, yf - 6, z0 + 40), (14, 16, 24)) <= 1
    t[nose] = SOFT
    t[(_ell(X, Y, Z, (x0 - 6, yf - 14, z0 + 22), (3, 4, 3)) <= 1) | (_ell(X, Y, Z, (x0 + 6, yf - 14, z0 + 22), (3, 4, 3)) <= 1)] = AIR
    # cranial vault: skin 5 mm, outer table, diploe, inner table; brain inside; only above the skull base
    k = (crr[0] - 5) / crr[0]
    r_out = tuple(v * k for v in crr)
    th = a["skull"]
    r_in = tuple(v - th for v in r_out)
    tab = a["table"]  # compact tables: real skulls are bright (1500-2300 HU) and often more table than diploe
    r_dip = tuple(v - tab for v in r_out)
    r_dip_in = tuple(v + tab for v in r_in)
    vault = Z > z0 + 40 * s
    qo, qi = _ell(X, Y, Z, crc, r_out), _ell(X, Y, Z, crc, r_in)
    qd, qdi = _ell(X, Y, Z, crc, r_dip), _ell(X, Y, Z, crc, r_dip_in)
    t[vault & (qo <= 1) & (qi > 1)] = SKULL
    t[vault & (qd <= 1) & (qdi > 1)] = TRAB
    t[vault & (qi <= 1)] = BRAIN
    # skull base with the petrous ridges
    base = (np.abs(Z - (z0 + 44 * s)) < 3.5) & (Y > yf + 45 * s) & (Y < yf + 165 * s) & (np.abs(X - x0) < 58 * s) & (qi <= 1)
    t[base] = TRAB
    t[base & (np.abs(Z - (z0 + 44 * s)) > 2.3)] = SKULL
    for sx in (-1, 1):
        pet = _ell(X, Y, Z, (x0 + sx * 33 * s, yf + 112 * s, z0 + 50 * s), (16, 7, 6)) <= 1
        t[pet] = SKULL
    # frontal sinus in the thickened frontal bone
    fs = _ell(X, Y, Z, (x0, yf + 9 * s, z0 + 100 * s), (17 * a["fs"], 6, 11 * a["fs"]))
    t[(fs <= 1.25) & (Z > z0 + 70 * s) & (Y < yf + 30 * s)] = SKULL
    t[fs <= 1] = INNER_AIR
    # orbits: bony rim, fat, eye
    for sx in (-1, 1):
        c = (x0 + sx * 33 * s, yf + 24 * s, z0 + 64 * s)
        o = _ell(X, Y, Z, c, (17, 22, 17))
        t[(o <= 1.1) & (o > 1)] = CORT
        t[o <= 1] = FAT
        t[_ell(X, Y, Z, (c[0], c[1] - 8, c[2]), (12, 12, 12)) <= 1] = SOFT
        # zygomatic arch
        zy = _ell(X, Y, Z, (x0 + sx * 57 * s, yf + 48 * s, z0 + 46 * s), (7, 32, 6))
        t[zy <= 1] = TRAB
        t[(zy <= 1) & (zy > 0.7)] = CORT
        # maxillary sinus: air behind a thin wall
        ms = _ell(X, Y, Z, (x0 + sx * 27 * s, yf + 38 * s, z0 + 43 * s), (13 * a["ms"], 18, 15))
        t[(ms <= 1.12) & (t != AIR)] = CORT
        t[ms <= 1] = INNER_AIR
    # nasal cavity: air, septum, turbinates; nasal bones
    nas = (np.abs(X - x0) < 13) & (Y > yf + 8) & (Y < yf + 72 * s) & (Z > z0 + a["floor"]) & (Z < z0 + 64 * s)
    t[nas] = INNER_AIR
    t[nas & (np.abs(X - x0) < 0.9) & (Y < yf + 60 * s)] = CORT
    for sx in (-1, 1):
        for dz in (10, 20, 30):
            tb = ((X - (x0 + sx * 10)) / 3.5) ** 2 + ((Z - (z0 + a["floor"] + dz)) / 3.0) ** 2
            tb = (tb <= 1) & (Y > yf + 20) & (Y < yf + 62 * s)
            t[tb] = TRAB
    nb = _ell(X, Y, Z, (x0, yf + 4, z0 + 66), (8, 6, 12))
    t[(nb <= 1) & (nb > 0.75) & (Y < yf + 4)] = CORT
    # mandibular rami up to the condyles (labelled mandible by the caller)
    for sx in (-1, 1):
        xr = x0 + sx * (a["w"] + 9)
        ram = (np.abs(X - xr) < 3.2) & (Y > yf + a["d"] + 2) & (Y < yf + a["d"] + 22) & (Z > z0 - 28) & (Z < z0 + 34)
        t[ram] = TRAB
        t[ram & (np.abs(X - xr) > 2.0)] = CORT
        t[_ell(X, Y, Z, (xr, yf + a["d"] + 14, z0 + 36), (6, 4.5, 4)) <= 1] = CORT
    # pharynx, cervical spine, hyoid
    phy = yf + a["d"] + 28
    t[(((X - x0) / 11) ** 2 + ((Y - phy) / 6) ** 2 <= 1) & (Z < z0 + 38)] = INNER_AIR
    ys = phy + 20
    zc = z0 + 30 - a["spine_phase"]
    while zc > Z.min() - 20:
        body = (((X - x0) / 9) ** 2 + ((Y - ys) / 8) ** 2 <= 1) & (np.abs(Z - zc) < 6.5)
        t[body] = TRAB
        t[body & ((((X - x0) / 7.8) ** 2 + ((Y - ys) / 6.8) ** 2 > 1) | (np.abs(Z - zc) > 5.3))] = CORT
        rr = np.sqrt((X - x0) ** 2 + (Y - (ys + 17)) ** 2)
        t[(rr > 8) & (rr < 11.5) & (np.abs(Z - zc) < 4.5) & (Y > ys + 6)] = CORT
        t[(np.abs(X - x0) < 2.5) & (Y > ys + 27) & (Y < ys + 44) & (np.abs(Z - zc) < 3.5)] = CORT
        zc -= 17.0
    ring = np.sqrt((X - x0) ** 2 + (Y - (yf + 40)) ** 2)
    t[(np.abs(ring - 17) < 2.2) & (Y > yf + 38) & (np.abs(Z - (z0 - 42)) < 2.5)] = CORT
    if a["earrings"]:
        for sx in (-1, 1):
            t[_ell(X, Y, Z, (x0 + sx * (70 * s + 4), yf + 105 * s, z0 + 12), (2, 2, 2)) <= 1] = METAL
    if a["holder"] == "table":  # CT: curved head rest behind the occiput
        rr = np.sqrt(((X - x0) / 1.0) ** 2 + ((Y - (yf + 95 * s)) / 1.0) ** 2)
        t[(np.abs(rr - (crr[1] + 10)) < 4) & (Y > yf + 150 * s) & (t == AIR)] = PLASTIC
    elif a["holder"] == "chin":  # CBCT: chin rest and a head band
        t[(np.abs(Z - (z0 - 62)) < 4) & (np.abs(X - x0) < 30) & (Y > yf - 20) & (Y < yf + 30) & (t == AIR)] = PLASTIC
        qq = _ell(X, Y, Z, crc, tuple(v + 3 for v in crr))
        t[(qq <= 1) & (qq > 0.97) & (np.abs(Z - (z0 + 120 * s)) < 12) & (t == AIR)] = PLASTIC
    return t


def _layout(info, rng):
    t11 = [info["teeth"][k]["cej"] for k in ("11", "21", 11, 21) if k in info["teeth"]]
    yf = (min(c[1] for c in t11) if t11 else info["origin"][1] + 15.0) - 4.0
    return {"x0": info["midline_x"], "yf": yf, "z0": info["occlusal_z"], "w": info["arch_width"],
            "d": info["arch_depth"], "s": rng.uniform(0.92, 1.08), "skull": rng.uniform(4.5, 9.0),
            "table": rng.uniform(1.4, 4.0),
            "fs": rng.uniform(0.5, 1.3), "ms": rng.uniform(0.8, 1.2), "floor": rng.uniform(24.0, 30.0),
            "spine_phase": rng.uniform(0, 17), "earrings": rng.random() < 0.15,
            "holder": rng.choice(["none", "table", "chin"], p=[0.4, 0.35, 0.25])}


def _field(kind, a, rng):
    """(lo, hi) LPS mm of the field of view."""
    x0, yf, z0, s = a["x0"], a["yf"], a["z0"], a["s"]
    head = (np.array([x0 - 80 * s, yf - 30, z0 - 95]), np.array([x0 + 80 * s, yf + 200 * s, z0 + 190 * s]))
    if kind == "head":
        return head
    c = np.array([x0, yf + 40, z0]) + rng.uniform(-12, 12, 3)
    half = rng.uniform([50, 50, 40], [85, 85, 80]) if kind == "large" else rng.uniform([42, 40, 30], [55, 52, 40])
    lo, hi = c - half, c + half
    cut = z0 + rng.uniform(-2.5, 2.5)
    if kind == "upper":
        lo[2], hi[2] = cut, cut + rng.uniform(35, 130)
    elif kind == "lower":
        lo[2], hi[2] = cut - rng.uniform(35, 90), cut
    elif kind == "above":  # from above the roots of the upper teeth
        lo[2] = z0 + rng.uniform(32, 45)
        hi[2] = lo[2] + rng.uniform(40, 140)
    elif kind == "below":  # the neck under the mandible
        hi[2] = z0 - rng.uniform(42, 55)
        lo[2] = hi[2] - rng.uniform(40, 90)
    return np.maximum(lo, head[0]), np.minimum(hi, head[1])


def generate_head_phantom(seed: int, spacing: float = None, field: str = None, modality: str = None):
    """Phantom head scan and labels. Returns ``(image, labels, info)`` like
    :func:`~.phantom.generate_teeth_phantom`; ``field`` one of :data:`FIELDS`, ``modality`` "CT" or "CBCT"."""
    from ..image import Image

    rng = np.random.default_rng([int(seed), 0x4845])
    field = field or str(rng.choice(FIELDS, p=FIELD_P))
    sp = float(spacing or (rng.uniform(1.0, 1.25) if field == "head" else rng.uniform(0.75, 1.0)))
    modality = modality or ("CT" if rng.random() < 0.45 else "CBCT")
    _, jaw_lab, info = generate_teeth_phantom(seed, spacing=sp, return_tissue=True)
    jaw_t = info.pop("tissue")
    a = _layout(info, rng)
    if rng.random() < 0.3:  # open mouth: the lower jaw drops
        jaw_t, jaw_lab = _open_mouth(jaw_t, jaw_lab.array, info, sp, rng.uniform(4, 22))
    else:
        jaw_lab = jaw_lab.array
    tilt = rng.uniform(-15, 15, 2) if rng.random() < 0.6 else np.zeros(2)
    lo, hi = _field(field, a, rng)
    pad = 0.0 if not tilt.any() else 0.2 * float(np.max(hi - lo))
    # grid aligned with the jaw block's voxels
    jo = np.array(info["origin"])
    glo = jo + np.floor((lo - pad - jo) / sp) * sp
    n = np.maximum(np.ceil((hi + pad - glo) / sp).astype(int), 8)
    xs, ys, zs = (glo[i] + np.arange(n[i]) * sp for i in range(3))
    X, Y, Z = xs[None, None, :], ys[None, :, None], zs[:, None, None]
    tissue = _anatomy(X, Y, Z, a, rng)
    lab = np.zeros(tissue.shape, np.uint8)
    ram = (np.abs(np.abs(X - a["x0"]) - (a["w"] + 9)) < 3.3) & (Y > a["yf"] + a["d"] + 2) & (Y < a["yf"] + a["d"] + 22)
    lab[ram & np.isin(tissue, (TRAB, CORT)) & (Z < a["z0"] + 42)] = L.MANDIBLE
    # paste the jaw block up to just above the upper roots
    off = np.round((jo - glo) / sp).astype(int)
    top = a["z0"] + a["floor"] - 1.0
    jz = np.arange(jaw_t.shape[0]) * sp + jo[2]
    keep = (jaw_t != AIR) & (jz <= top)[:, None, None]
    src, dst = [], []
    for ax, o in zip((2, 1, 0), off):  # x, y, z offsets
        m, nn = jaw_t.shape[ax], tissue.shape[ax]
        a0, a1 = max(0, -o), min(m, nn - o)
        src.append(slice(a0, a1))
        dst.append(slice(a0 + o, a1 + o))
    if all(s_.stop > s_.start for s_ in src):
        s3, d3 = tuple(src[::-1]), tuple(dst[::-1])
        k = keep[s3]
        tissue[d3][k] = jaw_t[s3][k]
        lab[d3][k] = jaw_lab[s3][k]
    if tilt.any():
        for ang, axes in zip(tilt, ((0, 1), (0, 2))):  # pitch (nodding), roll
            tissue = ndi.rotate(tissue, ang, axes=axes, reshape=False, order=0, cval=AIR, mode="constant")
            lab = ndi.rotate(lab, ang, axes=axes, reshape=False, order=0, cval=0, mode="constant")
        c0 = np.round((lo - glo) / sp).astype(int)
        c1 = np.minimum(np.round((hi - glo) / sp).astype(int), n)
        tissue = tissue[c0[2]:c1[2], c0[1]:c1[1], c0[0]:c1[0]]
        lab = lab[c0[2]:c1[2], c0[1]:c1[1], c0[0]:c1[0]]
        glo = glo + c0 * sp
    vol, render = _render(tissue, glo, sp, modality, rng)
    outside = render.pop("outside", None)
    if outside is not None:
        lab[:, outside] = 0
    zsp = sp
    if modality == "CT" and rng.random() < 0.6:  # thick slices
        zsp = rng.uniform(1.25, 3.0)
        f = sp / zsp
        vol = ndi.zoom(ndi.uniform_filter1d(vol, max(1, int(round(1 / f))), axis=0), (f, 1, 1), order=1)
        lab = ndi.zoom(lab, (vol.shape[0] / lab.shape[0], 1, 1), order=0)
        zsp = sp * tissue.shape[0] / vol.shape[0]
    spacing3 = (sp, sp, zsp)
    meta = {"phantom": "head", "seed": int(seed)}
    img = Image(np.clip(np.round(vol), -1024, 15000).astype(np.int16), spacing3, tuple(glo), np.eye(3), dict(meta))
    labels = Image(lab, spacing3, tuple(glo), np.eye(3), dict(meta))
    present = sorted(int(v) for v in np.unique(lab) if v in L.FDI)
    return img, labels, {"seed": int(seed), "field": field, "modality": modality, "tilt_deg": tilt.tolist(),
                         "present": present, "render": render, "spacing": list(spacing3)}


def _open_mouth(t, lab, info, sp, drop_mm):
    """Shift everything below the occlusal plane down by ``drop_mm``; the gap becomes mouth air."""
    k = int(round((info["occlusal_z"] - info["origin"][2]) / sp))
    d = int(round(drop_mm / sp))
    if k <= d or k >= t.shape[0]:
        return t, lab
    t, lab = t.copy(), lab.copy()
    t[:k - d], lab[:k - d] = t[d:k].copy(), lab[d:k].copy()
    gap = t[k - d:k]
    gap[gap != AIR] = INNER_AIR
    gap_l = lab[k - d:k]
    gap_l[(gap_l == L.MANDIBLE) | np.isin(gap_l, [f for f in L.FDI if not L.is_upper(f)])] = 0
    return t, lab


def _render(tissue, origin, sp, modality, rng):
    """Grey values of a tissue map: texture, metal streaks, blur, noise; CBCT shading, rings, truncation."""
    lut = np.zeros(256, np.float32)
    for k, v in HEAD_HU.items():
        lut[k] = v * rng.uniform(0.92, 1.08) if v > 100 else v + rng.uniform(-20, 20)
    lut[PLASTIC] = rng.uniform(-150, 350)
    # real CT: cortical bone from about 1200 to 2300 HU, dentin 1600-2200: as bright as each other
    lut[CORT] = rng.uniform(1250, 2000)
    lut[SKULL] = rng.uniform(1400, 2300)
    lut[DENTIN] = rng.uniform(1600, 2150)
    lut[ENAMEL] = rng.uniform(2400, 3100)
    vol = lut[tissue]
    tex = _smooth_noise(rng, tissue.shape, np.full(3, sp), 1.5)
    for k, amp in ((TRAB, 240.0), (SOFT, 20.0), (BRAIN, 8.0), (FAT, 15.0), (SKULL, 120.0)):
        m = tissue == k
        vol[m] += (amp * np.tanh(1.6 * tex[m])).astype(np.float32)
    del tex
    if (tissue == METAL).any():
        _metal_streaks(vol, tissue, origin, np.full(3, sp), rng)
    Z, Y, X = tissue.shape
    yy, xx = np.mgrid[0:Y, 0:X].astype(np.float32)
    r = np.sqrt((yy - Y / 2) ** 2 + (xx - X / 2) ** 2) * sp  # mm from the rotation axis
    info = {"modality": modality}
    if modality == "CBCT":
        rmax = max(r.max(), 1.0)
        cup = 1.0 - rng.uniform(0.0, 0.1) * np.minimum((r / rmax) ** 2, 1.0)
        vol = (vol + 1000.0) * cup[None] - 1000.0
        if rng.random() < 0.5:  # ring artefacts
            rings = rng.uniform(10, 50) * np.sin(r / rng.uniform(2.0, 6.0) + rng.uniform(0, 6.3))
            vol += rings.astype(np.float32)[None]
        psf, noise = rng.uniform(0.4, 0.8), rng.uniform(30.0, 110.0)
    else:
        psf, noise = rng.uniform(0.4, 0.9), rng.uniform(8.0, 35.0)
    vol = ndi.gaussian_filter(vol, sigma=psf / sp, mode="nearest", truncate=3.0)
    nz = ndi.gaussian_filter(rng.standard_normal(vol.shape, dtype=np.float32), 0.6, truncate=2.5)
    vol += nz * np.float32(noise / 0.42)
    del nz
    if modality == "CBCT":
        if rng.random() < 0.4:  # truncated field of view: a cylinder, dark outside
            R = rng.uniform(0.75, 0.98) * min(X, Y) * sp / 2
            vol[:, r > R] = -1000.0
            info["truncated_mm"] = float(R)
            info["outside"] = r > R  # (y, x): not imaged, so not labelled either
        if rng.random() < 0.5:  # a grey scale that is only roughly HU (the networks assume HU-like values)
            scale, shift = rng.uniform(0.8, 1.1), rng.uniform(-150, 150)
            vol = (vol + 1000.0) * np.float32(scale) - np.float32(1000.0 - shift)
            info["grey"] = [float(scale), float(shift)]
    info.update(psf_mm=float(psf), noise=float(noise))
    return vol, info
