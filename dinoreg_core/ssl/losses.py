"""The self-distillation losses: DINO (cls token), iBOT (masked patch tokens) and KoLeo (cls spread).

Notation: K prototypes; the student's and teacher's head outputs are logits over K. The teacher's logits are
turned into target distributions either by *centering* (subtract a running mean of the teacher logits, then
a sharp softmax at temperature ``teacher_temp``) or by *Sinkhorn-Knopp* (a few alternating normalisations of
``exp(logits / teacher_temp)`` so that, over the batch, every prototype gets equal mass). The student's
distribution is a softmax at ``student_temp`` (0.1). Every loss is a cross-entropy ``-sum_k t_k log s_k``.

Distributed training: only the *statistics over the batch* need other processes (the center's batch mean,
Sinkhorn-Knopp's sums, KoLeo's nearest neighbours). Those functions take the collective as an argument
(``all_reduce(tensor, op)`` = an in-place reduction over processes with ``op`` "sum" or "max",
``all_gather`` = a differentiable gather); with the defaults (None) they compute on the local batch, which is exact for one process.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

AllReduce = Callable[..., None]   # all_reduce(tensor, op="sum"|"max"), in place


def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_k t_k log softmax(s / student_temp)_k``: (M,K), (M,K) -> (M,)."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------- teacher targets

class Center(nn.Module):
    """Running mean of the teacher logits (K,), subtracted before the teacher softmax (DINO centering).

    ``center <- momentum * center + (1 - momentum) * batch_mean`` after every step. The buffer is part of
    ``state_dict()`` so checkpoints restore it.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher targets softmax((logits - center) / teacher_temp): (M,K) -> (M,K)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, batch_mean: torch.Tensor) -> None:
        """Move the center towards ``batch_mean`` (K,) (already averaged over all processes)."""
        self.center.mul_(self.momentum).add_(batch_mean.float(), alpha=1.0 - self.momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iters: int = 3,
                   weights: torch.Tensor | None = None, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp: rows sum to 1, and over the (global) batch every prototype gets mass 1/K.

    Args:
        teacher_logits: (M,K).
        teacher_temp: softmax temperature.
        n_iters: alternating normalisations.
        weights: optional (M,) sample weights (iBOT: 1 / masked tokens of the sample); default all ones.
        all_reduce: in-place reduction over processes, ``all_reduce(tensor, op)`` (None on one process).

    Returns:
        (M,K) float32, each row a probability distribution.
    """
    logits = teacher_logits.float()
    if all_reduce is None and logits.shape[0] == 0:
        return logits.clone()                                          # no samples (e.g. no masked token)
    # global max: no overflow in exp (a process without samples contributes -inf to the max)
    shift = logits.max().detach().clone() if logits.numel() else logits.new_tensor(float("-inf"))
    if all_reduce is not None:
        all_reduce(shift, "max")
    q = torch.exp((logits - shift) / teacher_temp).t()                 # (K, M)
    w = torch.ones(q.shape[1], device=q.device) if weights is None else weights.float()
    K = q.shape[0]
    n_samples = w.sum()
    total = q.sum()
    if all_reduce is not None:
        n_samples = n_samples.clone()
        all_reduce(n_samples, "sum")
        all_reduce(total, "sum")
    q = q / total
    for _ in range(n_iters):
        rows = q.sum(dim=1, keepdim=True)                              # mass per prototype
        if all_reduce is not None:
            all_reduce(rows, "sum")
        q = q / rows / K
        q = q / q.sum(dim=0, keepdim=True) * w / n_samples            # mass per sample proportional to w
    q = q / q.sum(dim=0, keepdim=True)
    return q.t()


# ----------------------------------------------------------------------------------------------------- losses

def dino_cls_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
                  student_temp: float = 0.1) -> torch.Tensor:
    """DINO loss over views: mean cross-entropy between every teacher view and every *other* student view.

    Args:
        student_logits: list of (B,K) per student view; the first ``len(teacher_probs)`` are the global views,
            in the same order as the teacher's (view i of both comes from the same crop, so that pair is skipped).
        teacher_probs: list of (B,K) targets per teacher (global) view.

    Returns:
        scalar: mean over the batch and over the (teacher view, student view) pairs.
    """
    total, n_pairs = 0.0, 0
    for ti, t in enumerate(teacher_probs):
        for si, s in enumerate(student_logits):
            if si == ti:
                continue
            total = total + cross_entropy(t, s, student_temp).mean()
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("the DINO loss needs at least two views")
    return total / n_pairs


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor,
                    n_samples: int, student_temp: float = 0.1) -> torch.Tensor:
    """iBOT masked-patch loss: cross-entropy per masked token, averaged within each sample, then over samples.

    Args:
        student_logits: (M,K) logits of the student at the masked tokens (all views' masked tokens stacked).
        teacher_probs: (M,K) teacher targets at the same tokens (the teacher saw them unmasked).
        weights: (M,) 1 / (number of masked tokens of the token's sample view).
        n_samples: number of sample views the tokens come from (masked or not; views without masked tokens
            contribute 0, as in DINOv2).

    Returns:
        scalar.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    ce = cross_entropy(teacher_probs, student_logits, student_temp)
    return (ce * weights).sum() / max(n_samples, 1)


def koleo_loss(x: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
               offset: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser: ``-mean_i log(min_{j != i} ||x_i - x_j||)`` on L2-normalised features.

    Spreads the features of a batch uniformly (the Kozachenko-Leonenko entropy estimator, as in DINOv2).

    Args:
        x: (B,C) features of this process.
        all_gather: optional differentiable gather over processes returning (B_total, C); the neighbours are
            then searched in the global batch and gradients reach the neighbour on its own process.
        offset: index of ``x[0]`` in the gathered batch (rank * B).
        eps: added to the distance before the log.

    Returns:
        scalar (0 when the global batch holds fewer than two points).
    """
    x = F.normalize(x.float(), dim=-1, eps=1e-8)
    ref = x if all_gather is None else all_gather(x)
    if ref.shape[0] < 2:
        return x.sum() * 0.0
    with torch.no_grad():
        sim = x @ ref.t()                                              # (B, B_total)
        idx = torch.arange(x.shape[0], device=x.device)
        sim[idx, idx + offset] = -2.0                                  # exclude the point itself
        nn_idx = sim.argmax(dim=1)
    dist = (x - ref[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()
