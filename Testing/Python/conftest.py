"""Shared fixtures. The tests mirror the package tree (teeth/, brain/, slices/, cbct/, xray/, scene/, training/,
cli/; modules/ for the Slicer modules; the engine's own modules here); the helpers here and the test modules that
others import from are importable from every folder."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[2]
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
    sys.path.insert(0, str(_folder))
sys.path.insert(0, str(Path(__file__).parent))
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is not present")
    return SHARED_DATA


def oblique_direction(angles=(0.3, -0.2, 0.5)) -> np.ndarray:
    """A proper rotation (det +1) with no axis aligned to LPS."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_image():
    """Anisotropic, oblique, non-cubic image whose voxels encode their own (k, j, i) index."""
    from deepsegrecon.image import Image

    k, j, i = np.meshgrid(np.arange(7), np.arange(9), np.arange(11), indexing="ij")
    arr = (k * 10000 + j * 100 + i).astype(np.int32)
    return Image(arr, spacing=(0.4, 0.7, 1.9), origin=(-12.5, 33.25, 101.0), direction=oblique_direction())


def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# One torch thread during a test (small tensors: threads only contend on the shared CPU); restored after. Modules use
# it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; ``..._module`` also covers module fixtures.
one_torch_thread = pytest.fixture(_one_torch_thread, name="one_torch_thread")
one_torch_thread_module = pytest.fixture(_one_torch_thread, scope="module", name="one_torch_thread_module")


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write in, root included (root ignores mode bits, so mark it immutable)."""
    import subprocess

    ro = tmp_path / "read only ü"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    if os.geteuid() == 0 and not immutable:
        pytest.skip("running as root on a file system without chattr +i: cannot make a read-only folder")
    yield ro
    if immutable:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    ro.chmod(0o755)


@pytest.fixture(autouse=True)
def _working_directory_kept():
    """A test (or code under test) that leaves the process in another or a deleted folder breaks later tests."""
    before = os.getcwd()
    yield
    try:
        after = os.getcwd()
    except FileNotFoundError:
        after = None
    if after != before:
        os.chdir(before)
        pytest.fail(f"the working directory changed from {before} to {after or 'a deleted folder'}")
