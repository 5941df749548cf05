"""Streamed pretraining data (dinoreg_core.data.stream, dinoreg_core.ssl.data.StreamViews): no subject repeats
within a block, crops of the configured physical size, the same geometry under two appearances, exact resume with
every new knob on."""

import json
import math

import torch

from dinoreg_core.data.augment import AugmentConfig, flip_volume
from dinoreg_core.data.render import RenderConfig
from dinoreg_core.data.stream import SubjectPool, SubjectSchedule, generate_shapes, stream_subject_seed
from dinoreg_core.ssl.data import MaskConfig, StepBatchSampler, StreamConfig, StreamViews, collate_views
from test_ssl_train import SMALL, _pretrain, _read_log, _same, data_dir  # noqa: F401  (data_dir: a fixture)

SHAPES = dict(enabled=True, source="shapes", shape=[40, 40, 40], spacing_mm=3.0, pool_size=8, new_every=2)


def views_dataset(augment=None, **over) -> StreamViews:
    cfg = StreamConfig(**{**SHAPES, **over})
    aug = augment or AugmentConfig(n_global=2, n_local=0, global_size=16, max_aspect=1.15)
    return StreamViews(cfg, aug, MaskConfig(), patch_size=4, seed=3)


def test_schedule_never_repeats_a_subject_within_a_block_and_retires_it():
    s = SubjectSchedule(seed=5, pool_size=8, new_every=2)          # 4 new subjects per block of 8 samples
    subj = [s.subject(i) for i in range(8 * 30)]
    for b in range(30):
        block = subj[8 * b: 8 * b + 8]
        assert len(set(block)) == 8
        assert set(block) == set(range(4 * b, 4 * b + 8))
    first, last = {}, {}
    for i, k in enumerate(subj):
        first.setdefault(k, i)
        last[k] = i
    assert all(last[k] - first[k] < 16 for k in range(4, 100))      # used in 2 consecutive blocks, then never
    assert all(subj.count(k) == 2 for k in range(4, 100))
    assert [SubjectSchedule(5, 8, 2).subject(i) for i in (77, 3, 150)] == [subj[77], subj[3], subj[150]]
    assert len({stream_subject_seed(5, k) for k in range(1000)}) == 1000


def test_pool_gives_the_scheduled_maps_whatever_the_order_of_requests():
    sched = SubjectSchedule(seed=1, pool_size=4, new_every=2)
    cfg = StreamConfig(**SHAPES).phantom_config()
    pool = SubjectPool(sched, cfg, threads=2, source="shapes")
    got = {i: pool.get(i) for i in (0, 5, 9, 4)}
    for i, (k, tissue) in got.items():
        assert k == sched.subject(i)
        assert torch.equal(tissue, generate_shapes(stream_subject_seed(1, k), (40, 40, 40)))


def test_a_streamed_batch_never_repeats_a_subject_within_an_epoch_sized_window():
    """Batches of 4 over 6 steps (3 blocks of pool_size 8): every aligned window of 8 samples has 8 subjects."""
    ds = views_dataset()
    sampler = StepBatchSampler(0, 6, 4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_views)
    volumes = torch.cat([b["volumes"] for b in loader]).tolist()
    assert len(volumes) == 24
    for w in range(0, 24, 8):
        assert len(set(volumes[w:w + 8])) == 8
    assert volumes[:8] != volumes[8:16]


def test_spacing_augmentation_gives_crops_of_the_configured_physical_size():
    ds = views_dataset(spacing_range_mm=(2.0, 4.0))
    size = ds.augment.global_size
    spacings = []
    for i in range(24):
        v = ds[i]
        s = v["spacing_mm"]
        spacings.append(s)
        assert 2.0 <= s <= 4.0
        edges_mm = v["global_boxes"][:, 1] * 3.0                        # box edges (phantom voxels) -> mm
        geo = torch.exp(torch.log(edges_mm).mean(1))                    # aspect jitter keeps the geometric mean
        assert torch.allclose(geo, torch.full_like(geo, size * s), rtol=1e-4)
        assert float(edges_mm.max()) <= size * s * 1.15 ** (4 / 3) + 1e-3
    assert max(spacings) > 3.5 and min(spacings) < 2.5               # the range is used


