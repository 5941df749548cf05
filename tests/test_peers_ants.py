"""ANTs peer: the conversion of ANTs transforms into our displacement convention, and a real ANTs registration.

Both need antspyx (in this Python, $DINOREG_ANTS_PYTHON or .venv-peers) and skip with the reason otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoreg_core import io
from dinoreg_core.errors import DinoregError
from dinoreg_core.registration.warp import warp


@pytest.fixture(scope="module")
def ants_peer():
    from dinoreg_core.peers import ants as peer

    try:
        peer.ants_python()
    except DinoregError as e:
        pytest.skip(f"antspyx not available: {e}")
    return peer


def _smooth_image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.avg_pool3d(torch.rand((1, 1, *shape), generator=g), 7, 1, 3)
    return ((img - img.min()) / (img.max() - img.min()))[0, 0].numpy()


def _oblique_affine():
    """An anisotropic RAS grid, rotated 20 degrees about the superior axis, with an offset origin."""
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([2.0, 3.0, 2.5])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    return aff


def test_known_translation_is_converted_to_fixed_voxels(ants_peer, tmp_path):
    """An ITK translation of t (LPS mm) must become u = (F A)^-1 t voxels everywhere, and warping with u must
    reproduce ANTs' own resampling through the same transform."""
    aff = _oblique_affine()
    img = _smooth_image((30, 26, 24))
    vol = io.Volume(img, aff)
    t_lps = np.array([4.0, -6.0, 5.0])
    tfile = tmp_path / "translation.txt"
    tfile.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                     f"Parameters: 1 0 0 0 1 0 0 0 1 {t_lps[0]} {t_lps[1]} {t_lps[2]}\nFixedParameters: 0 0 0\n")
    u, ants_warped = ants_peer.transforms_to_displacement(vol, [tfile])
    assert u.shape == (1, 3, 30, 26, 24)
    expected = np.linalg.solve(np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :3], t_lps)  # LPS mm -> fixed voxels
    assert abs(expected).max() > 1.5  # a real shift, several voxels along some axis
    np.testing.assert_allclose(u[0].reshape(3, -1).mean(1).numpy(), expected, atol=1e-4)
    assert float(u[0].reshape(3, -1).std(1).max()) < 1e-4  # the same vector everywhere
    ours = warp(torch.from_numpy(img)[None, None], u)[0, 0].numpy()
    inner = (slice(6, -6),) * 3  # ANTs fills outside the moving image with 0, we replicate the border
    assert np.abs(ours - ants_warped)[inner].max() < 1e-4


def test_ants_registration_recovers_a_translation(ants_peer):
    """A real (small, cheap) ANTs affine + SyN run: the field in our convention is the known shift."""
    shape = (40, 36, 32)
    img = torch.from_numpy(_smooth_image(shape, seed=1) * 2000 - 1000)[None, None]
    shift = torch.zeros(1, 3, *shape)
    shift[0, 0], shift[0, 1], shift[0, 2] = 2.0, -1.5, 1.0
    mov = warp(img, -shift)  # mov(y) = img(y - s): registering needs u = +s
    aff = np.diag([2.0, 2.5, 3.0, 1.0])
    out = ants_peer.run(io.Volume(img[0, 0].numpy(), aff), io.Volume(mov[0, 0].numpy(), aff),
                             fixed_modality="ct", moving_modality="ct", options={"reg_iterations": (20, 10)})
    assert out.displacement.shape == (1, 3, *shape)
    centre = out.displacement[0, :, 12:-12, 12:-12, 10:-10].mean(dim=(1, 2, 3))
    torch.testing.assert_close(centre, torch.tensor([2.0, -1.5, 1.0]), atol=0.25, rtol=0)
    assert out.settings["metric"] == "CC" and out.settings["reg_iterations"] == [20, 10]
