"""Randomized-appearance rendering of a tissue label map: the same anatomy under many "scanners".

A rendering is a pure function of (label map, seed): :func:`render` draws every random number from a generator
seeded with ``seed``. Two renderings of one map with different seeds show the same geometry (every boundary of
the map) under unrelated intensities, so a network asked to give both the same features must describe anatomy,
not appearance (the idea of anatomix, Dey et al., ICLR 2025, and of SynthSeg-style training).

Appearance families (``family=``):

* ``"random"``: per tissue class a random mean in [0,1] (classes may share a mean with probability
  ``merge_prob``, which hides some boundaries as real scanners do; the order of the means is random, so contrast
  reversals come for free), a within-class standard deviation (a Gaussian mixture over the classes), multiplicative
  smooth texture noise (two octaves, Perlin-like), partial volume from a random lower resolution per axis
  (box-averaged down, trilinear up), a smooth bias field, gamma, Gaussian or Rician noise, and, with their
  probabilities, MR-like artefacts (Gibbs ringing by k-space truncation along one axis, a k-space spike).
* ``"ct"``: the phantom's CT renderer (:func:`dinoreg_core.data.phantom_appearance.render_ct`, a random phase)
  mapped to [0,1] with the CT window the pipeline uses (:data:`dinoreg_core.preprocess.CT_WINDOW_HU`).
* ``"mr"``: the phantom's MR renderer (T1 or T2 at random) mapped to [0,1] with the pipeline's MR percentiles.
* ``"pd"`` (held back: :data:`HELD_BACK_FAMILIES`): a proton-density-like MR table (fat and fluid bright, muscle
  and liver mid grey, cortical bone, air and flowing arterial blood dark) through the phantom's MR renderer,
  plus Gibbs ringing. Pretraining configs may not use it (:func:`check_families`), so the evaluation cohort can
  show an MR look the model never saw: its table, rather than its statistics, is what is new (the ``random``
  family draws means anywhere in [0,1]).

Every output is (D,H,W) float32 in [0,1], like :func:`dinoreg_core.preprocess.normalize_intensity`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DinoregError
from ..preprocess import CT_WINDOW_HU, MR_PERCENTILES
from .phantom_anatomy import TISSUES
from .phantom_appearance import CT_PHASES, MR_CONTRASTS, render_ct, render_mr

FAMILIES = ("random", "ct", "mr", "pd")
HELD_BACK_FAMILIES = ("pd",)          # evaluation only: never drawn by pretraining

# proton-density-like table: tissue -> (lo, hi) relative signal (the held-back appearance)
PD_SIGNAL = {
    "air": (0.0, 0.0), "fat": (0.85, 0.95), "skin": (0.55, 0.65), "muscle": (0.40, 0.48),
    "bone_cancellous": (0.60, 0.70), "bone_cortical": (0.03, 0.08), "csf": (0.95, 1.0), "spinal_cord": (0.65, 0.72),
    "disc": (0.75, 0.85), "lung": (0.03, 0.08), "lung_vessel": (0.2, 0.35), "heart": (0.5, 0.65),
    "bowel_wall": (0.55, 0.65), "bowel_fluid": (0.85, 0.95), "gas": (0.0, 0.02), "feces": (0.4, 0.6),
    "liver": (0.50, 0.58), "hepatic_vein": (0.30, 0.45), "spleen": (0.70, 0.78), "kidney_cortex": (0.65, 0.72),
    "kidney_medulla": (0.75, 0.82), "urine": (0.9, 1.0), "bile": (0.9, 1.0), "stomach_wall": (0.55, 0.65),
    "stomach_fluid": (0.85, 0.95), "pancreas": (0.58, 0.64), "adrenal": (0.58, 0.64), "artery": (0.1, 0.25),
    "vein": (0.3, 0.45), "portal_vein": (0.3, 0.45), "esophagus": (0.5, 0.6), "cartilage": (0.55, 0.65),
}
assert set(PD_SIGNAL) == set(TISSUES)
PD_SCALE = 1000.0                     # PD table -> the MR renderer's 0..1000 signal scale


@dataclass
class RenderConfig:
    """Ranges of the ``random`` family (intensities on the [0,1] output scale; lengths in voxels)."""

    merge_prob: float = 0.15                  # per class: take the mean of another random class
    dark_background_prob: float = 0.8         # class 0 (air) gets a mean in [0, dark_background_max]
    dark_background_max: float = 0.05
    class_sd: tuple = (0.0, 0.06)             # within-class sd (smooth, per class), uniform in this range
    texture_prob: float = 0.8                 # multiplicative texture exp(a * noise), a uniform in texture_amp
    texture_amp: tuple = (0.0, 0.25)
    texture_cells: tuple = (3, 12)            # coarse grid cells per axis of the texture's first octave
    lowres_prob: float = 0.5                  # partial volume from a lower resolution per axis, factor uniform in
    lowres_factor: tuple = (1.0, 2.5)         # lowres_factor (1 = native)
    blur_prob: float = 0.5                    # isotropic Gaussian blur, sigma uniform in blur_sigma
    blur_sigma: tuple = (0.3, 1.0)
    bias_prob: float = 0.7                    # smooth multiplicative field exp(N(0, s)) on a bias_cells^3 grid
    bias_sd: tuple = (0.05, 0.4)
    bias_cells: int = 4
    gamma_prob: float = 0.7                   # x ** gamma, log-uniform in gamma_range
    gamma_range: tuple = (0.5, 2.0)
    noise_prob: float = 0.8                   # noise sd uniform in noise_sd; Rician with rician_prob
    noise_sd: tuple = (0.0, 0.05)
    rician_prob: float = 0.5
    gibbs_prob: float = 0.15                  # Gibbs ringing: keep this fraction of k-space along one axis
    gibbs_keep: tuple = (0.35, 0.7)
    spike_prob: float = 0.05                  # a k-space spike: a plane wave of this relative amplitude
    spike_amp: tuple = (0.02, 0.08)
    out_percentiles: tuple = MR_PERCENTILES   # final mapping to [0,1]

    def __post_init__(self):
        for k in ("class_sd", "texture_amp", "texture_cells", "lowres_factor", "blur_sigma", "bias_sd",
                  "gamma_range", "noise_sd", "gibbs_keep", "spike_amp", "out_percentiles"):
            setattr(self, k, tuple(float(v) for v in getattr(self, k)))

    @classmethod
    def clean(cls) -> "RenderConfig":
        """Piecewise-constant renderings (one random intensity per class, nothing else): for tests and figures."""
        return cls(merge_prob=0.0, class_sd=(0.0, 0.0), texture_prob=0.0, lowres_prob=0.0, blur_prob=0.0,
                   bias_prob=0.0, gamma_prob=0.0, noise_prob=0.0, gibbs_prob=0.0, spike_prob=0.0,
                   out_percentiles=(0.0, 100.0))


def check_families(weights: dict, *, allow_held_back: bool = False) -> None:
    """Raise DinoregError if ``weights`` (family -> relative frequency) names an unknown or held-back family."""
    for k, v in weights.items():
        if k not in FAMILIES:
            raise DinoregError(f"Unknown appearance family '{k}'; choose from {', '.join(FAMILIES)}.")
        if not allow_held_back and k in HELD_BACK_FAMILIES and float(v) > 0:
            raise DinoregError(f"The appearance family '{k}' is held back for evaluation; pretraining may not use it.")
        if float(v) < 0:
            raise DinoregError(f"The appearance weight {k}={v} must not be negative.")
    if sum(float(v) for v in weights.values()) <= 0:
        raise DinoregError("The appearance weights must have a positive sum.")


# ----------------------------------------------------------------------------------------------- helpers

def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g)) < p


def smooth_noise(shape, cells: int, g: torch.Generator) -> torch.Tensor:
    """(D,H,W) unit-variance noise: a (cells+1)^3 Gaussian grid upsampled trilinearly (features ~ edge/cells)."""
    n = max(2, int(cells) + 1)
    c = torch.randn(1, 1, n, n, n, generator=g)
    x = F.interpolate(c, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def to_unit(x: torch.Tensor, percentiles=MR_PERCENTILES) -> torch.Tensor:
    """Map (D,H,W) intensities to [0,1] between two percentiles (clipped); a constant image gives zeros."""
    flat = x.flatten()
    lo, hi = (float(torch.quantile(flat[:: max(1, flat.numel() // 2 ** 20)], p / 100.0)) for p in percentiles)
    if hi - lo < 1e-8:
        return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def lowres(x: torch.Tensor, factors) -> torch.Tensor:
    """Partial volume of a coarser acquisition: box-average (D,H,W) to shape/factor per axis, trilinear back."""
    small = [max(2, int(round(s / f))) for s, f in zip(x.shape, factors)]
    y = F.adaptive_avg_pool3d(x[None, None], small)
    return F.interpolate(y, size=tuple(x.shape), mode="trilinear", align_corners=False)[0, 0]


def gibbs(x: torch.Tensor, axis: int, keep: float) -> torch.Tensor:
    """Gibbs ringing: zero the k-space of (D,H,W) ``x`` outside the central ``keep`` fraction along ``axis``."""
    k = torch.fft.fftshift(torch.fft.fft(x, dim=axis), dim=axis)
    n = x.shape[axis]
    half = max(1, int(round(keep * n / 2)))
    m = torch.zeros(n, dtype=torch.bool)
    m[max(0, n // 2 - half): n // 2 + half] = True
    shape = [1, 1, 1]
    shape[axis] = n
    k = k * m.view(shape)
    return torch.fft.ifft(torch.fft.ifftshift(k, dim=axis), dim=axis).real


def spike(x: torch.Tensor, g: torch.Generator, amp: float) -> torch.Tensor:
    """A k-space spike: add a plane wave of random direction and frequency, amplitude ``amp`` * the image's range."""
    D, H, W = x.shape
    freq = [_u(g, -0.4, 0.4) for _ in range(3)]                        # cycles per voxel
    phase = _u(g, 0.0, 2 * math.pi)
    zi = torch.arange(D).view(D, 1, 1) * freq[0]
    yi = torch.arange(H).view(1, H, 1) * freq[1]
    xi = torch.arange(W).view(1, 1, W) * freq[2]
    wave = torch.cos(2 * math.pi * (zi + yi + xi) + phase)
    return x + amp * float(x.max() - x.min()) * wave


