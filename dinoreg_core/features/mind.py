"""MIND-SSC: the modality independent neighbourhood descriptor with self-similarity context.

Reference: Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarities", MICCAI 2013. For every voxel, the 12 patch distances between pairs of the six
face-neighbours (at ``dilation`` voxels from the centre) that are sqrt(2) apart are computed with box
patches of side ``2*radius+1``; they are normalised by their minimum and mean and mapped through exp(-x).

The channel order equals the one of the official ConvexAdam implementation (itself chosen to match the
original C++ code), so features can be compared channel by channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..filters import box_filter
from .registry import FeatureMethod, register_feature_method

# The six face neighbours, as offsets from the centre (array axes 0,1,2).
_SIX = [(-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0)]


def _pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 neighbour pairs at squared distance 2, in the order (i > j) of the reference implementation."""
    out = []
    for i, a in enumerate(_SIX):
        for j, b in enumerate(_SIX):
            if i > j and sum((x - y) ** 2 for x, y in zip(a, b)) == 2:
                out.append((a, b))
    return out


# Final channel permutation of the reference implementation (matches the C++ descriptor layout).
_CHANNEL_ORDER = [6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3]


def _shifted(padded: torch.Tensor, offset, pad: int, shape) -> torch.Tensor:
    """Slice of a replicate-padded (B,1,D+2p,H+2p,W+2p) volume: the image at x + offset (clamped at borders)."""
    d, h, w = shape
    o0, o1, o2 = (pad + o for o in offset)
    return padded[:, :, o0:o0 + d, o1:o1 + h, o2:o2 + w]


def _box3_replicate_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In place 3^3 mean with replicate padding of (B,C,D,H,W) (``tmp``: a buffer of the same shape).

    Equals ``box_filter(x, 3, padding="replicate")`` to float rounding without allocating.
    """
    for dim in (2, 3, 4):
        n = x.shape[dim]
        tmp.copy_(x)
        if n > 1:
            x.narrow(dim, 1, n - 1).add_(tmp.narrow(dim, 0, n - 1))
            x.narrow(dim, 0, n - 1).add_(tmp.narrow(dim, 1, n - 1))
        x.narrow(dim, 0, 1).add_(tmp.narrow(dim, 0, 1))  # replicated neighbour below the first voxel
        x.narrow(dim, n - 1, 1).add_(tmp.narrow(dim, n - 1, 1))  # and above the last one
    return x.mul_(1.0 / 27.0)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor of a 3D image.

    Args:
        image: (B,1,D,H,W) float tensor (any intensity scale; the descriptor is normalised per voxel).
        radius: half side of the box patch in voxels (patch side 2*radius+1).
        dilation: distance in voxels of the six neighbours from the centre.

    Returns:
        (B,12,D,H,W) float32 descriptor in (0,1], same device as ``image``.

    Memory: two (B,12,D,H,W) float32 buffers (the descriptor and one scratch copy for the box filter); every
    step after the squared differences works in place.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects a (B,1,D,H,W) tensor, got {tuple(image.shape)}")
    x = image.float()
    shape = x.shape[2:]
    padded = F.pad(x, (dilation,) * 6, mode="replicate")
    pairs = _pairs()
    sq = torch.empty((x.shape[0], len(pairs)) + tuple(shape), device=x.device, dtype=torch.float32)
    for c, k in enumerate(_CHANNEL_ORDER):  # written directly in the reference's channel order
        a, b = pairs[k]
        sa = _shifted(padded, tuple(dilation * v for v in a), dilation, shape)
        sb = _shifted(padded, tuple(dilation * v for v in b), dilation, shape)
        torch.sub(sa, sb, out=sq[:, c:c + 1])
    del padded
    sq.square_()  # (B,12,D,H,W) squared differences of the two shifted copies
    if radius == 1:
        ssd = _box3_replicate_(sq, torch.empty_like(sq))
    else:
        ssd = box_filter(sq, 2 * radius + 1, padding="replicate")
    del sq
    ssd -= ssd.min(dim=1, keepdim=True).values
    var = ssd.mean(dim=1, keepdim=True)
    gmean = var.mean().item()
    var = var.clamp_(gmean * 1e-3, gmean * 1e3)
    return ssd.div_(var).neg_().exp_()


def _extract(image: torch.Tensor, *, modality: str = "ct", device=None, options=None) -> torch.Tensor:
    opts = options or {}
    img = image.to(device or image.device)
    return mind_ssc(img, int(opts.get("mind_r", 1)), int(opts.get("mind_d", 2)))


register_feature_method(FeatureMethod(
    "mind", _extract, joint_pca=False,
    description="MIND-SSC (12 channels, full resolution; options mind_r=1, mind_d=2)"))
