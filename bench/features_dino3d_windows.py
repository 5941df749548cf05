"""CPU seconds of dino3d feature extraction at 192x160x256 with non-default window / overlap (2 threads).

Writes one JSON line per case to stdout (results/bench/features_dino3d_windows_p17.csv was made from them):
    python bench/features_dino3d_windows.py > out.jsonl
"""
import json, sys, time, torch
from dinoreg_core.features.extract import ExtractConfig, extract_features, plan_extraction, prepare_image
from dinoreg_core.features.dino3d import DEFAULT_WEIGHTS
from dinoreg_core.models.checkpoint import load_backbone
from dinoreg_core.models.vit3d import CONFIGS, ViT3D
import os
torch.set_num_threads(2)
torch.manual_seed(0)
img = torch.rand((1, 1, 192, 160, 256), generator=torch.Generator().manual_seed(0))
cases = [("dino3d_demo", dict(overlap=0.0)), ("dino3d_paper", dict(overlap=0.0, window=32))]
for name, kw in cases:
    model = load_backbone(DEFAULT_WEIGHTS, "cpu")[0].eval() if name == "dino3d_demo" else ViT3D(CONFIGS["paper"]).eval()
    e = ExtractConfig(progress=False, **kw)
    plan = plan_extraction(model.cfg, prepare_image(img, 4).shape[2:], e)
    load = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        f = extract_features(model, img, e)
    row = dict(case=name, options=kw, mode=plan.mode, windows=len(plan.starts), window_tokens=plan.window,
               predicted_macs=plan.cost.get("sliding"), cpu_s=time.process_time() - c0,
               wall_s=time.perf_counter() - t0, load_1min=load, threads=2, shape=list(f.shape),
               date=time.strftime("%Y-%m-%dT%H:%M"))
    print(json.dumps(row), flush=True)
