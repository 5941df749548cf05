"""The pretraining loop: learning signal with healthy collapse monitors, exact resume, DDP parity, CLI and export.

All runs use a very small ViT (the "tiny" config cut to depth 2, 48 channels), 32^3 global and 16^3 local
crops, a 256-prototype head and one CPU thread per process, on four synthetic 40^3 CT-like volumes.
"""

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dinoreg_core.errors import DinoregError
from dinoreg_core.ssl.train import PretrainConfig, load_config, train

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "model": "tiny",
    "model_overrides": {"depth": 2, "embed_dim": 48, "num_heads": 4, "pos_grid": [8, 8, 8]},
    "head_out_dim": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64,
    "augment": {"global_size": 32, "local_size": 16, "n_local": 2},
    "batch_size": 4, "warmup_steps": 2, "freeze_last_layer_steps": 2, "teacher_temp_warmup_steps": 4,
    "lr": 1e-4, "log_every": 1, "ckpt_every": 1000, "threads": 1, "progress": False, "spacing_mm": 2.0,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four synthetic CT-like volumes (HU) with a body and a few organ-like blobs, as NIfTI files."""
    out = tmp_path_factory.mktemp("ssl_data")
    rng = np.random.default_rng(0)
    D = 40
    z, y, x = np.meshgrid(*[np.arange(D)] * 3, indexing="ij")
    for i in range(4):
        img = np.full((D, D, D), -1000.0)
        img[((z - 20) / 18) ** 2 + ((y - 20) / 15) ** 2 + ((x - 20) / 19) ** 2 < 1] = -100.0
        for _ in range(6):
            c, r = rng.uniform(10, 30, 3), rng.uniform(3, 7, 3)
            img[((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1] = rng.uniform(-50, 300)
        img += rng.normal(0, 20, img.shape)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(out / f"case{i}.nii.gz"))
    (out / "labels").mkdir()                       # label maps are left out by name
    nib.save(nib.Nifti1Image(np.ones((D, D, D), np.int16), np.eye(4)), str(out / "labels" / "case0_label.nii.gz"))
    return out


def _config_file(tmp_path: Path, **over) -> Path:
    d = json.loads(json.dumps(SMALL))
    d.update(over)
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    return p


def _read_log(run: Path) -> list[dict]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _pretrain(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(torchrun),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += ["-m", "dinoreg_core.cli", "pretrain"] + args
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _same(a, b, path="") -> list[str]:
    """Paths at which two checkpoint trees differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if set(a) != set(b):
            return [path + " (keys)"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [path + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


# --------------------------------------------------------------------------------------------------- learning

def test_loss_falls_and_collapse_monitors_stay_healthy(data_dir, tmp_path):
    """40 steps: the total loss falls clearly; teacher targets stay neither uniform nor one-hot; features keep spread.

    Teacher EMA momentum 0.99 and center momentum 0.99 (instead of 0.992-0.998 and 0.9) so that 40 steps
    are enough to see the trend; constant teacher temperature 0.04; every global view masked at 50 %.
    """
    cfg = load_config(_config_file(tmp_path), [
        "steps=40", "momentum_start=0.99", "momentum_end=0.99", "center_momentum=0.99",
        "teacher_temp_warmup_steps=0", "teacher_temp_end=0.04", "mask_probability=1",
        "mask_ratio_min=0.5", "mask_ratio_max=0.5", "warmup_steps=3", "freeze_last_layer_steps=3"])
    res = train(cfg, data_dir, tmp_path / "run")
    rows = _read_log(tmp_path / "run")
    assert len(rows) == 40 and res["step"] == 40
    col = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if not k.startswith("val_dice")}
    assert all(r["val_dice"] == "" for r in rows)               # no validation by registration configured
    loss = col["loss"]
    first, last = loss[:10].mean(), loss[-10:].mean()
    print(f"loss first10={first:.3f} last10={last:.3f}; dino {col['dino_loss'][:10].mean():.3f}->"
          f"{col['dino_loss'][-10:].mean():.3f}; ibot {col['ibot_loss'][:10].mean():.3f}->{col['ibot_loss'][-10:].mean():.3f}")
    assert last < 0.8 * first                                   # a clear fall
    assert np.polyfit(np.arange(40), loss, 1)[0] < 0            # negative trend
    rank_corr = np.corrcoef(np.argsort(np.argsort(loss)), np.arange(40))[0, 1]
    assert rank_corr < -0.7                                     # mostly monotonic
    assert col["dino_loss"][-10:].mean() < col["dino_loss"][:10].mean()
    assert col["ibot_loss"][-10:].mean() < col["ibot_loss"][:10].mean()
    log_k = math.log(256)
    # teacher targets: not uniform (entropy well below log K), not one-hot, and different from token to token
    assert col["patch_entropy"].max() < log_k - 1.0 and col["patch_entropy"].min() > 0.5
    assert (col["patch_marginal_entropy"] - col["patch_entropy"]).min() > 0.5
    assert col["teacher_entropy"].max() < log_k - 1.0 and col["teacher_entropy"].min() > 0.5
    # dense features keep their spread (no collapse of the patch tokens)
    assert col["patch_std"][-5:].mean() > 0.3 and col["patch_std"][-5:].mean() > 0.7 * col["patch_std"][:5].mean()
    assert np.isfinite(col["cls_std"]).all()
    # the export exists and loads as a ViT3D
    from dinoreg_core.models.checkpoint import load_backbone

    model, vcfg, meta = load_backbone(res["export"])
    assert vcfg.depth == 2 and meta["provenance"]["steps"] == 40 and meta["provenance"]["seed"] == 0
    assert meta["provenance"]["data"]["volumes"] == 4              # the label map was left out
    assert meta["provenance"]["git_commit"] is None or len(meta["provenance"]["git_commit"]) == 40


def test_dense_loss_adds_the_unmasked_token_term_and_nothing_else(data_dir, tmp_path):
    """One step with dense_weight 0 and 0.5 from the same seed: the DINO, iBOT and KoLeo terms (computed before
    the first update) are identical; the total grows by exactly 0.5 x the logged dense loss, a cross-entropy
    between a random-init teacher and student that differs clearly from 0."""
    rows = {}
    for w in (0.0, 0.5):
        cfg = load_config(_config_file(tmp_path), ["steps=1", f"dense_weight={w}", "mask_probability=1",
                                                   "augment.remap_prob=1.0"])
        train(cfg, data_dir, tmp_path / f"run{w}")
        (row,) = _read_log(tmp_path / f"run{w}")
        rows[w] = {k: float(v) for k, v in row.items() if k in ("loss", "dino_loss", "ibot_loss", "dense_loss",
                                                                "koleo_loss")}
    a, b = rows[0.0], rows[0.5]
    assert a["dense_loss"] == 0.0
    for k in ("dino_loss", "ibot_loss", "koleo_loss"):
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6)
    assert math.isfinite(b["dense_loss"]) and b["dense_loss"] > 1.0
    assert b["loss"] == pytest.approx(a["loss"] + 0.5 * b["dense_loss"], rel=1e-6, abs=1e-5)


