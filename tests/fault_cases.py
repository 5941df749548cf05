"""The table of bad inputs and faults that ``tests/test_faults.py`` runs against the CLI (and
``bench/fault_table.py`` turns into the README's reliability table).

Every case runs ``dinoreg ...`` (in-process through :func:`dinoreg_core.cli.main`, or as a real subprocess when
``subprocess=True``) in a workspace of tiny volumes (:func:`make_workspace`) and must give: exit status 2, exactly
one line on stderr that contains the case's ``culprit`` (the file or value at fault), no traceback, and an output
folder that is untouched (every file byte for byte as before) — for the cases that reuse a folder holding a
complete earlier set, that set is still complete.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io as _io
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
N = 24  # voxels per axis of the tiny volumes
SPACING = 2.0  # mm
FAST = ["--set", "grid_sp=4", "--set", "iterations=5"]  # keeps the one full registration of a case short


@dataclass
class Case:
    """One bad input or fault: ``argv(ws)`` -> the dinoreg arguments; ``setup(ws)`` prepares files; ``culprit`` must
    appear in the one stderr line; ``out`` is the folder (relative to the workspace) that must stay untouched;
    ``patch(ws)`` -> a context manager injecting a fault (in-process only); ``check(ws)`` -> extra assertion."""

    name: str
    what: str  # the case in words (the README table)
    argv: Callable
    culprit: str
    out: str | None = None
    setup: Callable | None = None
    patch: Callable | None = None
    check: Callable | None = None
    subprocess: bool = False
    copy_prev: bool = True  # out starts as a copy of the complete earlier set


# ---------------------------------------------------------------------------------------------- workspace
def _smooth(rng, n=N) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(rng.normal(size=(n, n, n)), 2)
    return ((a - a.min()) / (a.max() - a.min()) * 1000 - 500).astype(np.float32)


def _save(arr, path, affine=None):
    nib.save(nib.Nifti1Image(arr, np.diag([SPACING] * 3 + [1.0]) if affine is None else affine), str(path))


def _header_only(path: Path, shape, gz: bool) -> None:
    """A NIfTI header declaring ``shape`` float32 voxels, followed by only 1 KB of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    blob = hdr.binaryblock + b"\0" * 4 + b"\0" * 1024
    path.write_bytes(gzip.compress(blob) if gz else blob)


