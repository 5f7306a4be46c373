"""Draw the extension and module icons (128x128 PNG, transparent background).

Run from anywhere: ``python Resources/Icons/make_icons.py``. Needs only matplotlib.
The glyph is a two-rooted molar drawn with cubic Bezier curves in a unit square.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, PathPatch  # noqa: E402
from matplotlib.path import Path as MPath  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZE = 128  # pixels

# (point, point, point) triples are cubic Bezier segments; the outline starts at the dip between the cusps.
TOOTH = [
    (0.50, 0.84),
    ((0.58, 0.92), (0.70, 0.95), (0.77, 0.88)),  # right cusp
    ((0.85, 0.80), (0.84, 0.66), (0.78, 0.56)),  # right side of the crown
    ((0.74, 0.45), (0.72, 0.30), (0.68, 0.16)),  # right root, outer side
    ((0.66, 0.09), (0.59, 0.09), (0.58, 0.17)),  # right root apex
    ((0.56, 0.28), (0.55, 0.38), (0.50, 0.40)),  # up to the furcation
    ((0.45, 0.38), (0.44, 0.28), (0.42, 0.17)),  # left root, inner side
    ((0.41, 0.09), (0.34, 0.09), (0.32, 0.16)),  # left root apex
    ((0.28, 0.30), (0.26, 0.45), (0.22, 0.56)),  # left root, outer side
    ((0.16, 0.66), (0.15, 0.80), (0.23, 0.88)),  # left side of the crown
    ((0.30, 0.95), (0.42, 0.92), (0.50, 0.84)),  # left cusp
]


def tooth_path(scale: float = 1.0, offset=(0.0, 0.0)) -> MPath:
    def tr(p):
        return (offset[0] + 0.5 + (p[0] - 0.5) * scale, offset[1] + 0.5 + (p[1] - 0.5) * scale)

    verts, codes = [tr(TOOTH[0])], [MPath.MOVETO]
    for seg in TOOTH[1:]:
        verts += [tr(p) for p in seg]
        codes += [MPath.CURVE4] * 3
    verts.append(verts[0])
    codes.append(MPath.CLOSEPOLY)
    return MPath(verts, codes)


def _canvas():
    fig = plt.figure(figsize=(1, 1), dpi=SIZE)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=SIZE, transparent=True)
    plt.close(fig)


def module_icon(path: Path) -> None:
    """Segment Teeth: an ivory tooth with a coloured segmentation contour."""
    fig, ax = _canvas()
    ax.add_patch(PathPatch(tooth_path(1.0), facecolor="#f7f3e8", edgecolor="#1f8a70", lw=4.5, joinstyle="round"))
    # enamel/dentine boundary hint across the crown
    ax.plot([0.27, 0.40, 0.50, 0.60, 0.73], [0.62, 0.66, 0.64, 0.66, 0.62], color="#c9bfa5", lw=2.0,
            solid_capstyle="round")
    _save(fig, path)


def extension_icon(path: Path) -> None:
    """DeepSegRecon: a white tooth on a rounded blue tile."""
    fig, ax = _canvas()
    ax.add_patch(FancyBboxPatch((0.06, 0.06), 0.88, 0.88, boxstyle="round,pad=0,rounding_size=0.16",
                                facecolor="#2b5797", edgecolor="none"))
    ax.add_patch(PathPatch(tooth_path(0.86, (0.0, 0.01)), facecolor="#ffffff", edgecolor="#cfe0f5", lw=2.0,
                           joinstyle="round"))
    _save(fig, path)


def main() -> None:
    module_icon(HERE / "SegmentTeeth.png")
    extension_icon(HERE / "DeepSegRecon.png")


if __name__ == "__main__":
    main()
