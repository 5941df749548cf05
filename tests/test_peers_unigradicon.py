"""uniGradICON peer: the conversion of its ITK transform into our displacement convention.

Runs in the Python that has unigradicon and itk (``$DINOREG_UNIGRADICON_PYTHON``, this Python or ``.venv-peers``);
skips with the reason otherwise. The network itself is not run here (its weights cannot be downloaded in tests): the
worker's conversion functions get an ITK translation and a composite (displacement field + translation) transform,
exactly the kind of transform ``register_pair`` returns.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from dinoreg_core.errors import DinoregError
from dinoreg_core.registration.warp import warp

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import unigradicon_worker as w
    import itk
    aff = np.array(json.loads(sys.argv[2]))
    rng = np.random.default_rng(0)
    img = rng.random((24, 20, 16)).astype(np.float32)
    fi = w.to_itk_image(img, aff)
    tt = itk.TranslationTransform[itk.D, 3].New()
    tt.SetOffset([4.0, -6.0, 5.0])
    u_t = w.transform_to_voxel_displacement(tt, fi, aff)
    field = np.zeros((16, 20, 24, 3))  # ITK (k,j,i) order, LPS mm: a smooth bump
    k, j, i = np.meshgrid(np.arange(16), np.arange(20), np.arange(24), indexing="ij")
    bump = np.exp(-((i - 12) ** 2 + (j - 10) ** 2 + (k - 8) ** 2) / 30.0)
    field[..., 0], field[..., 1], field[..., 2] = 5 * bump, -4 * bump, 3 * bump
    fimg = itk.image_from_array(field, is_vector=True)
    fimg.SetSpacing(fi.GetSpacing()); fimg.SetOrigin(fi.GetOrigin()); fimg.SetDirection(fi.GetDirection())
    dt = itk.DisplacementFieldTransform[itk.D, 3].New()
    dt.SetDisplacementField(fimg)
    comp = itk.CompositeTransform[itk.D, 3].New()
    comp.PrependTransform(tt)
    comp.PrependTransform(dt)
    u_c = w.transform_to_voxel_displacement(comp, fi, aff)
    warped = itk.resample_image_filter(fi, transform=comp, use_reference_image=True, reference_image=fi)
    warped = np.asarray(itk.array_from_image(warped), np.float32).transpose(2, 1, 0)
    print(json.dumps({"img": img.tolist(), "u_t": u_t.tolist(), "u_c": u_c.tolist(), "warped": warped.tolist()}))
""")


@pytest.fixture(scope="module")
def ugi_python():
    from dinoreg_core.peers import unigradicon as peer

    try:
        return peer.unigradicon_python(), peer.WORKER.parent
    except DinoregError as e:
        pytest.skip(f"unigradicon not available: {e}")


def test_itk_transform_conversion(ugi_python):
    python, folder = ugi_python
    a = np.deg2rad(15.0)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]]) @ np.diag([2, 3, 2.5])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    r = subprocess.run([python, "-c", SCRIPT, str(folder), json.dumps(aff.tolist())], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = {k: np.array(v, dtype=np.float32) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    expected = np.linalg.solve(np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :3], [4.0, -6.0, 5.0])
    np.testing.assert_allclose(d["u_t"].reshape(3, -1).mean(1), expected, atol=1e-4)
    u = torch.from_numpy(d["u_c"])[None]
    assert u.abs().max() > 1.5
    ours = warp(torch.from_numpy(d["img"])[None, None], u)[0, 0].numpy()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in d["img"].shape], indexing="ij"))
    p = grid + d["u_c"]
    inside = np.all([(p[c] >= 0) & (p[c] <= d["img"].shape[c] - 1) for c in range(3)], axis=0)
    assert inside.mean() > 0.5
    assert np.abs(ours - d["warped"])[inside].max() < 1e-4  # ITK zero-fills outside the image, we replicate
