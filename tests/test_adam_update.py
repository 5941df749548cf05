"""The written-out Adam update equals torch.optim.Adam bit for bit, and a registration never imports torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from dinoreg_core.registration.adam_update import AdamUpdate


@pytest.mark.parametrize("lr", [1.0, 0.05])
def test_adam_update_equals_torch_adam(lr):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 5, 6, 7), (3, 3), (3,)]
    ours = [torch.randn(s, generator=gen) for s in shapes]
    start = [p.clone() for p in ours]
    ref = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = torch.optim.Adam(ref, lr=lr)
    upd = AdamUpdate(ours, lr=lr)
    for it in range(60):
        grads = [torch.randn(s, generator=gen) * (10.0 ** (it % 5 - 2)) for s in shapes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        upd.step(grads)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b.detach())
    assert upd.steps == 60
    # the update did something: every tensor moved away from its start
    assert all(float((a - s).abs().max()) > 0.1 for a, s in zip(ours, start))


def test_adam_update_rejects_bad_lr():
    with pytest.raises(ValueError, match="learning rate"):
        AdamUpdate([torch.zeros(2)], lr=0.0)


def test_registration_does_not_import_dynamo():
    code = (
        "import sys, torch\n"
        "from dinoreg_core.registration.convex_adam import ConvexAdamConfig, convex_adam\n"
        "g = torch.Generator().manual_seed(0)\n"
        "f = torch.rand(1, 2, 12, 12, 12, generator=g); m = torch.roll(f, 1, 2)\n"
        "for k in ('fused', 'autograd'):\n"
        "    d = convex_adam(f, m, ConvexAdamConfig(iterations=3, adam_kernel=k))\n"
        "    assert d.shape == (1, 3, 12, 12, 12)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "False"
