"""Official ConvexAdam peer: its field, in our convention, is close to our ConvexAdam on the same MIND features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoreg_core import io
from dinoreg_core.features.mind import mind_ssc
from dinoreg_core.registration import convex_adam as CA
from dinoreg_core.registration import warp as W
from synthetic_images import blobs

pytestmark = pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior:UserWarning")

pytest.importorskip("convexAdam.convex_adam_MIND", reason="official convexadam package not installed "
                    "(pip install convexadam==0.2.0, the [peers] extra)")


@pytest.mark.parametrize("shape", [(48, 42, 36), (47, 40, 37)])  # a multiple of grid_sp 6, and not
def test_official_field_matches_ours_and_recovers_the_warp(shape):
    from dinoreg_core.peers import get_registration_method

    img = blobs(shape, seed=2, n=25)
    v = W.smooth_random_field(shape, max_disp=3.0, control_spacing=8, seed=4)
    mov = W.warp(img, v)
    truth = W.invert(v)
    # the registry path normalises MR intensities by percentiles; give it MR-like values already in [0,1] scale
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    method = get_registration_method("convexadam_official")
    assert method.check({}) is None
    out = method.run(io.Volume(img[0, 0].numpy(), aff), io.Volume(mov[0, 0].numpy(), aff),
                          fixed_modality="mr", moving_modality="mr")
    from dinoreg_core.preprocess import normalize_intensity

    fn = torch.from_numpy(normalize_intensity(img[0, 0].numpy(), "mr"))[None, None]
    mn = torch.from_numpy(normalize_intensity(mov[0, 0].numpy(), "mr"))[None, None]
    ours = CA.convex_adam(mind_ssc(fn, 1, 2), mind_ssc(mn, 1, 2), CA.ConvexAdamConfig())
    ref = out.displacement
    assert ref.shape == (1, 3, *shape) and ref.dtype == torch.float32
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    mad = (ref - ours).abs().mean().item()
    assert mad < 0.06, f"official vs ours: mean absolute difference {mad:.3f} voxels"
    before = truth[inner].norm(dim=1).mean()
    assert (ref - truth)[inner].norm(dim=1).mean() < 0.7 * before  # it registers, in our direction and axis order
    assert out.settings["grid_sp"] == 6 and out.settings["selected_niter"] == 80
