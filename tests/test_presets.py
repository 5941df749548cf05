"""Registration presets (dinoreg_core.pipeline.presets): the default preset is the same as its values passed by hand, the
official preset is the configuration the official-package parity test checks, feature_scale multiplies the
features, presets in a weights JSON win over the package file, bad presets are refused in one sentence (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dinoreg_core import io
from dinoreg_core.pipeline import presets
from dinoreg_core.api import method_config, register
from dinoreg_core.cli import main
from dinoreg_core.errors import DinoregError
from dinoreg_core.features.mind import mind_ssc
from dinoreg_core.pipeline import align, get_registration_method
from dinoreg_core.pipeline.config import config_from
from dinoreg_core.preprocess import normalize_intensity
from dinoreg_core.registration import convex_adam as CA
from dinoreg_core.registration import warp as W
from synthetic_images import blobs

SHAPE = (20, 18, 16)
FAST = {"grid_sp": 4, "disp_hw": 2, "lambda_weight": 0.8, "iterations": 10, "feat.mind_r": 2, "feature_scale": 3.0,
        "lr": 0.5}


@pytest.fixture(scope="module")
def volumes():
    img = blobs(SHAPE, seed=3, n=20)
    v = W.smooth_random_field(SHAPE, max_disp=2.5, control_spacing=8, seed=5)
    mov = W.warp(img, v)
    lab = (img > img.median()).int() + (img > img.quantile(0.85)).int()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mk = lambda t, dt: io.Volume(t[0, 0].numpy().astype(dt), aff)  # noqa: E731
    return mk(img, np.float32), mk(mov, np.float32), mk(lab, np.int32), mk(W.warp_labels(lab, v), np.int32)


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A preset folder whose mind.json has a non-trivial default preset ('fast')."""
    (tmp_path / "mind.json").write_text(json.dumps({"method": "mind", "default": "tuned", "presets": {
        "official": {"settings": {}}, "tuned": {"settings": FAST, "source": "test"}}}))
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    return tmp_path


def test_default_preset_equals_its_values_passed_by_hand(volumes, package):
    f, m, fl, ml = volumes
    kw = dict(fixed_labels=fl, moving_labels=ml, fixed_modality="mr", moving_modality="mr")
    by_default = register(f, m, features="mind", **kw)
    by_hand = register(f, m, features="mind", preset="official", **FAST, **kw)
    assert by_default.config["preset"] == "tuned" and by_hand.config["preset"] == "official"
    assert by_default.config["convex"] == by_hand.config["convex"]
    assert by_default.config["convex"]["grid_sp"] == 4 and by_default.config["feature_scale"] == 3.0
    assert np.array_equal(by_default.displacement, by_hand.displacement)
    assert by_default.config["convex"] != config_from("mind", preset="official").convex.__dict__  # not the defaults
    # --set still overrides the preset
    assert method_config("mind", {"grid_sp": 3}).convex.grid_sp == 3