# ----------------------------------------------------------------------------------------------------- resume

def test_resume_after_stop_is_bit_exact(data_dir, tmp_path):
    """6 steps straight == 3 steps, process ends, new process resumes 3 steps: every tensor equal bit for bit."""
    cfg = _config_file(tmp_path, steps=6, drop_path_rate=0.1,   # drop path exercises the torch RNG state
                       dense_weight=1.0, augment=dict(SMALL["augment"], remap_prob=0.8))
    straight, split = tmp_path / "straight", tmp_path / "split"
    _pretrain(["--config", str(cfg), "--data", str(data_dir), "--out", str(straight)])
    r1 = _pretrain(["--config", str(cfg), "--data", str(data_dir), "--out", str(split), "--set", "steps_per_run=3"])
    assert "stopped at step 3" in r1.stdout
    half = torch.load(split / "checkpoint.pt", weights_only=True)
    assert half["step"] == 3 and half["samples"] == 12
    assert not (split / "teacher_backbone.safetensors").exists()
    _pretrain(["--data", str(data_dir), "--out", str(split), "--resume"])     # config (3 steps per run) from RUN_DIR
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("student", "teacher", "dino_center", "ibot_center", "optimizer", "scaler", "rng", "samples"):
        assert _same(a[key], b[key], key) == []
    assert a["config"]["steps_per_run"] == 0 and b["config"]["steps_per_run"] == 3
    assert len(a["optimizer"]["state"]) > 10
    # and the training curve: the same numbers, step by step
    la, lb = _read_log(straight), _read_log(split)
    assert [r["step"] for r in lb] == [str(i) for i in range(1, 7)]
    for ra, rb in zip(la, lb):
        assert {k: v for k, v in ra.items() if k != "sec_per_step"} == {k: v for k, v in rb.items() if k != "sec_per_step"}
    from safetensors.torch import load_file

    ea, eb = load_file(straight / "teacher_backbone.safetensors"), load_file(split / "teacher_backbone.safetensors")
    assert _same(ea, eb) == []