def make_workspace(root: Path) -> Path:
    """Tiny inputs, bad inputs and one complete earlier output set (``prev``) under ``root``; returns root."""
    from dinoreg_core.cli import main

    root = Path(root)
    inp = root / "in"
    inp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    fixed = _smooth(rng)
    from scipy.ndimage import shift

    moving = shift(fixed, (1.5, -1.0, 0.5), order=1, mode="nearest").astype(np.float32)
    _save(fixed, inp / "fixed.nii.gz")
    _save(moving, inp / "moving.nii.gz")
    _save(((fixed > 0).astype(np.int16) + (fixed > 200)).astype(np.int16), inp / "flab.nii.gz")
    _save(((moving > 0).astype(np.int16) + (moving > 200)).astype(np.int16), inp / "mlab.nii.gz")
    blob = (inp / "fixed.nii.gz").read_bytes()
    (inp / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    (inp / "random.nii.gz").write_bytes(rng.bytes(4096))
    (inp / "notes.txt").write_text("not an image\n")
    _header_only(inp / "claims2000.nii.gz", (2000, 2000, 2000), gz=True)
    _header_only(inp / "claims2000.nii", (2000, 2000, 2000), gz=False)
    _save(fixed[:, :, 0].copy(), inp / "flat2d.nii.gz")
    _save(np.stack([fixed, fixed], -1), inp / "four_d.nii.gz")
    a = fixed.copy(); a[3, 4, 5] = np.nan
    _save(a, inp / "nan.nii.gz")
    a = fixed.copy(); a[3, 4, 5] = np.inf
    _save(a, inp / "inf.nii.gz")
    _save(np.zeros_like(fixed), inp / "zeros.nii.gz")
    _save(fixed[:3, :3, :3].copy(), inp / "tiny3.nii.gz")
    _save(fixed[:10, :10, :10].copy(), inp / "small10.nii.gz")
    far = np.diag([SPACING] * 3 + [1.0]); far[:3, 3] = 10000.0
    _save(moving, inp / "far.nii.gz", far)
    _save(fixed, inp / "singular.nii")  # then the header's sform row z zeroed (nibabel refuses to write it)
    raw = bytearray((inp / "singular.nii").read_bytes())
    raw[252:256] = np.array([0, 1], np.int16).tobytes()  # qform_code 0, sform_code 1
    raw[312:328] = np.zeros(4, np.float32).tobytes()  # srow_z = 0: a singular affine
    (inp / "singular.nii").write_bytes(bytes(raw))
    _save(np.ones((N - 4,) * 3, np.int16), inp / "lab_othergrid.nii.gz")
    _save(np.full((N,) * 3, 0.5, np.float32), inp / "lab_float.nii.gz")
    _save(-np.ones((N,) * 3, np.int16), inp / "lab_negative.nii.gz")
    _save(np.zeros((N,) * 3, np.int16), inp / "lab_empty.nii.gz")
    maps = {"map_list.json": "[1, 2, 3]", "map_neg_key.json": '{"-1": 5}', "map_neg_val.json": '{"2": -3}',
            "map_big_val.json": '{"2": 99999999999}', "map_big_key.json": '{"999999999999": 1}',
            "map_text.json": "{not json", "map_str_val.json": '{"2": "abc"}', "map_obj.json": '{"2": {"x": 1}}',
            "map_float_key.json": '{"1.5": 2}', "map_empty.json": "{}"}
    for name, text in maps.items():
        (inp / name).write_text(text)
    (root / "afile").write_text("a file where a folder is expected\n")
    # one complete earlier output set, reused by the cases that write into a folder
    rc = main(["-q", "register", str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz"), "--fixed-labels",
               str(inp / "flab.nii.gz"), "--moving-labels", str(inp / "mlab.nii.gz"), "--out", str(root / "prev"),
               *FAST])
    assert rc == 0, "the earlier output set could not be made"
    _dinov2_pickle_folder(root / "dv2_pickle")
    _pretrain_inputs(root)
    _reproduce_inputs(root)
    return root


def _pretrain_inputs(root: Path) -> None:
    """Two scans, a run folder with a saved config, and damaged checkpoints for the --resume cases."""
    import torch

    from dinoreg_core.ssl.train import config_to_dict, load_config

    scans = root / "scans"
    scans.mkdir(exist_ok=True)
    shutil.copy(root / "in" / "fixed.nii.gz", scans / "a.nii.gz")
    shutil.copy(root / "in" / "moving.nii.gz", scans / "b.nii.gz")
    cfg = config_to_dict(load_config(REPO / "dinoreg_core" / "configs" / "pretrain_demo.json", ["steps=4"]))
    good = {"step": 2, "samples": 8, "config": cfg, "student": {}, "teacher": {}, "dino_center": {},
            "ibot_center": {}, "optimizer": {}, "scaler": {}, "rng": [], "world_size": 1, "data": {}}
    buf = _io.BytesIO()
    torch.save(good, buf)
    variants = {
        "truncated": buf.getvalue()[:200],
        "random": np.random.default_rng(1).bytes(2048),
        "keys": None,
        "malicious": pickle.dumps(_Evil(str(root / "PWNED"))),
        "config": None,
    }
    for name, blob in variants.items():
        run = root / f"run_{name}"
        run.mkdir(exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg, indent=2))
        if name == "keys":
            torch.save({"step": 2, "samples": 8}, run / "checkpoint.pt")
        elif name == "config":
            torch.save(good, run / "checkpoint.pt")  # its config has head_out_dim 512; the case asks for 128
        else:
            (run / "checkpoint.pt").write_bytes(blob)