def test_cli_default_preset_equals_set_values_by_hand(volumes, package, tmp_path):
    f, m, fl, ml = volumes
    paths = {}
    for name, vol in (("f", f), ("m", m)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        io.save_image(vol.array, vol, paths[name])
    sets = sum((["--set", f"{k}={v}"] for k, v in FAST.items()), [])
    common = [str(paths["f"]), str(paths["m"]), "--fixed-modality", "mr", "--moving-modality", "mr"]
    assert main(["-q", "register", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["-q", "register", *common, "--preset", "official", *sets, "--out", str(tmp_path / "b")]) == 0
    import nibabel as nib

    a = np.asarray(nib.load(str(tmp_path / "a" / "disp.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "b" / "disp.nii.gz")).dataobj)
    assert np.array_equal(a, b)


def test_official_preset_is_the_configuration_of_the_official_parity_test(volumes):
    """The parity test (test_peers_convexadam_official) compares the official package with
    ``convex_adam(mind_ssc(., 1, 2), ConvexAdamConfig())``; the official preset runs exactly that."""
    f, m, _, _ = volumes
    cfg = config_from("mind", preset="official")
    assert cfg.convex == CA.ConvexAdamConfig() and cfg.feature_scale == 1.0 and cfg.feature_options == {}
    assert (cfg.convex.grid_sp, cfg.convex.disp_hw, cfg.convex.lambda_weight, cfg.convex.iterations,
            cfg.convex.grid_sp_adam, cfg.convex.ic) == (6, 4, 1.25, 80, 2, True)   # the official package's defaults
    pair = align(f, m, fixed_modality="mr", moving_modality="mr")
    torch.manual_seed(0)
    ours = get_registration_method("mind").register(pair, cfg.method_options()).field
    fn = torch.from_numpy(normalize_intensity(f.array, "mr"))[None, None]
    mn = torch.from_numpy(normalize_intensity(m.array, "mr"))[None, None]
    ref = CA.convex_adam(mind_ssc(fn, 1, 2), mind_ssc(mn, 1, 2), CA.ConvexAdamConfig())
    assert torch.equal(ours, ref)
    assert presets.load_preset("mind", "official").settings == {}


def test_feature_scale_multiplies_the_features(volumes):
    """Scaling the features by 2 scales both SSD costs by 4 (exactly, in floating point); with the coupling weights
    scaled by 4 too and no Adam stage the discrete field is bit-identical."""
    f, m, _, _ = volumes
    pair = align(f, m, fixed_modality="mr", moving_modality="mr")
    base = {"grid_sp": 2, "disp_hw": 2, "lambda_weight": 0}
    w = CA.ConvexAdamConfig().coupling_weights
    a = get_registration_method("mind").register(pair, {**base, "coupling_weights": list(w)}).field
    b = get_registration_method("mind").register(pair, {**base, "feature_scale": 2.0,
                                                        "coupling_weights": [4 * x for x in w]}).field
    c = get_registration_method("mind").register(pair, {**base, "feature_scale": 0.25,
                                                        "coupling_weights": list(w)}).field
    assert a.abs().max() > 0.3                       # the discrete stage moved something
    assert torch.equal(a, b)
    assert not torch.equal(a, c)                     # a weaker data term against the same coupling: another field


def test_authors_presets_map_the_published_settings():
    d = presets.load_preset("dino3d", "authors").settings
    assert (d["feature_scale"], d["lambda_weight"], d["disp_hw"], d["grid_sp"], d["grid_sp_adam"], d["iterations"],
            d["lr"], d["pca_dim"]) == (0.1, 0.12, 1, 6, 4, 1000, 0.2, 12)
    mind = presets.load_preset("mind", "authors").settings
    assert (mind["feat.mind_r"], mind["feat.mind_d"], mind["feature_scale"], mind["lambda_weight"]) == (3, 2, 3.0, 1.0)
    cfg = config_from("dino3d", {"iterations": 50}, preset="authors")   # --set on top of a preset
    assert cfg.convex.iterations == 50 and cfg.convex.lambda_weight == 0.12 and cfg.preset == "authors"


def test_a_preset_in_the_weights_json_wins_over_the_package_file(tmp_path):
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"model": {}, presets.WEIGHTS_KEY: {"default": "authors", "authors": {
        "settings": {"lambda_weight": 0.5, "feature_scale": 0.2}}}}))
    opts = {"weights": str(tmp_path / "w.safetensors")}
    assert presets.default_preset_name("dino3d", opts) == "authors"
    assert presets.load_preset("dino3d", "authors", opts).settings == {"lambda_weight": 0.5, "feature_scale": 0.2}
    assert presets.load_preset("dino3d", "authors").settings["lambda_weight"] == 0.12   # package file without them


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinoreg: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_presets_are_one_sentence_and_exit_2(tmp_path, capsys):
    args = ["register", "f.nii.gz", "m.nii.gz", "--out", str(tmp_path / "o")]
    assert "Unknown preset 'nosuch'" in _err(capsys, args + ["--preset", "nosuch"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "mind", "settings": {"lamda": 1.0}}))
    assert "lamda" in _err(capsys, args + ["--preset", str(bad)])
    bad.write_text('{"method": "mind", "settings": {"lambda_weight": NaN}}')
    assert "finite" in _err(capsys, args + ["--preset", str(bad)])
    bad.write_text('{"method": "mind", "settings": {"iterations": Infinity}}')
    assert "finite" in _err(capsys, args + ["--preset", str(bad)])
    bad.write_text(json.dumps({"method": "dino3d", "settings": {}}))
    assert "for method 'dino3d'" in _err(capsys, args + ["--preset", str(bad)])
    assert "feature_scale" in _err(capsys, args + ["--set", "feature_scale=0"])
    assert "feature_scale" in _err(capsys, args + ["--set", "feature_scale=-1"])
    assert "no 'authors' preset" in _err(capsys, args + ["--features", "intensity", "--preset", "authors"])
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_negative_hybrid_weight_is_refused(tmp_path, capsys):
    from dinoreg_core.pipeline import available_registration_methods

    if "dino3d+mind" not in available_registration_methods():
        pytest.skip("the dino3d+mind hybrid is not in this branch yet")
    for weight in ("dino_weight", "mind_weight"):
        err = _err(capsys, ["register", "f.nii.gz", "m.nii.gz", "--features", "dino3d+mind", "--set",
                            f"feat.{weight}=-0.5", "--out", str(tmp_path / "o")])
        assert weight in err and "f.nii.gz" not in err          # refused before any file is read


def test_a_preset_file_written_by_tune_loads_and_installs(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    p = presets.write_preset_file(tmp_path / "t.json", "mind", {"lambda_weight": 0.625}, source="test",
                                  extra={"objective": {"dice": 0.5}})
    assert presets.load_preset("mind", str(p)).settings == {"lambda_weight": 0.625}
    presets.install_preset(p, make_default=True)
    assert presets.default_preset_name("mind") == "tuned"
    assert config_from("mind", preset="default").convex.lambda_weight == 0.625
    with pytest.raises(DinoregError, match="finite"):
        presets.write_preset_file(tmp_path / "u.json", "mind", {"lambda_weight": float("nan")})


def test_shipped_tuned_presets_record_their_spacing_and_the_2mm_ones_load():
    """``tuned`` was searched on the 3 mm tuning cohort, ``tuned_2mm`` on the 2 mm one; both say so, and the 2 mm
    one loads by name through the same path as every preset (a method without it is refused in one sentence)."""
    for method in ("mind", "dino3d+mind", "dino3d", "intensity"):
        entries = presets.package_presets(method)["presets"]
        assert entries["tuned"]["spacing_mm"] == 3.0 and entries["tuned_2mm"]["spacing_mm"] == 2.0
        assert "tuning_2mm" in entries["tuned_2mm"]["tuning"]["dataset"]
        assert "tuned_2mm" in presets.available_presets(method)
        cfg = config_from(method, preset="tuned_2mm")
        assert cfg.preset == "tuned_2mm"
        assert cfg.convex.__dict__ != config_from(method, preset="tuned").convex.__dict__
    assert config_from("mind", preset="tuned_2mm").convex.disp_hw == 2
    from dinoreg_core.features.dino3d import DEFAULT_WEIGHTS
    travelling = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())[presets.WEIGHTS_KEY]
    assert travelling["tuned"]["spacing_mm"] == 3.0 and travelling["tuned_2mm"]["spacing_mm"] == 2.0
    with pytest.raises(DinoregError, match="no 'tuned_2mm' preset"):
        config_from("dinov2", preset="tuned_2mm")
