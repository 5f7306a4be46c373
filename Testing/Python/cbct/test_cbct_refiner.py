"""The SART refiner (``sart-unet``): the shipped weights improve SART on real CT they never saw (a low-resolution
copy of the held-out abdomen), the output keeps the input's grid, the torch backend says it skipped it, and one
training step runs."""

import numpy as np
import pytest
import torch

from deepsegrecon.cbct import rtk_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_rtk = pytest.mark.skipif(not rtk_backend.available(), reason="itk-rtk does not import")

# measured on this case (abdomen at 4 mm, slices 10-41, oblique grid, 10 views, seed 0): SART 26.45 dB, SART + refiner
# + 4 SART iterations 28.55 dB (+2.1); floor = that gain minus 0.6 dB of slack (4 more SART iterations alone add ~0.2)
MIN_GAIN_DB = 1.5


def test_shipped_refiner_is_verified_and_small():
    from deepsegrecon.cbct.refiner import WEIGHTS, entry_for, load
    from deepsegrecon.store import ModelStore

    store = ModelStore(root="/nonexistent-user-store")
    entry = entry_for(store)
    assert entry is not None and entry.builtin
    store.verify(entry)
    assert sum(entry.path(f).stat().st_size for f in entry.files) < 20e6
    assert "held-out" in entry.manifest["trained_on"]["data"] and entry.manifest["trained_on"]["command"]
    assert "abdomen" in entry.manifest["trained_on"]["data"]  # says it was never trained on
    assert WEIGHTS in entry.files and load(entry).slices == entry.manifest["refiner"]["slices"]


@needs_rtk
def test_refiner_improves_sart_on_unseen_real_ct_and_keeps_the_grid(shared_data):
    from conftest import oblique_direction
    from deepsegrecon.cbct.data import resample_iso
    from deepsegrecon.image import Image
    from deepsegrecon.io import read_image
    from deepsegrecon.runner import run_inline

    ct = resample_iso(read_image(shared_data / "ct_volumes_2mm" / "ircadb1_1_abdomen.nii.gz"), 4.0)
    img = Image(np.ascontiguousarray(ct.array[10:42]), (4.0, 4.0, 4.0), (-12.5, 33.25, 101.0), oblique_direction())
    r = run_inline("cbct-recon", {"ct": img}, {"views": 10, "device": "cpu", "backend": "rtk",
                                                "method": "sart-unet", "compare": ["sart"]})
    m = r.report["metrics"]
    assert r.report["methods"] == ["fdk", "sart", "sart-unet"] and r.report["refiner_model"]
    assert m["sart_unet"]["psnr_db"] >= m["sart"]["psnr_db"] + MIN_GAIN_DB, m
    assert m["sart_unet"]["ssim"] > m["sart"]["ssim"]
    recon = r.volumes["recon"]
    assert recon.same_grid(img) and recon.array.shape == img.array.shape
    assert set(r.volumes) == {"recon", "fdk", "sart"}


def test_torch_backend_says_the_refiner_was_skipped():
    from deepsegrecon.image import Image
    from deepsegrecon.runner import run_inline

    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (12, 14, 16)], indexing="ij")
    img = Image(np.where(i ** 2 + j ** 2 + k ** 2 < 0.7, 0.0, -1000.0).astype(np.float32), (1.5, 1.5, 2.0))
    r = run_inline("cbct-recon", {"ct": img}, {"views": 8, "detector": 32, "device": "cpu", "backend": "torch",
                                                "method": "fdk", "compare": ["sart-unet"]})
    assert r.report["backend"] == "torch" and r.report["methods"] == ["fdk"]
    assert any(s.startswith("sart-unet") for s in r.report["skipped"])


def test_one_training_step(tmp_path):
    from deepsegrecon.cbct.train_refiner import train, window_loss

    rng = np.random.default_rng(0)
    t = np.where(rng.random((12, 40, 36)) > 0.5, 0.0, -1000.0).astype(np.float16)
    np.savez(tmp_path / "p.npz", target=t, sart=(t + rng.normal(0, 200, t.shape)).astype(np.float16),
             spacing=np.ones(3), views=10)
    cfg = {"features": [4, 4, 8, 8, 8, 4], "slices": 3}
    torch.manual_seed(0)
    from deepsegrecon.cbct.refiner import Refiner

    before = {k: v.clone() for k, v in Refiner(cfg).state_dict().items()}  # the same seed gives the same start
    model, history, iters = train([tmp_path / "p.npz"], 5.0, 0, tmp_path / "out", val=0, cfg=cfg, max_iters=1)
    assert iters == 1
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    # the window loss: nothing beyond the window on its side, the full error inside it
    out, tgt = torch.tensor([1.3, -0.2, 0.5, -0.1]), torch.tensor([1.2, -0.01, 0.25, 0.1])
    assert float(window_loss(out, tgt)) == pytest.approx((0.25 ** 2 + 0.2 ** 2) / 4)