def test_refuses_to_overwrite_a_run_and_rejects_bad_config(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    cfg = load_config(_config_file(tmp_path), ["steps=1"])
    with pytest.raises(DinoregError, match="already holds a checkpoint"):
        train(cfg, data_dir, tmp_path / "run")
    with pytest.raises(DinoregError, match="Unknown setting 'stepz'"):
        load_config(None, ["stepz=3"])
    with pytest.raises(DinoregError, match="multiple of the patch size"):
        load_config(None, ["augment.global_size=30"])
    with pytest.raises(DinoregError, match="does not exist"):
        train(load_config(None, ["model=tiny"]), tmp_path / "nothing", tmp_path / "run2")
    c = load_config(None, ["augment.global_scale=[0.5,1]", "betas=0.9,0.95", "model_overrides={\"depth\": 3}"])
    assert c.augment.global_scale == (0.5, 1.0) and c.betas == (0.9, 0.95) and c.model_config().depth == 3


# -------------------------------------------------------------------------------------------------------- DDP

def test_ddp_two_processes_match_one_process(data_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), global batch 4 = 2 x 2, vs one process with batch 4, 3 steps.

    Tolerance: logged losses (global-batch means) within 1e-4 relative; student parameters within 1e-4 of each
    other and less than 1 % of how far the 3 steps moved them; teacher parameters within 1e-5. The ranks work
    on different halves of the batch (a rank computing the whole batch or the wrong half would not match).
    """
    cfg = _config_file(tmp_path, steps=3, lr=1e-3, warmup_steps=0)
    one, two = tmp_path / "one", tmp_path / "two"
    _pretrain(["--config", str(cfg), "--data", str(data_dir), "--out", str(one)])
    r = _pretrain(["--config", str(cfg), "--data", str(data_dir), "--out", str(two)], torchrun=2)
    assert r.stdout.count("exported teacher backbone") == 1          # rank 0 exports, rank 1 stays quiet
    a = torch.load(one / "checkpoint.pt", weights_only=True)
    b = torch.load(two / "checkpoint.pt", weights_only=True)
    assert b["world_size"] == 2 and a["world_size"] == 1 and a["samples"] == b["samples"] == 12
    for ra, rb in zip(_read_log(one), _read_log(two)):
        for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy"):
            assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-4, abs=1e-5), k
    # parameters: the same up to float summation order, and far closer than how far training moved them
    from dinoreg_core.ssl.train import build_net, seed_everything

    c = load_config(cfg)
    seed_everything(c.seed)
    init = build_net(c, c.model_config()).state_dict()          # the initial weights train() starts from
    diff = max(float((v - b["student"][k]).abs().max()) for k, v in a["student"].items() if v.numel())
    moved = max(float((v - init[k]).abs().max()) for k, v in a["student"].items() if v.numel())
    print(f"DDP vs single: max |param diff| = {diff:.2e}; max |param change| = {moved:.2e}")
    assert diff < 1e-4 and diff < 0.01 * moved
    for name, v in a["teacher"].items():
        assert torch.allclose(v, b["teacher"][name], atol=1e-5), name
    assert len(_read_log(two)) == 3