def blur3(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic separable Gaussian blur of (D,H,W), sigma in voxels."""
    from .augment import gaussian_blur

    return gaussian_blur(x[None], sigma)[0]


# ---------------------------------------------------------------------------------------------- families

def render_random(tissue: torch.Tensor, g: torch.Generator, cfg: RenderConfig | None = None,
                  n_classes: int = len(TISSUES)) -> torch.Tensor:
    """The ``random`` family (module docstring): tissue (D,H,W) integer ids < n_classes -> (D,H,W) in [0,1]."""
    cfg = cfg or RenderConfig()
    t = tissue.long()
    shape = tuple(t.shape)
    K = max(int(n_classes), int(t.max()) + 1)
    means = torch.rand(K, generator=g)
    merge = torch.rand(K, generator=g) < cfg.merge_prob
    donors = torch.randint(K, (K,), generator=g)
    means = torch.where(merge, means[donors], means)
    if _coin(g, cfg.dark_background_prob):
        means[0] = _u(g, 0.0, cfg.dark_background_max)
    x = means[t]
    sd = cfg.class_sd[0] + (cfg.class_sd[1] - cfg.class_sd[0]) * torch.rand(K, generator=g)
    if float(sd.max()) > 0:
        x = x + sd[t] * smooth_noise(shape, int(_u(g, *cfg.texture_cells)) * 2, g)
    if _coin(g, cfg.texture_prob):
        cells = int(_u(g, *cfg.texture_cells))
        field = smooth_noise(shape, cells, g) + 0.5 * smooth_noise(shape, cells * 2, g)
        x = x * torch.exp(_u(g, *cfg.texture_amp) * field)
    if _coin(g, cfg.lowres_prob):
        x = lowres(x, [_u(g, *cfg.lowres_factor) for _ in range(3)])
    if _coin(g, cfg.blur_prob):
        x = blur3(x, _u(g, *cfg.blur_sigma))
    if _coin(g, cfg.bias_prob):
        x = x * torch.exp(_u(g, *cfg.bias_sd) * smooth_noise(shape, cfg.bias_cells, g))
    if _coin(g, cfg.gamma_prob):
        lo, hi = math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])
        x = to_unit(x, (0.0, 100.0)) ** math.exp(_u(g, lo, hi))
    if _coin(g, cfg.noise_prob):
        s = _u(g, *cfg.noise_sd)
        if _coin(g, cfg.rician_prob):
            x = ((x + s * torch.randn(shape, generator=g)) ** 2 + (s * torch.randn(shape, generator=g)) ** 2).sqrt()
        else:
            x = x + s * torch.randn(shape, generator=g)
    if _coin(g, cfg.gibbs_prob):
        x = gibbs(x, int(torch.randint(3, (), generator=g)), _u(g, *cfg.gibbs_keep))
    if _coin(g, cfg.spike_prob):
        x = spike(x, g, _u(g, *cfg.spike_amp))
    return to_unit(x, cfg.out_percentiles)


def pd_means(rng: np.random.Generator) -> np.ndarray:
    """(n_tissues,) float32 proton-density-like mean signal per tissue (0..PD_SCALE) for one rendering."""
    return np.array([rng.uniform(*PD_SIGNAL[n]) * PD_SCALE for n in TISSUES], np.float32)


def render(tissue: torch.Tensor, seed: int, family: str = "random", *, spacing_mm: float = 3.0,
           cfg: RenderConfig | None = None) -> torch.Tensor:
    """Render a tissue map with appearance ``family`` (see the module docstring); a pure function of its inputs.

    Args:
        tissue: (D,H,W) integer tissue ids (the phantom's ``tissue`` map; 0 = air / background).
        seed: the rendering's seed (same map, family and seed -> the same image, bit for bit).
        family: "random", "ct", "mr" or "pd".
        spacing_mm: voxel size of the map (the phantom renderers scale their texture and blur by it).
        cfg: ranges of the ``random`` family.

    Returns:
        (D,H,W) float32 in [0,1].
    """
    if family not in FAMILIES:
        raise DinoregError(f"Unknown appearance family '{family}'; choose from {', '.join(FAMILIES)}.")
    g = torch.Generator().manual_seed(int(seed) % 2 ** 63)
    if family == "random":
        return render_random(tissue, g, cfg)
    rng = np.random.default_rng(int(seed) % 2 ** 63)
    t = tissue.to(torch.uint8) if tissue.dtype != torch.uint8 else tissue
    if family == "ct":
        hu, _ = render_ct(t, rng, float(spacing_mm), str(rng.choice(list(CT_PHASES))))
        lo, hi = CT_WINDOW_HU
        return ((torch.from_numpy(hu) - lo) / (hi - lo)).clamp(0.0, 1.0)
    if family == "mr":
        img, _ = render_mr(t, rng, float(spacing_mm), str(rng.choice(list(MR_CONTRASTS))))
        return to_unit(torch.from_numpy(img))
    img, _ = render_mr(t, rng, float(spacing_mm), "t1", means=pd_means(rng))        # "pd": table, then ringing
    x = gibbs(torch.from_numpy(img), int(rng.integers(3)), float(rng.uniform(0.5, 0.7)))
    return to_unit(x)


def render_hu_like(tissue: torch.Tensor, seed: int, family: str, spacing_mm: float) -> np.ndarray:
    """A rendering on the scale a NIfTI file of that modality would hold (for writing cohorts): ``ct`` in HU,
    ``mr`` / ``pd`` / ``random`` as MR signal 0..1000. (D,H,W) float32."""
    if family == "ct":
        rng = np.random.default_rng(int(seed) % 2 ** 63)
        hu, _ = render_ct(tissue.to(torch.uint8), rng, float(spacing_mm), str(rng.choice(list(CT_PHASES))))
        return hu
    return (render(tissue, seed, family, spacing_mm=spacing_mm) * PD_SCALE).numpy().astype(np.float32)
