"""The DINO / iBOT projection head.

``DINOHead``: an MLP (``n_layers`` linear layers, GELU between them) down to a ``bottleneck_dim`` embedding,
L2-normalised, followed by a weight-normalised linear layer without bias onto ``out_dim`` prototypes
(the "last layer"). The weight normalisation has its gain fixed to 1, as in DINO: each prototype row is
used as a unit vector, so the logits are cosine similarities between the embedding and the prototypes.

The last layer is frozen for the first steps of training (``freeze_last_layer_steps`` in the training config,
the DINO "first epoch"): :func:`cancel_last_layer_grads` zeroes its gradient, which keeps it from moving while
the rest of the network settles.

Shapes: x (..., in_dim) -> logits (..., out_dim).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DINOHead(nn.Module):
    """MLP + L2-normalised bottleneck + weight-normalised prototypes (see the module docstring)."""

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # prototype directions (out_dim, bottleneck_dim); used row-normalised (weight norm with gain 1)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.prototypes.shape[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding (..., bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., out_dim): cosine similarity of the embedding with each prototype."""
        z = self.embed(x)
        return F.linear(z, F.normalize(self.prototypes, dim=-1, eps=1e-6).to(z.dtype))


def last_layer_parameters(head: DINOHead) -> list[nn.Parameter]:
    """The parameters frozen at the start of training (the prototypes)."""
    return [head.prototypes]


def cancel_last_layer_grads(head: DINOHead) -> None:
    """Zero the prototype gradient (call between ``backward()`` and ``optimizer.step()``)."""
    for p in last_layer_parameters(head):
        if p.grad is not None:
            p.grad.zero_()
