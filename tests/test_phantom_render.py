"""Randomized-appearance rendering (dinoreg_core.data.render): a function of (label map, seed) that keeps the map's
geometry and draws a new appearance."""

import numpy as np
import pytest
import torch

from dinoreg_core.data.render import (FAMILIES, RenderConfig, check_families, gibbs, lowres, render, render_random,
                                      to_unit)
from dinoreg_core.errors import DinoregError


def blob_map(shape=(40, 36, 44), n_blobs=12, n_classes=32, seed=0) -> torch.Tensor:
    """A label map of overlapping ellipsoids on a background 0: (D,H,W) uint8 ids < n_classes."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for i in range(n_blobs):
        c = rng.uniform(4, np.array(shape) - 4)
        r = rng.uniform(3, 12, 3)
        lab[((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1] = 1 + i % (n_classes - 1)
    return torch.from_numpy(lab)


def edges(a: torch.Tensor) -> list[torch.Tensor]:
    """Where neighbours differ, along each axis: three bool arrays."""
    return [a.narrow(ax, 1, a.shape[ax] - 1) != a.narrow(ax, 0, a.shape[ax] - 1) for ax in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rendering_is_a_function_of_the_map_and_the_seed(family):
    lab = blob_map()
    a = render(lab, 7, family)
    b = render(lab.clone(), 7, family)
    c = render(lab, 8, family)
    assert a.shape == lab.shape and a.dtype == torch.float32
    assert torch.equal(a, b)                                    # same map, same seed: bit for bit
    assert not torch.equal(a, c)                                # another seed: another appearance
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.std()) > 0.05                                # not a blank image


def test_two_clean_renderings_share_every_edge_of_the_map():
    """One random intensity per class and nothing else: intensity edges are exactly the map's edges."""
    lab = blob_map(seed=3)
    cfg = RenderConfig.clean()
    for seed in (1, 2):
        img = render(lab, seed, "random", cfg=cfg)
        for e_img, e_lab in zip(edges(img), edges(lab)):
            assert int(e_lab.sum()) > 100
            assert torch.equal(e_img, e_lab)


def test_two_renderings_have_unrelated_intensities_but_the_same_geometry():
    """Default ranges: per class, the means of two renderings are nearly uncorrelated (random order, contrast
    reversals), while inside each rendering the classes stay separable (between-class variance dominates)."""
    lab = blob_map(seed=5, n_blobs=20)
    ids = [int(k) for k in torch.unique(lab)]
    corr, sep = [], []
    for s in range(12):
        a, b = render(lab, 2 * s, "random"), render(lab, 2 * s + 1, "random")
        ma = torch.stack([a[lab == k].mean() for k in ids])
        mb = torch.stack([b[lab == k].mean() for k in ids])
        corr.append(float(torch.corrcoef(torch.stack([ma, mb]))[0, 1]))
        within = torch.stack([a[lab == k].var() for k in ids]).mean()
        sep.append(float(ma.var() / within))
    assert abs(float(np.mean(corr))) < 0.3                      # 12 pairs: chance correlation ~ +-0.1
    assert float(np.median(sep)) > 2.0


def test_artefact_helpers_do_what_they_say():
    x = torch.zeros(16, 16, 16)
    x[:, :, 8:] = 1.0
    ring = gibbs(x, axis=2, keep=0.5)
    assert float(ring.max()) > 1.02 and float(ring.min()) < -0.02          # overshoot at the step: ringing
    assert torch.allclose(gibbs(x, axis=0, keep=0.5), x, atol=1e-5)        # constant along axis 0: untouched
    pv = lowres(x, (1.0, 1.0, 4.0))
    assert 0.0 < float(pv[0, 0, 7]) < 1.0 or 0.0 < float(pv[0, 0, 8]) < 1.0  # partial volume at the step
    y = to_unit(torch.arange(1001, dtype=torch.float32), (0.0, 100.0))
    assert float(y[0]) == 0.0 and float(y[-1]) == 1.0 and abs(float(y[500]) - 0.5) < 1e-6


def test_held_back_family_is_refused_for_pretraining():
    check_families({"random": 1.0, "ct": 0.5})
    with pytest.raises(DinoregError, match="held back"):
        check_families({"random": 1.0, "pd": 0.1})
    with pytest.raises(DinoregError, match="Unknown appearance"):
        check_families({"t3": 1.0})
    with pytest.raises(DinoregError, match="Unknown appearance"):
        render(blob_map(), 0, "t3")
    check_families({"pd": 1.0}, allow_held_back=True)


def test_random_family_uses_every_class_id_of_the_map():
    """Ids above the phantom's tissue count still get an intensity (the class count grows to the map's max)."""
    lab = blob_map(n_classes=60, n_blobs=40)
    img = render_random(lab, torch.Generator().manual_seed(0), RenderConfig.clean(), n_classes=32)
    for e_img, e_lab in zip(edges(img), edges(lab)):
        assert torch.equal(e_img, e_lab)