def _dinov2_pickle_folder(folder: Path) -> None:
    """A Hugging Face DINOv2 folder (config.json) whose pytorch_model.bin is a malicious pickle."""
    from transformers import Dinov2Config

    Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 patch_size=14).save_pretrained(str(folder))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(folder.parent / "PWNED"))))


class _Evil:
    """A pickle that would run a shell command when unpickled without ``weights_only``."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _reproduce_inputs(root: Path) -> None:
    out = root / "results"
    (out / "runs" / "mine").mkdir(parents=True, exist_ok=True)
    (out / "runs" / "mine" / "my_notes.txt").write_text("written by the user, not by dinoreg\n")
    (root / "keep_me.txt").write_text("outside --out\n")
    (root / "bad_profile.json").write_text("{broken")


# ---------------------------------------------------------------------------------------------- the cases
def _reg(*extra, fixed="fixed.nii.gz", moving="moving.nii.gz", out="out"):
    return lambda ws: ["register", str(ws / "in" / fixed), str(ws / "in" / moving), "--out", str(ws / out),
                       *FAST, *[e.format(ws=ws) for e in extra]]


def _set(kv, **kw):
    return _reg("--set", kv, **kw)


def _labels(flab="flab.nii.gz", mlab="mlab.nii.gz", *extra):
    return _reg("--fixed-labels", "{ws}/in/" + flab, "--moving-labels", "{ws}/in/" + mlab, *extra)


def _map(name):
    return _labels("flab.nii.gz", "mlab.nii.gz", "--label-map", "{ws}/in/" + name)


def _enospc_at(name: str):
    """Patch the JSON writer of the write stage to fail with 'No space left on device' at file ``name``."""
    def patch(ws):
        import importlib

        w = importlib.import_module("dinoreg_core.pipeline.write")  # the module (the package exports a function)
        real = w.write_json_atomic

        def fake(path, obj):
            if Path(path).name == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, obj)

        return mock.patch.object(w, "write_json_atomic", fake)

    return patch


def _fail_nifti(err: int):
    """Patch nibabel's save (as used by io) to fail with OS error ``err`` on the displacement file."""
    real = nib.save

    def fake(img, path, *a, **k):
        if "disp" in Path(path).name:
            raise OSError(err, os.strerror(err), str(path))
        return real(img, path, *a, **k)

    return lambda ws: mock.patch("nibabel.save", fake)


def _input_in_out(name: str, which: str):
    """Put a copy of an input into the output folder under output name ``name``."""
    def setup(ws):
        src = ws / "in" / ("moving.nii.gz" if which == "moving" else "fixed.nii.gz")
        shutil.copy(src, ws / "out" / name)
    return setup


def _pre(*extra, out="run_new", data="scans"):
    return lambda ws: ["pretrain", "--data", str(ws / data), "--out", str(ws / out), *extra]


def _resume(run):
    return lambda ws: ["pretrain", "--data", str(ws / "scans"), "--out", str(ws / run), "--resume"]


def _rep(*extra):
    return lambda ws: ["reproduce", "--out", str(ws / "results"), "--no-progress", *extra]


def _absent(p: Path):
    assert not p.exists(), f"{p} was created by a failing run"


def _not_pwned(ws):
    assert not (ws / "PWNED").exists(), "the malicious checkpoint ran code"


def _outside_kept(ws):
    assert (ws / "keep_me.txt").is_file() and (ws / "in" / "fixed.nii.gz").is_file(), "--fresh deleted outside --out"


