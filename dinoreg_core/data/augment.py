"""3D views for DINO/iBOT pretraining: random-resized crops, intensity augmentation, GIN, flips and flip-back.

All functions work on one volume ``x`` of shape (C,D,H,W) float32 with intensities in [0,1] (the output of
:func:`dinoreg_core.preprocess.normalize_intensity`), and draw every random number from the
``torch.Generator`` passed in, so a view is a pure function of the generator's seed (this is what makes
resumed and multi-process training exact).

Views of one sample (:func:`make_views`):

* ``n_global`` global crops (random-resized, volume fraction in ``global_scale``, resampled to
  ``global_size``^3; or, when ``global_zoom`` is set, a box of ``global_size * zoom`` voxels per edge with the
  zoom drawn log-uniformly in ``global_zoom``, so the crop keeps about the native voxel size: what registration
  features at a fixed resolution need). The *teacher* sees each global crop as it is; the *student* sees the same crop with
  intensity augmentation (bias field, gamma, contrast, noise, blur), GIN, and random flips along each axis.
  Because the flips are recorded, the student's patch tokens can be flipped back (:func:`flip_tokens`) onto
  the teacher's token grid, so the iBOT targets of the dense features stay aligned.
* ``n_local`` local crops (smaller volume fraction ``local_scale``, or ``local_size * zoom`` voxels with the zoom
  in ``local_zoom``, resampled to ``local_size``^3), seen by the student only, with intensity augmentation, GIN and flips. Their token grid is smaller than the
  position-embedding grid; the ViT resamples its position embedding to it.

GIN (global intensity non-linear augmentation, Ouyang et al. 2022): a freshly drawn, shallow random conv net
(``gin_layers`` 3D convolutions of kernel 1 or 3 with ``gin_channels`` channels and leaky ReLUs) remaps the
intensities; its output, rescaled to the input's mean and standard deviation, is blended with the input with
a random weight. Random weights of either sign can invert or re-order tissue contrasts, which teaches the
features to ignore the CT/MR intensity mapping.

Intensity remapping (``remap_prob``; an addition of ours, off by default): a random look-up curve through
``remap_knots`` evenly spaced control points with values uniform in [0,1] (sorted, so monotone, with
probability ``remap_monotone_prob``) replaces every intensity. Unlike GIN's blend it changes *which* tissues are
bright: fat can become dark and fluid bright, as between CT and T1/T2 MR. Edges between tissues stay where they
are, so the student still has the structure to recognise the anatomy by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """How the views of one sample are made (sizes in voxels; probabilities per view)."""

    n_global: int = 2                        # global crops (teacher + student)
    n_local: int = 8                         # local crops (student only)
    global_size: int = 128                   # edge of the resampled global crop (the paper: 128^3)
    local_size: int = 48                     # edge of the resampled local crop
    global_scale: tuple = (0.35, 1.0)        # fraction of the volume's voxels covered by a global crop
    local_scale: tuple = (0.05, 0.35)        # fraction covered by a local crop
    global_zoom: tuple | None = None         # if set: crop edge = global_size * zoom voxels, zoom log-uniform here
    local_zoom: tuple | None = None          # if set: crop edge = local_size * zoom voxels
    max_aspect: float = 4 / 3                # crop edge ratios drawn log-uniformly in [1/max_aspect, max_aspect]
    region_size: int | None = None           # if set: every crop of a sample lies in one random box of this edge
                                             # (voxels), so the views overlap as the crops of one image do in DINO
    flip_prob: float = 0.5                   # per axis, student views
    bias_field_prob: float = 0.3             # smooth multiplicative field exp(N(0, strength)) on a 4^3 grid
    bias_field_strength: float = 0.3
    gamma_prob: float = 0.3                  # x ** gamma, log(gamma) uniform in +-gamma_log_range
    gamma_log_range: float = 0.35
    contrast_prob: float = 0.3               # (x - mean) * c + mean, c uniform in contrast_range
    contrast_range: tuple = (0.75, 1.25)
    noise_prob: float = 0.2                  # Gaussian noise, std uniform in [0, noise_std_max]
    noise_std_max: float = 0.05
    blur_prob: float = 0.2                   # Gaussian blur, sigma uniform in [0.25, blur_sigma_max] voxels
    blur_sigma_max: float = 1.0
    gin_prob: float = 0.5                    # GIN random conv net remapping
    gin_layers: int = 4
    gin_channels: int = 2
    remap_prob: float = 0.0                  # random intensity look-up curve (see module docstring; 0: off)
    remap_knots: int = 6                     # control points of the curve, evenly spaced over [0,1]
    remap_monotone_prob: float = 0.25        # probability that the curve is sorted (contrast order kept)
    partner_prob: float = 0.0                # with a co-registered scan of another modality (a "partner"): the
                                             # probability that a student view shows the partner where the
                                             # teacher shows the scan (0: partners unused; see make_views)

    def __post_init__(self):
        self.global_scale = tuple(float(v) for v in self.global_scale)
        self.local_scale = tuple(float(v) for v in self.local_scale)
        self.contrast_range = tuple(float(v) for v in self.contrast_range)
        if self.global_zoom is not None:
            self.global_zoom = tuple(float(v) for v in self.global_zoom)
        if self.local_zoom is not None:
            self.local_zoom = tuple(float(v) for v in self.local_zoom)
        if isinstance(self.region_size, str) and self.region_size.strip().lower() in ("", "none", "null"):
            self.region_size = None
        if self.region_size is not None:
            self.region_size = int(self.region_size)
            if self.region_size < 1:
                raise ValueError(f"region_size must be a positive number of voxels, got {self.region_size}")


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


# ------------------------------------------------------------------------------------------------------ crops

def random_crop_box(shape: tuple[int, int, int], scale: tuple[float, float], max_aspect: float,
                    g: torch.Generator) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A random box inside a (D,H,W) volume covering a fraction in ``scale`` of its voxels.

    Returns (start, size): per axis, in voxels (floats; start >= 0, start + size <= shape).
    """
    frac = _u(g, *scale)
    la = math.log(max_aspect)
    logs = [_u(g, -la, la) for _ in range(3)]
    m = sum(logs) / 3.0
    size = [min(1.0, frac ** (1.0 / 3.0) * math.exp(l - m)) * n for l, n in zip(logs, shape)]
    start = [_u(g) * (n - s) for n, s in zip(shape, size)]
    return tuple(start), tuple(size)


