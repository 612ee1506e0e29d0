"""Benchmark a Meta-QSM/Mesa-QSM model against TKD on held-out simulated volumes.

python benchmarks/bench_metaqsm.py MODEL_NAME_OR_RUN_CKPT [--shape 128 128 48] [--n 3]
"""
import argparse, json, time
import numpy as np, torch
from qsm_ci.qsm_eval import hfen, nrmse_challenge
from metaqsm_bids.qsm.deepqsm import load_model, predict_chi
from metaqsm_bids.qsm.inversion import tkd
from metaqsm_bids.qsm.networks import UNet3d
from metaqsm_bids.training.synth import make_sample

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 48])
p.add_argument("--n", type=int, default=3)
p.add_argument("--voxels", default="0.5x0.5x2,0.76x0.76x3,1x1x1,0.75x0.75x1.5")
p.add_argument("--conditioning", default="voxel+b0")
p.add_argument("--json")
a = p.parse_args()
if a.model.endswith(".pt") and "/" in a.model:
    ck = torch.load(a.model, map_location="cpu", weights_only=False)
    model = UNet3d(ck["network"]); model.load_state_dict(ck["model"]); model.eval()
    print("checkpoint step", ck["step"])
else:
    model = load_model(a.model)
results = {}
for vi, vs in enumerate(a.voxels.split(",")):
    voxel = tuple(float(x) for x in vs.split("x"))
    rows = []
    for i in range(a.n):
        rng = np.random.default_rng([12345, vi, i])  # disjoint from training ([seed, step]) and validation streams
        s = make_sample(rng, a.shape, voxel_size_mm=voxel, conditioning=a.conditioning)
        t = time.time(); net = predict_chi(model, s.field_ppm, s.mask, voxel, s.b0_dir); t_net = time.time() - t
        t = time.time(); tk = tkd(s.field_ppm, s.mask, voxel, s.b0_dir, threshold=0.2); t_tkd = time.time() - t
        row = {}
        for name, rec in (("net", net), ("tkd", tk)):
            n, ndt = nrmse_challenge(rec, s.chi_ppm, s.mask)
            row[name] = {"nrmse": n, "nrmse_detrend": ndt, "hfen": hfen(rec, s.chi_ppm, s.mask)}
        row["t_net"], row["t_tkd"], row["b0"] = t_net, t_tkd, s.b0_dir
        rows.append(row)
    agg = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in rows[0][m]} for m in ("net", "tkd")}
    results[vs] = agg
    print(f"{vs:>14}  NRMSE net {agg['net']['nrmse']:.1f} tkd {agg['tkd']['nrmse']:.1f} | detrended net "
          f"{agg['net']['nrmse_detrend']:.1f} tkd {agg['tkd']['nrmse_detrend']:.1f} | HFEN net {agg['net']['hfen']:.1f} "
          f"tkd {agg['tkd']['hfen']:.1f}  (n={a.n}, {a.shape}, net {np.mean([r['t_net'] for r in rows]):.2f}s)",
          flush=True)
if a.json:
    json.dump(results, open(a.json, "w"), indent=2)