CASES: list[Case] = [
    # --- image files
    Case("fixed_missing", "fixed scan does not exist", _reg(fixed="nope.nii.gz"), "nope.nii.gz", "out"),
    Case("moving_missing", "moving scan does not exist", _reg(moving="nope.nii.gz"), "nope.nii.gz", "out"),
    Case("fixed_folder", "fixed scan is a folder", lambda ws: ["register", str(ws / "in"), str(ws / "in/moving.nii.gz"),
                                                                 "--out", str(ws / "out")], "is a folder", "out"),
    Case("fixed_not_nifti", "fixed scan is a text file", _reg(fixed="notes.txt"), "notes.txt", "out"),
    Case("fixed_truncated", "fixed .nii.gz cut in half", _reg(fixed="truncated.nii.gz"), "damaged or truncated", "out",
         subprocess=True),
    Case("fixed_random", "fixed .nii.gz of random bytes", _reg(fixed="random.nii.gz"), "random.nii.gz", "out"),
    Case("header_2000_gz", "a tiny .nii.gz whose header claims 2000^3 voxels", _reg(fixed="claims2000.nii.gz"),
         "damaged or truncated", "out"),
    Case("header_2000_nii", "1 KB .nii whose header claims 2000^3 voxels", _reg(moving="claims2000.nii"),
         "damaged or truncated", "out"),
    Case("image_2d", "2D image", _reg(fixed="flat2d.nii.gz"), "flat2d.nii.gz", "out"),
    Case("image_4d", "4D image (2 volumes)", _reg(moving="four_d.nii.gz"), "four_d.nii.gz", "out"),
    Case("image_nan", "a NaN voxel", _reg(fixed="nan.nii.gz"), "nan.nii.gz", "out"),
    Case("image_inf", "an infinite voxel", _reg(moving="inf.nii.gz"), "inf.nii.gz", "out"),
    Case("image_zero", "an all-zero image", _reg(moving="zeros.nii.gz"), "zeros.nii.gz", "out"),
    Case("volume_3", "3x3x3 volumes (too small for ConvexAdam's grids)",
         _reg(fixed="tiny3.nii.gz", moving="tiny3.nii.gz"), "needs at least", "out"),
    Case("volume_10_grid6", "10^3 volumes with grid_sp=6", lambda ws: ["register", str(ws / "in/small10.nii.gz"),
         str(ws / "in/small10.nii.gz"), "--out", str(ws / "out")], "grid_sp=6", "out"),
    Case("no_overlap", "moving scan 10 m away in world space", _reg(moving="far.nii.gz"), "does not overlap", "out"),
    Case("singular_affine", "singular affine", _reg(fixed="singular.nii"), "singular.nii", "out"),
    # --- label files
    Case("labels_other_grid", "fixed labels on another grid", _labels("lab_othergrid.nii.gz"), "lab_othergrid", "out"),
    Case("labels_float", "label map of fractional values", _labels("lab_float.nii.gz"), "lab_float", "out"),
    Case("labels_negative", "label map with negative ids", _labels("flab.nii.gz", "lab_negative.nii.gz"),
         "lab_negative", "out"),
    Case("labels_empty", "label map without any label", _labels("lab_empty.nii.gz"), "lab_empty", "out"),
    Case("labels_missing", "label file does not exist", _labels("nope_lab.nii.gz"), "nope_lab", "out"),
    # --- label id maps
    Case("map_list", "label map JSON is a list", _map("map_list.json"), "map_list.json", "out"),
    Case("map_neg_key", 'label map {"-1": 5}', _map("map_neg_key.json"), "-1", "out"),
    Case("map_neg_val", 'label map {"2": -3}', _map("map_neg_val.json"), "-3", "out"),
    Case("map_big_val", 'label map {"2": 99999999999}', _map("map_big_val.json"), "99999999999", "out"),
    Case("map_big_key", 'label map key 999999999999', _map("map_big_key.json"), "too large", "out"),
    Case("map_not_json", "label map is not JSON", _map("map_text.json"), "map_text.json", "out"),
    Case("map_missing", "label map does not exist", _map("map_nope.json"), "map_nope.json", "out"),
    Case("map_str_val", 'label map {"2": "abc"}', _map("map_str_val.json"), "abc", "out"),
    Case("map_obj", 'label map {"2": {"x": 1}} (no total_id)', _map("map_obj.json"), "total_id", "out"),
    Case("map_float_key", 'label map {"1.5": 2}', _map("map_float_key.json"), "1.5", "out"),
    Case("map_empty", "label map {}", _map("map_empty.json"), "empty", "out"),
    # --- ConvexAdam settings
    Case("lr_inf", "--set lr=inf", _set("lr=inf"), "lr", "out", subprocess=True),
    Case("lambda_inf", "--set lambda_weight=inf", _set("lambda_weight=inf"), "lambda_weight", "out"),
    Case("cost_nan", "--set cost_scale=nan", _set("cost_scale=nan"), "cost_scale", "out"),
    Case("lambda_nan", "--set lambda_weight=nan", _set("lambda_weight=nan"), "lambda_weight", "out"),
    Case("lr_1e20", "--set lr=1e20 (cap 10)", _set("lr=1e20"), "lr=1e+20", "out"),
    Case("lr_zero", "--set lr=0", _set("lr=0"), "lr=0", "out"),
    Case("lr_negative", "--set lr=-1", _set("lr=-1"), "lr=-1", "out"),
    Case("disp_hw_40", "--set disp_hw=40 (cap 8)", _set("disp_hw=40"), "disp_hw=40", "out"),
    Case("disp_hw_neg", "--set disp_hw=-1", _set("disp_hw=-1"), "disp_hw=-1", "out"),
    Case("grid_sp_0", "--set grid_sp=0", _set("grid_sp=0"), "grid_sp=0", "out"),
    Case("grid_sp_1000", "--set grid_sp=1000 (cap 32)", _set("grid_sp=1000"), "grid_sp=1000", "out"),
    Case("iterations_1e9", "--set iterations=1e9 (cap 10000)", _set("iterations=1e9"), "iterations", "out"),
    Case("iterations_neg", "--set iterations=-5", _set("iterations=-5"), "iterations=-5", "out"),
    Case("grid_sp_frac", "--set grid_sp=2.5", _set("grid_sp=2.5"), "grid_sp", "out"),
    Case("final_smooth_even", "--set final_smooth=4", _set("final_smooth=4"), "final_smooth=4", "out"),
    Case("ic_word", "--set ic=maybe", _set("ic=maybe"), "ic", "out"),
    Case("coupling_zero", "--set coupling_weights=0,1", _set("coupling_weights=0,1"), "coupling_weights", "out"),
    Case("ic_iterations_big", "--set ic_iterations=1000 (cap 100)", _set("ic_iterations=1000"), "ic_iterations", "out"),
    # --- other settings and options
    Case("unknown_setting", "--set bogus=3", _set("bogus=3"), "bogus", "out"),
    Case("unknown_feature_option", "--set feat.bogus=3", _set("feat.bogus=3"), "bogus", "out"),
    Case("mind_r_neg", "--set feat.mind_r=-1", _set("feat.mind_r=-1"), "feat.mind_r=-1", "out"),
    Case("mind_r_big", "--set feat.mind_r=100", _set("feat.mind_r=100"), "feat.mind_r=100", "out"),
    Case("mind_d_zero", "--set feat.mind_d=0", _set("feat.mind_d=0"), "feat.mind_d=0", "out"),
    Case("mind_r_text", "--set feat.mind_r=abc", _set("feat.mind_r=abc"), "mind_r", "out"),
    Case("pca_zero", "--set pca_dim=0", _set("pca_dim=0"), "pca_dim=0", "out"),
    Case("pca_huge", "--set pca_dim=100000", _set("pca_dim=100000"), "pca_dim=100000", "out"),
    Case("set_no_equals", "--set grid_sp (no =)", _reg("--set", "grid_sp"), "grid_sp", "out"),
    Case("weights_with_mind", "--weights x with --features mind", _reg("--weights", "{ws}/w.safetensors"),
         "--weights", "out"),
    Case("unknown_method", "--features nosuch", _reg("--features", "nosuch"), "nosuch", "out"),
    Case("bad_device", "--device tpu", _reg("--device", "tpu"), "tpu", "out"),
    Case("bad_cuda_device", "--device cuda:banana", _reg("--device", "cuda:banana"), "cuda:banana", "out"),
    Case("intensity_option", "--features intensity --set feat.mind_r=1", _reg("--features", "intensity", "--set",
         "feat.mind_r=1"), "mind_r", "out"),
    Case("dinov2_pickle_bin", "a dinov2 folder whose .bin is a malicious pickle",
         _reg("--features", "dinov2", "--weights", "{ws}/dv2_pickle"), "dv2_pickle", "out", check=_not_pwned),
    Case("new_out_not_created", "a failing run does not create a new --out", _set("lr=inf", out="never_made"),
         "lr", "never_made", copy_prev=False, check=lambda ws: _absent(ws / "never_made")),
    # --- outputs
    Case("input_named_warped", "moving input named warped.nii.gz inside --out",
         lambda ws: ["register", str(ws / "in/fixed.nii.gz"), str(ws / "out/warped.nii.gz"), "--out", str(ws / "out"),
                     *FAST], "warped.nii.gz", "out", setup=_input_in_out("warped.nii.gz", "moving")),
    Case("input_named_disp", "fixed input named disp.nii.gz inside --out",
         lambda ws: ["register", str(ws / "out/disp.nii.gz"), str(ws / "in/moving.nii.gz"), "--out", str(ws / "out"),
                     *FAST], "disp.nii.gz", "out", setup=_input_in_out("disp.nii.gz", "fixed")),
    Case("out_is_file", "--out is a file", _reg(out="afile"), "afile", "afile", copy_prev=False),
    Case("out_under_file", "--out below a file", _reg(out="afile/sub"), "afile", "afile", copy_prev=False),
    Case("enospc_metrics", "disk full exactly at metrics.json", _reg(), "No space left", "out",
         patch=_enospc_at("metrics.json")),
    Case("enospc_config", "disk full at config.json (the last file)", _reg(), "No space left", "out",
         patch=_enospc_at("config.json")),
    Case("enospc_disp", "disk full at disp.nii.gz", _reg(), "disp.nii.gz", "out", patch=_fail_nifti(errno.ENOSPC)),
    Case("eacces_disp", "permission denied at disp.nii.gz", _reg(), "disp.nii.gz", "out",
         patch=_fail_nifti(errno.EACCES)),
    Case("eio_disp", "I/O error at disp.nii.gz", _reg(), "disp.nii.gz", "out", patch=_fail_nifti(errno.EIO)),
    # --- pretraining
    Case("ckpt_truncated", "pretrain --resume, truncated checkpoint.pt", _resume("run_truncated"),
         "damaged or truncated", "run_truncated", copy_prev=False),
    Case("ckpt_random", "pretrain --resume, random-bytes checkpoint.pt", _resume("run_random"),
         "damaged or truncated", "run_random", copy_prev=False),
    Case("ckpt_keys", "pretrain --resume, checkpoint missing keys", _resume("run_keys"), "'config' is missing",
         "run_keys", copy_prev=False),
    Case("ckpt_malicious", "pretrain --resume, malicious pickle checkpoint", _resume("run_malicious"),
         "run_malicious", "run_malicious", copy_prev=False, check=_not_pwned, subprocess=True),
    Case("resume_head_dim", "pretrain --resume --set head_out_dim=128", lambda ws: _resume("run_config")(ws) + [
         "--set", "head_out_dim=128"], "head_out_dim", "run_config", copy_prev=False),
    Case("pretrain_lr_inf", "pretrain --set lr=inf", _pre("--config", "demo", "--set", "lr=inf"), "lr", "run_new",
         copy_prev=False),
    Case("pretrain_steps_0", "pretrain --set steps=0", _pre("--config", "demo", "--set", "steps=0"), "steps=0",
         "run_new", copy_prev=False),
    Case("pretrain_lr_5", "pretrain --set lr=5 (cap 1)", _pre("--config", "demo", "--set", "lr=5"), "lr=5.0",
         "run_new", copy_prev=False),
    Case("pretrain_temp_0", "pretrain --set student_temp=0", _pre("--config", "demo", "--set", "student_temp=0"),
         "student_temp", "run_new", copy_prev=False),
    Case("pretrain_bogus", "pretrain --set bogus=1", _pre("--config", "demo", "--set", "bogus=1"), "bogus", "run_new",
         copy_prev=False),
    Case("pretrain_no_data", "pretrain --data missing", _pre("--config", "demo", data="nodata"), "nodata", "run_new",
         copy_prev=False),
    Case("pretrain_no_config", "pretrain --config missing.json", _pre("--config", "missing.json"), "missing.json",
         "run_new", copy_prev=False),
    Case("pretrain_overwrite", "pretrain into a run folder holding a checkpoint (no --resume)",
         _pre("--config", "demo", out="run_config"), "already holds a checkpoint", "run_config", copy_prev=False),
    # --- reproduce
    Case("fresh_dotdot", "reproduce --fresh --run-id ..", _rep("--fresh", "--run-id", ".."), "'..'", "results",
         copy_prev=False, check=_outside_kept),
    Case("fresh_dot", "reproduce --fresh --run-id .", _rep("--fresh", "--run-id", "."), "'.'", "results",
         copy_prev=False, check=_outside_kept),
    Case("fresh_traversal", "reproduce --fresh --run-id ../../x", _rep("--fresh", "--run-id", "../../x"), "../../x",
         "results", copy_prev=False, check=_outside_kept, subprocess=True),
    Case("fresh_foreign", "reproduce --fresh on a folder dinoreg did not write", _rep("--fresh", "--run-id", "mine"),
         "mine", "results", copy_prev=False),
    Case("run_id_slash", "reproduce --run-id a/b", _rep("--run-id", "a/b"), "a/b", "results", copy_prev=False),
    Case("profile_unknown", "reproduce --profile nosuch", _rep("--profile", "nosuch"), "nosuch", "results",
         copy_prev=False),
    Case("profile_bad_json", "reproduce --profile broken JSON", lambda ws: _rep("--profile", str(ws / "bad_profile.json"))(ws),
         "bad_profile.json", "results", copy_prev=False),
    Case("reproduce_unknown_param", "reproduce --set nosuchparam=1", _rep("--set", "nosuchparam=1"), "nosuchparam",
         "results", copy_prev=False),
    Case("reproduce_bad_notebook", "reproduce --set 09.steps=1", _rep("--set", "09.steps=1"), "09", "results",
         copy_prev=False),
    Case("reproduce_set_nan", "reproduce --set steps=nan", _rep("--set", "steps=nan"), "nan", "results",
         copy_prev=False),
]


