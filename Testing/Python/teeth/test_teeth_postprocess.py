"""Instance split and FDI numbering on inputs derived from phantom ground truth (no network)."""

import numpy as np
import pytest

from deepsegrecon.frames import canonical_frame
from deepsegrecon.image import Image
from deepsegrecon.teeth import labels as L
from deepsegrecon.teeth.evaluate import score
from deepsegrecon.teeth.nets import grid_size
from deepsegrecon.teeth.numbering import assign_positions
from deepsegrecon.teeth.phantom import generate_teeth_phantom
from deepsegrecon.teeth.postprocess import (
    MAX_DEPTH,
    _adjacency,
    _rejoin_unnumbered,
    image_gaps,
    postprocess,
    profile_split,
    resplit_at_gaps,
    split_instances,
)
from deepsegrecon.teeth.samples import _onehot_area
from deepsegrecon.teeth.task import assemble, grid_mapper, make_result, stage2_box

SHAPE = (150, 140, 110)


def oracle(cbct: Image, gt: Image, same_class=()):
    """Run the post-processing and the mapping back to the input grid on probabilities made from the
    ground truth (what a perfect network would give at the stage grids). ``same_class``: pairs (a, b)
    where tooth b gets tooth a's class (a network that confuses them), so only geometry splits them."""
    can = canonical_frame(gt)
    gl = can.to_canonical(gt.array)
    sp = np.array(can.spacing)
    shape = np.array(gl.shape)
    n1 = grid_size(shape, sp, 1.0)
    y1 = _onehot_area(gl, [0, L.MAXILLA, L.MANDIBLE, tuple(L.FDI)], n1)
    lo, hi, ref = stage2_box((y1[3] > 0.5).numpy(), shape, n1, sp, 4.0)
    n2 = tuple(grid_size(hi - lo, sp, 0.5))
    cls_of = np.zeros(256, np.uint8)
    for f in L.FDI:
        cls_of[f] = L.stage2_class(f)
    for a, b in same_class:
        cls_of[b] = L.stage2_class(a)
    g2 = cls_of[gl[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]]
    probs = _onehot_area(g2, list(range(17)), n2).numpy()
    sp2 = (hi - lo) * sp / np.array(n2)
    mid_hint = (ref[2] - lo[2] + 0.5) * n2[2] / (hi[2] - lo[2]) - 0.5
    fdi2, info = postprocess(1 - probs[0], probs[1:], tuple(sp2), grid_mapper(gt, can, lo, hi, n2), mid_hint)
    out = assemble(shape, y1, 1 - probs[0], fdi2, lo, hi, n2)
    return make_result(gt, can.from_canonical(out), info, {})


def flip_i(img: Image) -> Image:
    d = img.direction.copy()
    d[:, 0] = -d[:, 0]
    origin = np.asarray(img.origin) + img.direction[:, 0] * img.spacing[0] * (img.array.shape[2] - 1)
    return Image(img.array[:, :, ::-1].copy(), img.spacing, origin, d)


@pytest.fixture(scope="module")
def case():
    cbct, gt, info = generate_teeth_phantom(10003, shape=SHAPE, missing=[14, 36], third_molars=False)
    return cbct, gt, info, oracle(cbct, gt)


def test_every_tooth_found_and_numbered(case):
    _, gt, info, res = case
    sc = score(res.labelmap.array, gt.array)
    assert all(sc["correct"].values()), sc["correct"]
    assert min(sc["dice"].values()) > 0.85
    assert res.labelmap.same_grid(gt)


def test_missing_tooth_leaves_a_gap_and_nothing_is_invented(case):
    _, gt, info, res = case
    found = set(np.unique(res.labelmap.array)) & set(L.FDI)
    assert found == set(info["present"])
    assert 14 not in found and 36 not in found
    assert {13, 15, 35, 37} <= found  # the neighbours keep their numbers
    assert not any(L.position(f) == 8 for f in found)  # no third molars in the image, none reported
    assert {"tooth_14", "tooth_36", "tooth_18", "tooth_48"} <= set(res.absent)
    assert {s.name for s in res.segments} == {L.segment_name(v) for v in np.unique(res.labelmap.array) if v}


