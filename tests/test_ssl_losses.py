"""DINO / iBOT / KoLeo losses, centering, Sinkhorn-Knopp and the projection head, against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinoreg_core.ssl.heads import DINOHead, cancel_last_layer_grads
from dinoreg_core.ssl.losses import (Center, cross_entropy, dino_cls_loss, ibot_patch_loss, koleo_loss,
                                     sinkhorn_knopp)


def _logits_for(p: torch.Tensor, temp: float) -> torch.Tensor:
    """Student logits whose softmax at ``temp`` is exactly ``p``."""
    return temp * torch.log(p)


def test_dino_loss_of_identical_distributions_is_their_entropy():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    h = -(p * p.log()).sum(-1).mean()                  # 1.0397 and 0.8018 nats -> 0.9208
    assert float(h) == pytest.approx(0.5 * (1.5 * math.log(2) + (-(0.7 * math.log(0.7) + 0.2 * math.log(0.2)
                                                                 + 0.1 * math.log(0.1)))), abs=1e-6)
    s = _logits_for(p, 0.1)
    # two teacher views and two student views, all the same distribution: every cross pair costs H(p)
    loss = dino_cls_loss([s, s], [p, p], student_temp=0.1)
    assert float(loss) == pytest.approx(float(h), abs=1e-5)


def test_dino_loss_skips_the_same_view_pair_and_averages_pairs():
    a = torch.tensor([[0.9, 0.1]])
    b = torch.tensor([[0.2, 0.8]])
    s_a, s_b, s_loc = _logits_for(a, 0.1), _logits_for(b, 0.1), _logits_for(torch.tensor([[0.5, 0.5]]), 0.1)
    # teacher views (a, b); student views (a, b, local uniform)
    # pairs: t0 with s1 and s_loc, t1 with s0 and s_loc -> 4 pairs
    ce = lambda t, s: -(t * s.log()).sum()  # noqa: E731
    u = torch.tensor([[0.5, 0.5]])
    expected = (ce(a, b) + ce(a, u) + ce(b, a) + ce(b, u)) / 4
    loss = dino_cls_loss([s_a, s_b, s_loc], [a, b], student_temp=0.1)
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    assert float(expected) == pytest.approx((-(0.9 * math.log(0.2) + 0.1 * math.log(0.8)) + math.log(2)
                                             - (0.2 * math.log(0.9) + 0.8 * math.log(0.1)) + math.log(2)) / 4, abs=1e-6)


def test_center_softmax_and_ema_update():
    c = Center(3, momentum=0.9)
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = c.probs(logits, 0.5)                                # center 0: softmax(2 * logits)
    e2 = math.exp(2.0)
    assert p[0].tolist() == pytest.approx([e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], abs=1e-6)
    c.update(logits.mean(0))                                # 0.9 * 0 + 0.1 * [0.5, 0.5, 0]
    assert c.center.tolist() == pytest.approx([0.05, 0.05, 0.0], abs=1e-7)
    c.update(torch.tensor([1.0, 0.0, 0.0]))                 # 0.9 * [0.05, 0.05, 0] + 0.1 * [1, 0, 0]
    assert c.center.tolist() == pytest.approx([0.145, 0.045, 0.0], abs=1e-7)
    # subtracting the center shifts the logits before the softmax
    q = c.probs(torch.tensor([[0.145, 0.045, 0.0]]), 1.0)
    assert q[0].tolist() == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert "center" in c.state_dict()


def test_sinkhorn_knopp_balances_prototypes():
    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 0.3 + torch.linspace(0, 1, 8)    # prototype 7 favoured by every sample
    q = sinkhorn_knopp(logits, teacher_temp=0.1, n_iters=50)
    assert q.sum(1).tolist() == pytest.approx([1.0] * 64, abs=1e-5)   # each row a distribution
    assert q.sum(0).tolist() == pytest.approx([64 / 8] * 8, rel=1e-3)  # equal mass per prototype
    plain = F.softmax(logits / 0.1, dim=-1).sum(0)
    assert float(plain[7] / plain[0]) > 5.0                            # unbalanced before
    # a 2x2 case by hand: symmetric input stays symmetric; row order is preserved
    q2 = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), teacher_temp=1.0, n_iters=3)
    e = math.e
    assert q2[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-6)


def test_sinkhorn_knopp_of_no_samples_is_empty():
    # a step where no global view was masked gives the iBOT targets zero rows (that crashed a run once)
    q = sinkhorn_knopp(torch.zeros(0, 16), teacher_temp=0.07, weights=torch.zeros(0))
    assert q.shape == (0, 16)


def test_sinkhorn_knopp_with_a_fake_all_reduce_matches_the_whole_batch():
    """Two threads play two processes holding half the batch each; their all_reduce combines both halves."""
    import threading

    torch.manual_seed(1)
    logits = torch.randn(10, 5)
    whole = sinkhorn_knopp(logits, 0.2)
    halves = [logits[:5], logits[5:]]
    barrier = threading.Barrier(2)
    slots, results = [None, None], [None, None]

    def worker(r):
        def all_reduce(t, op="sum"):
            slots[r] = t.clone()
            barrier.wait()
            other = slots[1 - r]
            barrier.wait()
            t.copy_(torch.maximum(t, other) if op == "max" else t + other)
        results[r] = sinkhorn_knopp(halves[r], 0.2, all_reduce=all_reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(results), whole, atol=1e-6)
    assert not torch.allclose(sinkhorn_knopp(halves[0], 0.2), whole[:5], atol=1e-3)   # the collective matters


def test_ibot_loss_weights_tokens_per_view_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    s = _logits_for(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.25, 0.75]]), 0.1)
    # tokens 0,1 belong to view 0 (2 masked), token 2 to view 1 (1 masked); 3 views in total (one unmasked)
    w = torch.tensor([0.5, 0.5, 1.0])
    loss = ibot_patch_loss(s, t, w, n_samples=3, student_temp=0.1)
    expected = (0.5 * math.log(2) + 0.5 * math.log(2) + (-math.log(0.75))) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    empty = ibot_patch_loss(s[:0], t[:0], w[:0], n_samples=3)
    assert float(empty) == 0.0


def test_cross_entropy_matches_formula():
    t = torch.tensor([[0.3, 0.7]])
    s = torch.tensor([[0.2, -0.1]])
    ls = F.log_softmax(s / 0.1, -1)
    assert float(cross_entropy(t, s, 0.1)[0]) == pytest.approx(float(-(t * ls).sum()), abs=1e-6)


def test_koleo_on_known_points():
    # four points on the unit circle 90 degrees apart: every nearest neighbour is sqrt(2) away
    sq = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert float(koleo_loss(sq)) == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)
    # (1,0), (cos 10deg, sin 10deg), (-1,0): NN distances 2 sin 5deg, 2 sin 5deg, 2 sin 85deg
    a = math.radians(10.0)
    pts = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [-1.0, 0.0]]) * 3.0   # scale is normalised away
    d_close, d_far = 2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(85))
    expected = -(2 * math.log(d_close) + math.log(d_far)) / 3
    assert float(koleo_loss(pts)) == pytest.approx(expected, abs=1e-5)
    assert float(koleo_loss(pts[:1])) == 0.0                                         # one point: no neighbour


def test_koleo_gradient_spreads_close_points():
    a = math.radians(10.0)
    pts = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(pts).backward()
    moved = F.normalize(pts.detach() - 0.01 * pts.grad, dim=-1)
    before = float((F.normalize(pts.detach(), dim=-1)[0] - F.normalize(pts.detach(), dim=-1)[1]).norm())
    after = float((moved[0] - moved[1]).norm())
    assert after > before + 1e-3


def test_koleo_gather_path_equals_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    xn = F.normalize(x, dim=-1)                    # what the other process would contribute to the gather
    whole = koleo_loss(x)
    # process 1 of 2 holds rows 3..5, process 0 rows 0..2; the gather returns all (normalised) rows
    part = koleo_loss(x[3:], all_gather=lambda t: torch.cat([xn[:3], t]), offset=3)
    first = koleo_loss(x[:3], all_gather=lambda t: torch.cat([t, xn[3:]]), offset=0)
    assert float((part + first) / 2) == pytest.approx(float(whole), abs=1e-6)


def test_head_outputs_cosine_logits_and_last_layer_freeze():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, n_layers=3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        logits = head(x)
        assert logits.shape == (5, 32)
        assert float(logits.abs().max()) <= 1.0 + 1e-5          # cosine similarities
        # rescaling a prototype row does not change the output (weight normalisation with gain 1)
        head.prototypes[3].mul_(7.0)
        assert torch.allclose(head(x), logits, atol=1e-6)
    head(x).sum().backward()
    assert head.prototypes.grad is not None and float(head.prototypes.grad.abs().sum()) > 0
    cancel_last_layer_grads(head)
    assert float(head.prototypes.grad.abs().sum()) == 0.0
    assert float(head.mlp[0].weight.grad.abs().sum()) > 0
