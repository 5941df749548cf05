"""Intensities of the synthetic phantom: CT in Hounsfield units and MR in two contrast families.

Each subject draws, per tissue, one mean intensity from the tissue's range for its acquisition (CT contrast
phase, or MR contrast family), so no two subjects share the same contrast. On top come, in this order:

* texture: a smooth (about 10 mm) random variation with a tissue-specific amplitude (mottled stool, the
  arterial-phase "zebra" spleen, cancellous bone, heterogeneous organ enhancement),
* partial volume: a Gaussian blur of 0.8-1.5 mm (standard deviation),
* CT: white Gaussian noise of 10-25 HU; MR: a smooth multiplicative bias field (exp of a ~150 mm field with
  standard deviation 0.1-0.3) and Rician noise (magnitude of the signal plus complex Gaussian noise).

CT phases: ``native`` (no contrast), ``arterial`` (aorta 250-400 HU, kidney cortex brighter than medulla,
heterogeneous spleen), ``portal`` (portal venous: liver 95-110 HU, portal and hepatic veins bright).
MR families: ``t1`` (T1-weighted gradient echo: fat and fatty marrow bright, fluid dark, liver brighter than
spleen) and ``t2`` (T2-weighted: fluid very bright, fat moderately bright, liver dark, flow voids in arteries).
MR intensities are arbitrary units on a 0..~1000 scale.
"""

from __future__ import annotations

import numpy as np
import torch

from .phantom_anatomy import TISSUES
from .phantom_geometry import gaussian_blur, upsampled_noise

CT_PHASES = ("native", "arterial", "portal")
MR_CONTRASTS = ("t1", "t2")

# tissue -> {phase: (lo, hi) HU}; a single (lo, hi) means the same for every phase
CT_HU = {
    "air": (-1000, -1000), "fat": (-115, -85), "skin": (10, 40),
    "muscle": {"native": (40, 60), "arterial": (45, 65), "portal": (50, 70)},
    "bone_cancellous": (280, 400), "bone_cortical": (750, 1000), "csf": (0, 15), "spinal_cord": (25, 40),
    "disc": (70, 100), "lung": (-880, -820),
    "lung_vessel": {"native": (30, 50), "arterial": (150, 300), "portal": (120, 170)},
    "heart": {"native": (35, 50), "arterial": (250, 380), "portal": (130, 180)},
    "bowel_wall": {"native": (30, 45), "arterial": (70, 100), "portal": (80, 110)},
    "bowel_fluid": (0, 25), "gas": (-1000, -980), "feces": (-60, 30),
    "liver": {"native": (50, 65), "arterial": (65, 80), "portal": (95, 110)},
    "hepatic_vein": {"native": (35, 50), "arterial": (40, 60), "portal": (140, 180)},
    "spleen": {"native": (40, 52), "arterial": (90, 130), "portal": (100, 125)},
    "kidney_cortex": {"native": (28, 40), "arterial": (150, 210), "portal": (150, 190)},
    "kidney_medulla": {"native": (25, 35), "arterial": (60, 100), "portal": (140, 180)},
    "urine": (0, 15), "bile": (0, 20),
    "stomach_wall": {"native": (35, 50), "arterial": (80, 120), "portal": (80, 110)},
    "stomach_fluid": (0, 20),
    "pancreas": {"native": (35, 50), "arterial": (100, 130), "portal": (80, 100)},
    "adrenal": {"native": (20, 35), "arterial": (50, 75), "portal": (50, 70)},
    "artery": {"native": (35, 50), "arterial": (250, 400), "portal": (140, 190)},
    "vein": {"native": (35, 50), "arterial": (60, 100), "portal": (130, 170)},
    "portal_vein": {"native": (35, 50), "arterial": (90, 130), "portal": (160, 210)},
    "esophagus": {"native": (30, 45), "arterial": (50, 70), "portal": (60, 80)},
    "cartilage": (90, 140),
}
# smooth texture amplitude (HU, standard deviation); arterial spleen is heterogeneous
CT_TEXTURE = {"fat": 6, "muscle": 6, "liver": 4, "spleen": 5, "kidney_cortex": 5, "kidney_medulla": 5, "pancreas": 8,
              "feces": 70, "bowel_fluid": 8, "stomach_fluid": 6, "bone_cancellous": 60, "bone_cortical": 80,
              "lung": 25, "heart": 10, "bowel_wall": 6}
CT_TEXTURE_ARTERIAL = {"spleen": 25, "kidney_cortex": 10}

MR = {  # tissue -> (lo, hi) for (t1, t2), arbitrary units
    "air": ((0, 0), (0, 0)), "fat": ((750, 950), (450, 650)), "skin": ((300, 420), (220, 320)),
    "muscle": ((170, 240), (70, 120)), "bone_cancellous": ((420, 580), (300, 420)),
    "bone_cortical": ((20, 50), (10, 30)), "csf": ((60, 110), (850, 1000)), "spinal_cord": ((200, 260), (250, 330)),
    "disc": ((150, 230), (450, 650)), "lung": ((15, 40), (20, 45)), "lung_vessel": ((60, 150), (20, 60)),
    "heart": ((120, 260), (40, 150)), "bowel_wall": ((230, 320), (180, 260)), "bowel_fluid": ((60, 160), (650, 950)),
    "gas": ((0, 15), (0, 15)), "feces": ((120, 300), (150, 450)), "liver": ((380, 480), (120, 180)),
    "hepatic_vein": ((80, 200), (20, 80)), "spleen": ((240, 320), (330, 440)),
    "kidney_cortex": ((280, 360), (330, 420)), "kidney_medulla": ((170, 240), (420, 540)),
    "urine": ((50, 100), (850, 1000)), "bile": ((60, 320), (850, 1000)), "stomach_wall": ((240, 320), (180, 260)),
    "stomach_fluid": ((50, 130), (750, 950)), "pancreas": ((420, 540), (220, 300)), "adrenal": ((250, 330), (200, 280)),
    "artery": ((80, 450), (15, 60)), "vein": ((80, 400), (30, 150)), "portal_vein": ((80, 400), (30, 150)),
    "esophagus": ((230, 300), (150, 230)), "cartilage": ((200, 280), (250, 350)),
}
MR_TEXTURE = {"fat": 0.03, "muscle": 0.05, "liver": 0.04, "spleen": 0.05, "feces": 0.3, "bowel_fluid": 0.08,
              "bone_cancellous": 0.12, "kidney_cortex": 0.04, "pancreas": 0.06, "lung": 0.3}