def test_teacher_and_student_see_the_same_geometry_under_two_appearances():
    """No intensity augmentation and clean renderings: after undoing the flips, the student's crop has its edges
    where the teacher's has them, but other intensities."""
    quiet = AugmentConfig(n_global=2, n_local=0, global_size=16, max_aspect=1.0, flip_prob=0.5, gin_prob=0.0,
                          bias_field_prob=0.0, gamma_prob=0.0, contrast_prob=0.0, noise_prob=0.0, blur_prob=0.0)
    ds = views_dataset(augment=quiet, appearances={"random": 1.0}, render=RenderConfig.clean())
    n_flipped = 0
    for i in range(6):
        v = ds[i]
        for t, s, f in zip(v["teacher_global"], v["student_global"], v["student_flips"]):
            n_flipped += int(f.any())
            s = flip_volume(s, f)
            assert not torch.allclose(t, s, atol=1e-3)
            for ax in range(1, 4):
                et = (t.diff(dim=ax).abs() > 1e-6)
                es = (s.diff(dim=ax).abs() > 1e-6)
                assert float((et == es).float().mean()) > 0.98
    assert n_flipped > 0


def test_resume_is_bit_exact_with_every_stream_knob_on(data_dir, tmp_path):
    """Streamed label ensembles + 30 % real scans + two appearances + random spacing + snapshots: 2 steps straight
    == 1 step, new process, 1 more step."""
    d = json.loads(json.dumps(SMALL))
    d.update(steps=2, dense_weight=1.0, snapshot_every=1,
             stream=dict(SHAPES, real_ratio=0.3, appearances={"random": 1.0, "ct": 1.0, "mr": 1.0},
                         spacing_range_mm=[2.0, 4.0]))
    d["augment"] = dict(SMALL["augment"], n_local=1, max_aspect=1.15)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(d))
    straight, split = tmp_path / "straight", tmp_path / "split"
    _pretrain(["--config", str(cfg), "--data", str(data_dir), "--out", str(straight)])
    r1 = _pretrain(["--config", str(cfg), "--data", str(data_dir), "--out", str(split), "--set", "steps_per_run=1"])
    assert "stopped at step 1" in r1.stdout
    _pretrain(["--data", str(data_dir), "--out", str(split), "--resume"])
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    for key in ("student", "teacher", "dino_center", "ibot_center", "optimizer", "rng", "samples"):
        assert _same(a[key], b[key], key) == []
    assert a["data"]["kind"] == "phantom-stream" and a["data"]["real_ratio"] == 0.3
    for ra, rb in zip(_read_log(straight), _read_log(split)):
        assert {k: v for k, v in ra.items() if k != "sec_per_step"} == {k: v for k, v in rb.items() if k != "sec_per_step"}
    assert sorted(p.name for p in (straight / "snapshots").iterdir()) == [
        "step_000001.json", "step_000001.safetensors", "step_000002.json", "step_000002.safetensors"]
    assert not math.isnan(float(_read_log(straight)[-1]["loss"]))


def test_init_backbone_starts_from_exported_weights(tmp_path):
    """lr 0 for one step: the exported teacher equals the weights it started from, bit for bit; a mismatched
    architecture is refused."""
    import pytest
    from safetensors.torch import load_file

    from dinoreg_core.errors import DinoregError
    from dinoreg_core.ssl.train import load_config, train

    d = json.loads(json.dumps(SMALL))
    d["augment"] = dict(SMALL["augment"], n_local=0)
    d.update(steps=1, stream=dict(SHAPES, pool_size=2))
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    train(load_config(p), "stream", tmp_path / "a")                    # some trained weights to start from
    init = tmp_path / "a" / "teacher_backbone.safetensors"
    train(load_config(p, [f"init_backbone={init}", "lr=0", "min_lr=0", "seed=9"]), "stream", tmp_path / "b")
    a, b = load_file(init), load_file(tmp_path / "b" / "teacher_backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DinoregError, match="different ViT"):
        train(load_config(p, [f"init_backbone={init}", 'model_overrides={"depth": 3, "embed_dim": 48, '
                              '"num_heads": 4, "pos_grid": [8, 8, 8]}']), "stream", tmp_path / "c")
