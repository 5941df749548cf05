"""Registration-method registry: lookup, the project's own path through it, and the clear errors for peers whose
package or weights are missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dinoreg_core import io
from dinoreg_core.errors import DinoregError
from dinoreg_core.peers import available_registration_methods, get_registration_method
from dinoreg_core.peers._worker import python_has
from dinoreg_core.registration import warp as W


def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and msg.endswith(".") and len(msg) < 600, msg


def test_registry_lists_every_method_and_rejects_unknown_names():
    names = available_registration_methods()
    for m in ("intensity", "mind", "dino3d", "dinov2", "ants", "convexadam_official", "unigradicon"):
        assert m in names
    with pytest.raises(DinoregError, match="Unknown registration method 'nope'; known: .*ants"):
        get_registration_method("nope")


def test_mind_through_the_registry_registers_a_known_warp():
    shape = (36, 32, 28)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.avg_pool3d(torch.rand((1, 1, *shape), generator=g), 5, 1, 2) * 3000 - 1000
    v = W.smooth_random_field(shape, max_disp=2.5, control_spacing=8, seed=1)
    mov = W.warp(img, v)
    truth = W.invert(v)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    out = get_registration_method("mind").run(io.Volume(img[0, 0].numpy(), aff), io.Volume(mov[0, 0].numpy(), aff),
                                                   fixed_modality="ct", moving_modality="ct",
                                                   options={"grid_sp": 4, "iterations": 40})
    assert out.displacement.shape == (1, 3, *shape)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert (out.displacement - truth)[inner].norm(dim=1).mean() < 0.6 * truth[inner].norm(dim=1).mean()
    assert out.settings["convex"]["grid_sp"] == 4 and out.settings["features"] == "mind"


def test_methods_refuse_scans_on_different_grids():
    a = io.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    b = io.Volume(np.zeros((8, 8, 9), np.float32), np.eye(4))
    for name in ("mind", "convexadam_official", "ants", "unigradicon"):
        with pytest.raises(DinoregError, match="resampled onto the fixed grid") as e:
            get_registration_method(name).run(a, b, fixed_modality="ct", moving_modality="ct")
        _one_sentence(str(e.value))


def test_ants_missing_gives_one_sentence(monkeypatch, tmp_path):
    from dinoreg_core.peers import ants

    monkeypatch.setenv("DINOREG_ANTS_PYTHON", sys.executable)  # the test Python has no antspyx
    if python_has.__wrapped__(sys.executable, ("-c", "import ants")):
        pytest.skip("this Python imports antspyx")
    reason = ants.check({})
    assert reason is not None and "antspyx" in reason and "DINOREG_ANTS_PYTHON" in reason and ".venv-peers" in reason
    _one_sentence(reason)
    vol = io.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(DinoregError, match="needs antspyx"):
        ants.run(vol, vol, fixed_modality="ct", moving_modality="ct")
    with pytest.raises(DinoregError, match="Unknown ants option"):
        ants.AntsConfig.from_options({"iterations": 3})


def test_convexadam_official_missing_gives_one_sentence(monkeypatch):
    import importlib.util

    from dinoreg_core.peers import convexadam_official as peer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "convexAdam" else real(name, *a))
    reason = peer.check({})
    assert reason is not None and "pip install convexadam==0.2.0" in reason
    _one_sentence(reason)
    vol = io.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(DinoregError, match="official ConvexAdam package"):
        peer.run(vol, vol, fixed_modality="ct", moving_modality="ct")


def test_unigradicon_missing_weights_or_package_gives_one_sentence(monkeypatch, tmp_path):
    from dinoreg_core.peers import unigradicon as peer

    monkeypatch.delenv("DINOREG_UNIGRADICON_WEIGHTS", raising=False)
    missing = tmp_path / "nope" / "Step_2_final.trch"
    reason = peer.check({"weights": str(missing)})
    assert reason is not None and str(missing) in reason and "never downloaded" in reason
    _one_sentence(reason)
    vol = io.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(DinoregError, match="weights file"):
        peer.run(vol, vol, fixed_modality="ct", moving_modality="ct", options={"weights": str(missing)})
    # weights present, package absent (the test Python has no unigradicon)
    w = tmp_path / "Step_2_final.trch"
    w.write_bytes(b"not really weights")
    monkeypatch.setenv("DINOREG_UNIGRADICON_PYTHON", sys.executable)
    if python_has.__wrapped__(sys.executable, (str(peer.WORKER), "--probe")):
        pytest.skip("this Python imports unigradicon")
    reason = peer.check({"weights": str(w)})
    assert reason is not None and "unigradicon package" in reason and "DINOREG_UNIGRADICON_PYTHON" in reason
    _one_sentence(reason)
    with pytest.raises(DinoregError, match="Unknown unigradicon option"):
        peer.UniGradICONConfig.from_options({"weight": "x"})


def test_dino3d_without_weights_is_reported_not_run(tmp_path):
    reason = get_registration_method("dino3d").check({"feat.weights": str(tmp_path / "none.safetensors")})
    assert reason is not None and "none.safetensors" in reason
