"""The Adam update, written out: the same arithmetic as ``torch.optim.Adam`` (no weight decay, no amsgrad).

Why not ``torch.optim.Adam`` itself: constructing the first torch optimizer in a process imports
``torch._dynamo`` (about 2.3 s on the 2-core CPU this project measures on), which a one-pair ``dinoreg register``
pays in full; the registration only needs the plain update. The order of operations follows torch's single-tensor
path (``torch/optim/adam.py``, ``_single_tensor_adam``), so the iterates are equal to torch's bit for bit on CPU
(``tests/test_adam_update.py`` checks it).
"""

from __future__ import annotations

import torch

DEFAULT_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults (and the official ConvexAdam's)
DEFAULT_EPS = 1e-8


class AdamUpdate:
    """Adam on a list of tensors, updated in place from gradients handed to :meth:`step`.

    Args:
        params: tensors of any shape, updated in place (no autograd needed; ``requires_grad`` ones are updated
            under ``torch.no_grad``).
        lr: step size (in the units of the parameters; e.g. Adam-grid voxels for ConvexAdam).
        betas: decay of the first and second moment estimates.
        eps: added to the bias-corrected root of the second moment.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = DEFAULT_BETAS,
                 eps: float = DEFAULT_EPS):
        if not lr > 0:
            raise ValueError(f"Adam learning rate {lr!r} must be > 0")
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """One update; ``grads[i]`` has the shape of ``params[i]``."""
        beta1, beta2 = self.betas
        self.steps += 1
        step = float(self.steps)  # torch's float32 step counter holds the same value (exact below 2**24)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        step_size = self.lr / bias_correction1
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)
