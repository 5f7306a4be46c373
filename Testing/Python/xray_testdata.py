"""Small synthetic CTs for the X-ray tests: a soft-tissue body with a column of bone blocks."""

import numpy as np

from conftest import oblique_direction


def small_ct(oblique: bool = True):
    from deepsegrecon.image import Image

    k, j, i = np.meshgrid(np.arange(36), np.arange(30), np.arange(34), indexing="ij")
    a = np.full(k.shape, -1000.0, np.float32)
    body = ((i - 17) / 15.0) ** 2 + ((j - 15) / 12.0) ** 2 < 1
    a[body] = 20.0
    for z in range(4, 32, 5):  # "vertebrae" along k, off-centre so that rotations show
        a[z:z + 3, 17:22, 13:19] = 900.0 + 40 * z
    a[6:30, 8:10, 6:28] = 500.0  # a "rib" plate
    rng = np.random.default_rng(0)
    a += rng.normal(0, 5, a.shape).astype(np.float32)
    direction = oblique_direction((0.15, -0.1, 0.2)) if oblique else np.eye(3)
    return Image(a, spacing=(6.0, 7.0, 6.5), origin=(-90.0, -80.0, -100.0), direction=direction)


def landmarks(ct):
    return ct.physical_points(np.array([[16, 19, z + 1] for z in range(4, 32, 5)], float))
