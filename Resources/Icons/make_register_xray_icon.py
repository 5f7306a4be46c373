"""Draw Resources/Icons/RegisterXray.png (128x128, transparent): an X-ray source, its ray fan and a detector with
a spine projected on it. Run: ``python Resources/Icons/make_register_xray_icon.py`` (needs matplotlib)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, Polygon, Rectangle  # noqa: E402

fig = plt.figure(figsize=(1, 1), dpi=128)
ax = fig.add_axes([0, 0, 1, 1])
ax.set_xlim(0, 1)
ax.set_ylim(0, 1)
ax.axis("off")
ax.add_patch(Polygon([(0.5, 0.9), (0.12, 0.18), (0.88, 0.18)], closed=True, color="#f2c14e", alpha=0.45))
ax.add_patch(Circle((0.5, 0.9), 0.06, color="#d1495b"))
ax.add_patch(Rectangle((0.08, 0.08), 0.84, 0.1, color="#2e4057"))
for k in range(5):  # vertebrae
    ax.add_patch(Rectangle((0.44, 0.27 + 0.085 * k), 0.12, 0.06, color="#edf2f4", ec="#2e4057", lw=1))
fig.savefig(Path(__file__).resolve().parent / "RegisterXray.png", dpi=128, transparent=True)