def random_zoom_box(shape: tuple[int, int, int], out_size: int, zoom: tuple[float, float], max_aspect: float,
                    g: torch.Generator) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A random box of about ``out_size * z`` voxels per edge, z log-uniform in ``zoom`` (edge ratios jittered by
    ``max_aspect``), clipped to the (D,H,W) volume. Returns (start, size) in voxels."""
    z = math.exp(_u(g, math.log(zoom[0]), math.log(zoom[1])))
    la = math.log(max_aspect)
    logs = [_u(g, -la, la) for _ in range(3)]
    m = sum(logs) / 3.0
    size = [min(float(n), out_size * z * math.exp(l - m)) for l, n in zip(logs, shape)]
    start = [_u(g) * (n - s) for n, s in zip(shape, size)]
    return tuple(start), tuple(size)


def region_box(shape: tuple[int, int, int], region_size: int | None,
               g: torch.Generator) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The box every crop of one sample is drawn from: (region shape, its start), in voxels of the (D,H,W) volume.

    ``region_size=None`` gives the whole volume (no random draw). Otherwise an edge of ``region_size`` voxels per
    axis (clipped to the volume) at a uniformly random position, as DINO's views all come from one image: the
    global crops then overlap and share their anatomy, which makes the cross-view targets predictable.
    """
    if region_size is None:
        return shape, (0.0, 0.0, 0.0)
    size = tuple(min(int(region_size), n) for n in shape)
    start = tuple(_u(g) * (n - s) for n, s in zip(shape, size))
    return size, start