assert set(CT_HU) == set(TISSUES) and set(MR) == set(TISSUES)


def ct_tissue_means(rng: np.random.Generator, phase: str) -> np.ndarray:
    """(n_tissues,) float32 mean HU per tissue for one subject in contrast ``phase``."""
    out = np.zeros(len(TISSUES), np.float32)
    for i, name in enumerate(TISSUES):
        rg = CT_HU[name]
        lo, hi = rg[phase] if isinstance(rg, dict) else rg
        out[i] = rng.uniform(lo, hi)
    return out


def mr_tissue_means(rng: np.random.Generator, contrast: str) -> np.ndarray:
    """(n_tissues,) float32 mean signal per tissue for one subject in MR ``contrast`` ("t1" or "t2")."""
    k = MR_CONTRASTS.index(contrast)
    return np.array([rng.uniform(*MR[name][k]) for name in TISSUES], np.float32)


def _texture(rng, tissue: torch.Tensor, amp: np.ndarray, spacing: float) -> torch.Tensor:
    """Per-voxel smooth texture: amp[tissue] * unit noise on a ~10 mm scale."""
    n = upsampled_noise(rng, tissue.shape, spacing, 10.0, 1)[0]
    return torch.as_tensor(amp)[tissue.long()] * n


def render_ct(tissue: torch.Tensor, rng: np.random.Generator, spacing: float, phase: str = "portal",
              means: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """CT image in HU from a tissue map.

    Args:
        tissue: (D,H,W) uint8 tissue ids.
        rng: random generator (intensities, texture, noise).
        spacing: voxel size in mm.
        phase: "native", "arterial" or "portal".
        means: optional per-tissue mean HU (else drawn with :func:`ct_tissue_means`).

    Returns:
        (D,H,W) float32 HU image and a dict of the drawn settings (means, noise_hu, blur_mm).
    """
    means = ct_tissue_means(rng, phase) if means is None else np.asarray(means, np.float32)
    amp = np.zeros(len(TISSUES), np.float32)
    for name, a in {**CT_TEXTURE, **(CT_TEXTURE_ARTERIAL if phase == "arterial" else {})}.items():
        amp[TISSUES.index(name)] = a
    img = torch.as_tensor(means)[tissue.long()] + _texture(rng, tissue, amp, spacing)
    blur_mm = float(rng.uniform(0.8, 1.5))
    img = gaussian_blur(img[None], blur_mm / spacing)[0]
    noise_hu = float(rng.uniform(10.0, 25.0))
    img = img + noise_hu * torch.as_tensor(rng.standard_normal(img.shape, dtype=np.float32))
    img = img.clamp(-1024.0, 3071.0)
    return img.numpy(), {"phase": phase, "means": means, "noise_hu": noise_hu, "blur_mm": blur_mm}


def render_mr(tissue: torch.Tensor, rng: np.random.Generator, spacing: float, contrast: str = "t1",
              means: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """MR magnitude image (arbitrary units, about 0..1000) from a tissue map.

    Args:
        tissue: (D,H,W) uint8 tissue ids.
        rng: random generator.
        spacing: voxel size in mm.
        contrast: "t1" or "t2".
        means: optional per-tissue mean signal (else drawn with :func:`mr_tissue_means`).

    Returns:
        (D,H,W) float32 image (>= 0) and a dict of the drawn settings (means, bias_sd, noise_sd, blur_mm).
    """
    means = mr_tissue_means(rng, contrast) if means is None else np.asarray(means, np.float32)
    amp = np.zeros(len(TISSUES), np.float32)
    for name, a in MR_TEXTURE.items():
        amp[TISSUES.index(name)] = a
    base = torch.as_tensor(means)[tissue.long()]
    img = base * (1.0 + _texture(rng, tissue, amp, spacing))
    blur_mm = float(rng.uniform(0.8, 1.5))
    img = gaussian_blur(img[None], blur_mm / spacing)[0]
    bias_sd = float(rng.uniform(0.1, 0.3))
    bias = torch.exp(bias_sd * upsampled_noise(rng, tissue.shape, spacing, 150.0, 1)[0])
    img = img * bias
    noise_sd = float(rng.uniform(0.015, 0.04)) * 1000.0
    n = torch.as_tensor(rng.standard_normal((2, *img.shape), dtype=np.float32)) * noise_sd
    img = ((img + n[0]).square() + n[1].square()).sqrt()
    return img.numpy(), {"contrast": contrast, "means": means, "bias_sd": bias_sd, "noise_sd": noise_sd,
                         "blur_mm": blur_mm}
