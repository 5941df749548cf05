"""The student / teacher network of the pretraining: a 3D ViT backbone with a DINO head (and an iBOT head).

Teacher and student are two instances of :class:`SSLNet` (the teacher an exponential moving average of the
student). Views are stacked *view-major*: G global views of a batch of B samples form a (G*B, 1, S, S, S)
tensor whose rows ``v*B .. v*B+B-1`` are view ``v`` of every sample, so ``tensor.chunk(G)`` splits it by view.

Masks and flips (see :mod:`dinoreg_core.ssl.masking`, :mod:`dinoreg_core.data.augment`):

* ``masks`` (G*B, N) bool are given in the *teacher's* token frame (the unflipped crop).
* The student's global view was flipped by ``flips`` (G*B, 3); the mask is flipped into the student's frame
  before the backbone, and the student's patch tokens are flipped back into the teacher's frame afterwards,
  so ``tokens[masks]`` of student and teacher refer to the same anatomical patch, in the same order.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..data.augment import flip_tokens
from .heads import DINOHead


class SSLNet(nn.Module):
    """Backbone + DINO cls head + iBOT patch head (the same head object when not separate) + optional dense
    projector for the cross-view correspondence loss (:mod:`dinoreg_core.ssl.dense`)."""

    def __init__(self, backbone: nn.Module, dino_head: DINOHead, ibot_head: DINOHead | None = None,
                 dense_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head          # None: the DINO head also serves the patch tokens
        self.dense_head = dense_head        # None: no correspondence loss

    @property
    def patch_head(self) -> DINOHead:
        return self.dino_head if self.ibot_head is None else self.ibot_head

    def heads(self) -> list[DINOHead]:
        return [self.dino_head] + ([self.ibot_head] if self.ibot_head is not None else [])

    def forward_teacher(self, views: torch.Tensor, masks: torch.Tensor, visible: bool = False) -> dict:
        """Teacher pass over the clean global views.

        Args:
            views: (G*B, 1, S, S, S).
            masks: (G*B, N) bool, teacher frame.
            visible: also return the head logits at the unmasked tokens.

        Returns:
            dict: "cls" (G*B, C) backbone cls, "cls_logits" (G*B, K), "patch_tokens" (G*B, N, C),
            "masked_logits" (M, K_patch) head logits at the M masked tokens (raster order within each view), and
            with ``visible`` "visible_logits" (G*B*N - M, K_patch) at the other tokens (same order).
        """
        out = self.backbone(views)
        patches = out["patch_tokens"]
        res = {"cls": out["cls"], "cls_logits": self.dino_head(out["cls"]), "patch_tokens": patches,
               "masked_logits": self.patch_head(patches[masks])}
        if visible:
            res["visible_logits"] = self.patch_head(patches[~masks])
        return res

    def forward(self, views: torch.Tensor, masks: torch.Tensor, flips: torch.Tensor,
                local_views: torch.Tensor | None = None, visible: bool = False) -> dict:
        """Student pass over the augmented, flipped global views (masked) and the local views.

        Args:
            views: (G*B, 1, S, S, S) student global views (flipped by ``flips``).
            masks: (G*B, N) bool, teacher frame.
            flips: (G*B, 3) bool flips applied to ``views``.
            local_views: (L*B, 1, s, s, s) or None.
            visible: also return the head logits at the unmasked tokens.

        Returns:
            dict: "cls" (G*B, C) backbone cls of the global views, "cls_logits" (G*B, K),
            "local_cls_logits" (L*B, K) (empty when no local views), "patch_tokens" (G*B, N, C) flipped back into
            the teacher's frame, "masked_logits" (M, K_patch) at the masked tokens (teacher frame and order), and
            with ``visible`` "visible_logits" (G*B*N - M, K_patch) at the unmasked tokens (teacher frame and order).
        """
        grid = self._grid(views)
        out = self.backbone(views, masks=flip_tokens(masks, grid, flips))
        patches = flip_tokens(out["patch_tokens"], grid, flips)        # back into the teacher's frame
        res = {"cls": out["cls"], "cls_logits": self.dino_head(out["cls"]), "patch_tokens": patches,
               "masked_logits": self.patch_head(patches[masks])}
        if visible:
            res["visible_logits"] = self.patch_head(patches[~masks])
        if local_views is not None and local_views.shape[0] > 0:
            res["local_cls_logits"] = self.dino_head(self.backbone(local_views)["cls"])
        else:
            res["local_cls_logits"] = res["cls_logits"][:0]
        return res

    def _grid(self, views: torch.Tensor) -> tuple[int, int, int]:
        p = self.backbone.cfg.patch_size
        return tuple(max(1, -(-int(s) // p)) for s in views.shape[2:])