def test_touching_teeth_are_split(case):
    """Touching neighbours given the same class (46 and 47 both voted 'first molar', 11 and 21 always
    share one) still come out as separate teeth, numbered in order along the arch."""
    cbct, gt, info, _ = case
    adj = _adjacency(gt.array.astype(np.int32))
    touching = [(a, b) for (a, b), n in adj.items() if a in L.FDI and b in L.FDI and n >= 3]
    assert len(touching) >= 8, "neighbouring phantom teeth must touch"
    assert (46, 47) in touching and (11, 21) in touching and (23, 24) in touching
    res = oracle(cbct, gt, same_class=[(46, 47), (23, 24)])
    sc = score(res.labelmap.array, gt.array)
    assert all(sc["correct"].values()), sc["correct"]
    assert min(sc["dice"][f] for f in (11, 21, 46, 47, 23, 24)) > 0.85


def test_split_two_touching_blobs():
    """Two overlapping balls with different class keys -> two instances meeting at the neck."""
    z, y, x = np.mgrid[:40, :40, :60]
    a = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 12 ** 2
    b = (z - 20) ** 2 + (y - 20) ** 2 + (x - 41) ** 2 < 12 ** 2
    fg = a | b
    key = np.where(x < 30, 1, 2) * fg
    inst, keys = split_instances(fg, key, (0.5, 0.5, 0.5))
    assert len(keys) == 2
    assert len(np.unique(inst[a & ~b])) == 1 and len(np.unique(inst[b & ~a])) == 1
    assert inst[20, 20, 20] != inst[20, 20, 41]


def test_borders_re_decided_at_the_image_gap_between_roots():
    """Two roots whose blurred mask bridges the thin bone between them, wrongly split: the dark gap in the
    image moves the border there; the numbering stays."""
    z, y, x = np.mgrid[:30, :40, :40]
    inside = (z >= 6) & (z < 24) & (y >= 6) & (y < 34)
    a, b = inside & (x >= 6) & (x < 18), inside & (x >= 20) & (x < 32)
    fg = inside & (x >= 6) & (x < 32)  # the mask covers the bone gap (x 18, 19)
    image = np.where(a | b, 1.8, np.where(fg, 0.9, 0.0)).astype(np.float32)
    gaps = image_gaps(fg, image, (0.5, 0.5, 0.5))
    assert gaps[15, 20, 18] and not gaps[15, 20, 10] and not gaps[15, 20, 25]
    fdi_map = np.where(fg, np.where(x < 24, 31, 32), 0).astype(np.uint8)  # 31 took part of 32's root
    out = resplit_at_gaps(fdi_map, gaps, (0.5, 0.5, 0.5))
    assert (out[a] == 31).all() and (out[b] == 32).all()
    assert set(np.unique(out)) == {0, 31, 32}


def test_profile_split_cuts_merged_neighbours_at_the_contact():
    """Two crowns side by side along the arch (merged by a blurred mask) are cut at their contact; one
    elongated tooth has no narrow section and is left whole."""
    z, y, x = np.mgrid[:30, :40, :70]
    a = ((z - 15) / 10) ** 2 + ((y - 20) / 9) ** 2 + ((x - 22) / 13) ** 2 < 1
    b = ((z - 15) / 10) ** 2 + ((y - 20) / 9) ** 2 + ((x - 46) / 13) ** 2 < 1
    pieces, depth = profile_split(a | b, (0.5, 0.5, 0.5), 2)
    assert depth < MAX_DEPTH
    near, far = pieces[a & (x < 32)], pieces[b & (x > 36)]  # all but the voxel rows at the contact
    assert len(np.unique(near)) == 1 and len(np.unique(far)) == 1 and near[0] != far[0]
    one = ((z - 15) / 10) ** 2 + ((y - 20) / 9) ** 2 + ((x - 34) / 24) ** 2 < 1
    assert profile_split(one, (0.5, 0.5, 0.5), 2)[1] > MAX_DEPTH


