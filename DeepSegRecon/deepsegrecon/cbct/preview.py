"""Preview PNG: middle axial, coronal and sagittal slices (index space) of each volume, same HU window."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_preview(volumes: dict, path, window=(-1000.0, 1000.0), title: str = "") -> Path:
    """``volumes``: {row label: (k, j, i) HU array}; one row per volume, aspect from ``spacing`` if given as
    ``(array, spacing)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_file

    rows = list(volumes.items())
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (label, item) in enumerate(rows):
        arr, sp = item if isinstance(item, tuple) else (item, (1.0, 1.0, 1.0))
        k, j, i = (n // 2 for n in arr.shape)
        views = [(arr[k], sp[1] / sp[0]), (arr[:, j][::-1], sp[2] / sp[0]), (arr[:, :, i][::-1], sp[2] / sp[1])]
        for c, (img, aspect) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(np.asarray(img), cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
            ax.set_axis_off()
            if c == 0:
                ax.set_title(label, loc="left", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