def resample_box(x: torch.Tensor, start, size, out_size: int) -> torch.Tensor:
    """Trilinearly resample the box (start, size) (voxels, per axis of (D,H,W)) of x (C,D,H,W) to out_size^3.

    Voxel centres of the output are spread evenly over the box (align_corners=False convention).
    """
    C = x.shape[0]
    D, H, W = x.shape[1:]
    # normalised coordinates (align_corners=False): voxel edge 0 -> -1, edge n -> +1
    centre = [2.0 * (s + 0.5 * e) / n - 1.0 for s, e, n in zip(start, size, (D, H, W))]
    half = [e / n for e, n in zip(size, (D, H, W))]
    theta = torch.zeros(1, 3, 4, dtype=x.dtype)
    # affine_grid / grid_sample order the output coordinates as (x=W, y=H, z=D)
    theta[0, 0, 0], theta[0, 1, 1], theta[0, 2, 2] = half[2], half[1], half[0]
    theta[0, 0, 3], theta[0, 1, 3], theta[0, 2, 3] = centre[2], centre[1], centre[0]
    grid = F.affine_grid(theta, [1, C, out_size, out_size, out_size], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


# ------------------------------------------------------------------------------------------ intensity changes

def bias_field(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """Multiply by a smooth random field exp(f), f ~ N(0, strength) on a 4^3 grid upsampled trilinearly."""
    coarse = torch.randn(1, 1, 4, 4, 4, generator=g) * strength
    field = F.interpolate(coarse, size=tuple(x.shape[1:]), mode="trilinear", align_corners=True)[0]
    return x * torch.exp(field)


def gamma(x: torch.Tensor, g: torch.Generator, log_range: float) -> torch.Tensor:
    """x ** gamma with log(gamma) uniform in [-log_range, log_range] (x clipped at 0 first)."""
    return x.clamp(min=0.0) ** math.exp(_u(g, -log_range, log_range))


def contrast(x: torch.Tensor, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """Scale deviations from the mean by c uniform in [lo, hi]."""
    m = x.mean()
    return (x - m) * _u(g, lo, hi) + m


def noise(x: torch.Tensor, g: torch.Generator, std_max: float) -> torch.Tensor:
    """Add Gaussian noise of standard deviation uniform in [0, std_max]."""
    return x + torch.randn(x.shape, generator=g) * _u(g, 0.0, std_max)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x (C,D,H,W), sigma in voxels, radius ceil(3 sigma), edge-replicated."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[:, None]                                                     # (C,1,D,H,W)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y[:, 0]


def blur(x: torch.Tensor, g: torch.Generator, sigma_max: float) -> torch.Tensor:
    """Gaussian blur with sigma uniform in [0.25, sigma_max] voxels."""
    return gaussian_blur(x, _u(g, 0.25, max(0.25, sigma_max)))


def gin(x: torch.Tensor, g: torch.Generator, n_layers: int = 4, channels: int = 2) -> torch.Tensor:
    """GIN: remap intensities with a random shallow conv net, blended with the input (module docstring).

    x (C,D,H,W) -> (C,D,H,W) with the input's mean and standard deviation before blending.
    """
    C = x.shape[0]
    y = x[None]
    c_in = C
    for i in range(n_layers):
        c_out = C if i == n_layers - 1 else channels
        k = 1 if _coin(g, 0.5) else 3
        w = torch.randn(c_out, c_in, k, k, k, generator=g) / math.sqrt(c_in * k ** 3)
        b = torch.randn(c_out, generator=g) * 0.1
        y = F.conv3d(F.pad(y, [k // 2] * 6, mode="replicate") if k > 1 else y, w, b)
        if i < n_layers - 1:
            y = F.leaky_relu(y, 0.2)
        c_in = c_out
    y = y[0]
    y = (y - y.mean()) / (y.std() + 1e-6) * x.std() + x.mean()
    alpha = _u(g)
    return alpha * y + (1.0 - alpha) * x


def intensity_remap(x: torch.Tensor, g: torch.Generator, n_knots: int = 6, monotone_prob: float = 0.25) -> torch.Tensor:
    """Replace every intensity by a random piecewise-linear look-up curve (module docstring).

    x (C,D,H,W) in [0,1] -> same shape in [0,1]. The curve passes through ``n_knots`` (>= 2) control points at
    evenly spaced inputs 0 .. 1 with values uniform in [0,1], sorted with probability ``monotone_prob``. Equal
    inputs give equal outputs: the remap is a function of the intensity alone.
    """
    n = max(2, int(n_knots))
    values = torch.rand(n, generator=g, dtype=x.dtype)
    if _coin(g, monotone_prob):
        values = values.sort().values
    pos = x.clamp(0.0, 1.0) * (n - 1)
    lo = pos.floor().clamp(max=n - 2).long()
    frac = pos - lo.to(x.dtype)
    return values[lo] * (1.0 - frac) + values[lo + 1] * frac


def intensity_augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply the intensity remap, GIN, bias field, gamma, contrast, blur and noise, each with its probability;
    clip to [0,1]."""
    if cfg.remap_prob > 0 and _coin(g, cfg.remap_prob):
        x = intensity_remap(x, g, cfg.remap_knots, cfg.remap_monotone_prob)
    if _coin(g, cfg.gin_prob):
        x = gin(x, g, cfg.gin_layers, cfg.gin_channels).clamp(0.0, 1.0)
    if _coin(g, cfg.bias_field_prob):
        x = bias_field(x, g, cfg.bias_field_strength)
    if _coin(g, cfg.gamma_prob):
        x = gamma(x, g, cfg.gamma_log_range)
    if _coin(g, cfg.contrast_prob):
        x = contrast(x, g, *cfg.contrast_range)
    if _coin(g, cfg.blur_prob):
        x = blur(x, g, cfg.blur_sigma_max)
    if _coin(g, cfg.noise_prob):
        x = noise(x, g, cfg.noise_std_max)
    return x.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------------ flips

def random_flips(g: torch.Generator, p: float) -> torch.Tensor:
    """(3,) bool: flip along (D,H,W), each with probability p."""
    return torch.rand(3, generator=g) < p


def flip_volume(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip the last three axes of x (...,D,H,W) where ``flips`` (3,) is True."""
    dims = [x.ndim - 3 + i for i in range(3) if bool(flips[i])]
    return torch.flip(x, dims) if dims else x


def flip_tokens(tokens: torch.Tensor, grid: tuple[int, int, int], flips: torch.Tensor) -> torch.Tensor:
    """Flip raster-ordered tokens per sample on their (d,h,w) grid.

    Args:
        tokens: (B,N) or (B,N,C), N = d*h*w in raster order.
        grid: (d,h,w).
        flips: (B,3) bool per sample and axis.

    Returns:
        same shape. A flip is its own inverse, so this both flips a teacher-frame mask into a flipped
        student's frame and flips the student's patch tokens back into the teacher's frame. Exact (a pure
        permutation) when the view's edge is a multiple of the patch size, which the training config enforces.
    """
    B = tokens.shape[0]
    flips = flips.to(torch.bool).cpu()
    out = []
    for b in range(B):
        t = tokens[b].reshape(*grid, *tokens.shape[2:])
        dims = [i for i in range(3) if bool(flips[b, i])]
        out.append((torch.flip(t, dims) if dims else t).reshape(tokens.shape[1:]))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------------ views

def make_views(volume: torch.Tensor, cfg: AugmentConfig, g: torch.Generator,
               partner: torch.Tensor | None = None) -> dict:
    """All views of one sample.

    Args:
        volume: (D,H,W) or (1,D,H,W) float32 in [0,1].
        cfg: view settings.
        g: generator (seed it per sample).
        partner: optional co-registered scan of the same anatomy in another modality, on the same grid as
            ``volume``. Then every crop is cut from both at the same box; the teacher sees one of the two (chosen
            per global view with probability 1/2) and the student, with probability ``cfg.partner_prob``, the other
            one, else the same: the student must give the same cls and patch outputs as the teacher across the
            modality change (an addition of ours; the paper's data are unpaired).

    Returns:
        dict with
          "teacher_global": (n_global, 1, S, S, S) clean global crops,
          "student_global": (n_global, 1, S, S, S) the same crops, intensity-augmented and flipped,
          "student_flips": (n_global, 3) bool, the flips applied to the student's global crops,
          "global_boxes": (n_global, 2, 3) float32, each global crop's (start, size) in voxels of the volume
              along (D,H,W) (where its tokens lie: :func:`dinoreg_core.ssl.dense.token_centres`),
          "local": (n_local, 1, s, s, s) student local crops (augmented and flipped; flips not needed later).
    """
    x = volume if volume.ndim == 4 else volume[None]
    x = x.float()
    if partner is not None:
        other = (partner if partner.ndim == 4 else partner[None]).float()
        if other.shape != x.shape:
            raise ValueError(f"the partner scan {tuple(other.shape)} is not on the grid of the volume {tuple(x.shape)}")
        x = torch.cat([x, other])                                        # (2,D,H,W): scan, partner

    def pick(crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) channels of a 1- or 2-channel crop (scan, partner)."""
        if crop.shape[0] == 1:
            return crop, crop
        t = int(_coin(g, 0.5))                                           # the teacher's modality
        s = 1 - t if _coin(g, cfg.partner_prob) else t                   # the student's
        return crop[t:t + 1], crop[s:s + 1]

    shape, offset = region_box(tuple(x.shape[1:]), cfg.region_size, g)
    tg, sg, sf, boxes, loc = [], [], [], [], []
    for _ in range(cfg.n_global):
        if cfg.global_zoom is not None:
            start, size = random_zoom_box(shape, cfg.global_size, cfg.global_zoom, cfg.max_aspect, g)
        else:
            start, size = random_crop_box(shape, cfg.global_scale, cfg.max_aspect, g)
        start = tuple(s + o for s, o in zip(start, offset))
        crop = resample_box(x, start, size, cfg.global_size)
        crop, student_crop = pick(crop)
        flips = random_flips(g, cfg.flip_prob)
        tg.append(crop)
        sg.append(flip_volume(intensity_augment(student_crop, cfg, g), flips))
        sf.append(flips)
        boxes.append(torch.tensor([start, size], dtype=torch.float32))
    for _ in range(cfg.n_local):
        if cfg.local_zoom is not None:
            start, size = random_zoom_box(shape, cfg.local_size, cfg.local_zoom, cfg.max_aspect, g)
        else:
            start, size = random_crop_box(shape, cfg.local_scale, cfg.max_aspect, g)
        start = tuple(s + o for s, o in zip(start, offset))
        crop = resample_box(x, start, size, cfg.local_size)
        if x.shape[0] == 2:                                              # either modality
            c = int(_coin(g, 0.5))
            crop = crop[c:c + 1]
        loc.append(flip_volume(intensity_augment(crop, cfg, g), random_flips(g, cfg.flip_prob)))
    empty = torch.zeros(0, 1, cfg.local_size, cfg.local_size, cfg.local_size)
    return {"teacher_global": torch.stack(tg), "student_global": torch.stack(sg),
            "student_flips": torch.stack(sf), "global_boxes": torch.stack(boxes),
            "local": torch.stack(loc) if loc else empty}