def test_unnumbered_piece_joins_the_tooth_it_touches():
    inst = np.zeros((4, 4, 12), np.int32)
    inst[:, :, 0:4], inst[:, :, 4:6], inst[:, :, 6:10], inst[:, :, 11] = 1, 2, 3, 4
    details = {i: {} for i in range(1, 5)}
    fdi = _rejoin_unnumbered(inst, {1: 36, 2: 0, 3: 37, 4: 0}, details)
    assert fdi[2] in (36, 37) and fdi[4] == 0  # piece 4 touches nothing: stays out


def test_assign_positions_keeps_gaps():
    """Ordered instances get strictly increasing positions; a missing tooth leaves a gap."""
    votes = np.full((4, 8), 0.01)
    for i, p in enumerate([1, 2, 3, 5]):  # tooth 4 missing
        votes[i, p - 1] = 0.9
    assert assign_positions(np.log(votes)) == [1, 2, 3, 5]
    # ambiguous votes: order along the arch decides, numbers never repeat
    votes = np.full((3, 8), 0.01)
    votes[0, 5], votes[1, 5], votes[2, 6] = 0.9, 0.5, 0.9
    votes[1, 6] = 0.4
    out = assign_positions(np.log(votes))
    assert out[0] < out[1] < out[2] or 0 in out
    assert len({p for p in out if p}) == len([p for p in out if p])
    # more instances than positions: some are dropped, never renamed twice
    out = assign_positions(np.log(np.full((10, 8), 0.1)))
    assert sorted(p for p in out if p) == list(range(1, 9))


def test_numbering_under_flipped_direction(case):
    """Flip the array along i and negate direction[:, 0]: the same FDI labels at the same places in space."""
    cbct, gt, info, res = case
    g2 = flip_i(gt)
    res2 = oracle(flip_i(cbct), g2)
    assert np.array_equal(res2.labelmap.array[:, :, ::-1], res.labelmap.array)
    sc = score(res2.labelmap.array, g2.array)
    assert all(sc["correct"].values())


def test_numbering_under_oblique_direction():
    """A rotated grid (oblique direction matrix, axes permuted): numbering is done in physical space."""
    cbct, gt, info = generate_teeth_phantom(10004, shape=(120, 112, 88))
    rot = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # i->P, j->L, k->I
    c = np.cos(0.15)
    s = np.sin(0.15)
    tilt = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    d = tilt @ rot
    # re-index the array so that the new grid holds the same anatomy (up to the small tilt)
    arr = np.transpose(gt.array, (0, 2, 1))[::-1]  # (k, j, i) -> k flipped, j <- i, i <- j
    sp = (gt.spacing[1], gt.spacing[0], gt.spacing[2])
    img = Image(arr.copy(), sp, (0.0, 0.0, 0.0), d)
    res = oracle(img, img)
    sc = score(res.labelmap.array, img.array)
    assert np.mean(list(sc["correct"].values())) == 1.0, sc["correct"]


def test_refine_surface_brings_a_blurred_surface_back_to_the_image(case):
    """Teeth one voxel too large (what a coarse network gives around roots) shrink back to the image's
    tooth surface; dark pulp inside a tooth stays tooth; removed voxels go back to the bone around them."""
    from scipy import ndimage as ndi

    from deepsegrecon.teeth.refine import refine_surface

    cbct, gt, _, _ = case
    can = canonical_frame(gt)
    gl, img, sp = can.to_canonical(gt.array), can.to_canonical(cbct.array), np.array(can.spacing)
    teeth = np.isin(gl, L.FDI)
    d, ind = ndi.distance_transform_edt(~teeth, return_indices=True)
    grown = np.where((d > 0) & (d <= 1.5), gl[tuple(ind)], gl)
    before = np.mean(list(score(grown, gl)["dice"].values()))
    out = refine_surface(grown.copy(), img, sp)
    after = np.mean(list(score(out, gl)["dice"].values()))
    assert after > before + 0.04 and after > 0.92, (before, after)
    deep = ndi.distance_transform_edt(teeth, sampling=sp) > 0.8
    dark = deep & (img < np.median(img[deep]) - 600)  # pulp and canals
    assert dark.sum() > 500 and np.isin(out[dark], L.FDI).mean() > 0.97
    bone = np.isin(gl, [L.MAXILLA, L.MANDIBLE]) & np.isin(grown, L.FDI)
    assert np.isin(out[bone], [L.MAXILLA, L.MANDIBLE]).mean() > 0.6