# ---------------------------------------------------------------------------------------------- running one
def snapshot(folder: Path) -> dict | None:
    """{relative path: sha256} of every file under ``folder`` (hidden ones included); None when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_case(case: Case, ws: Path) -> dict:
    """Run ``case`` in workspace ``ws``: {"rc", "stderr", "before", "after" (snapshots of its output folder),
    "complete_before", "complete_after" (it held a complete set by its outputs.json)}."""
    from dinoreg_core.outputs import verify

    out = ws / case.out if case.out else None
    if out is not None and case.copy_prev:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ws / "prev", out)
    if case.setup:
        case.setup(ws)
    before = snapshot(out) if out is not None else None
    complete_before = out is not None and out.is_dir() and verify(out) is None
    argv = case.argv(ws)
    if case.subprocess:
        res = subprocess.run([sys.executable, "-m", "dinoreg_core.cli", *argv], cwd=ws, env=_env(),
                             capture_output=True, text=True, timeout=300)
        rc, err = res.returncode, res.stderr
    else:
        from dinoreg_core.cli import main

        buf_err, buf_out = _io.StringIO(), _io.StringIO()
        ctx = case.patch(ws) if case.patch else contextlib.nullcontext()
        cwd = os.getcwd()
        try:
            os.chdir(ws)
            with ctx, contextlib.redirect_stderr(buf_err), contextlib.redirect_stdout(buf_out):
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse
                    rc = e.code
        finally:
            os.chdir(cwd)
        err = buf_err.getvalue()
    after = snapshot(out) if out is not None else None
    return {"rc": rc, "stderr": err, "before": before, "after": after, "complete_before": complete_before,
            "complete_after": out is not None and out.is_dir() and verify(out) is None}
