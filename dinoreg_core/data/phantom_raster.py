"""Rasterise a sampled :class:`~.phantom_anatomy.Anatomy` into a tissue map and a Learn2Reg label map.

The voxel grid is the scanner frame: voxel (i,j,k) sits at ``spacing * (index - (n-1)/2)`` mm (RAS), so the
field-of-view centre is the world origin. :func:`coordinate_field` maps every voxel to the body frame:

    world x --pose (rotation, table position)--> q --breathing--> q' --anatomy field--> atlas p

* pose: a rigid transform (subject position on the table; the MR of a subject gets another one),
* breathing: organs under the diaphragm slide down (and slightly forward) by ``breath_mm`` x a smooth weight
  that is 1 in the upper abdomen and 0 at the spine, the back and the lower pelvis (sliding at the ribs),
* anatomy field: a smooth random displacement (per subject, shared by its CT and MR).

Every structure is then painted where its SDF is negative, later structures over earlier ones (body layers,
lungs, bowel, solid organs, vessels, muscles, bones). Gas in the stomach and bowel collects on the
*world* anterior side (the patient lies supine), so air-fluid levels are horizontal in the scanner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .phantom_anatomy import Anatomy, T
from .phantom_geometry import CoordField, NoiseField, rotation_matrix, shape_sdf

# channels of the per-subject noise fields
ORGAN_CH = {"liver": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 4, "pancreas": 5, "colon": 6,
            "gallbladder": 7, "duodenum": 8, "colon_gas": 9}
FINE_CH = {"pyramids": 0, "rugae": 1, "haustra": 2, "bubbles": 3, "lobules": 4, "pancreas_fat": 5}
ORGAN_AMP = {"liver": 6.0, "spleen": 4.0, "kidney_right": 2.0, "kidney_left": 2.0, "stomach": 5.0, "pancreas": 3.0,
             "colon": 4.0, "gallbladder": 2.0, "duodenum": 3.0}


@dataclass
class SubjectNoise:
    """Smooth random fields of one subject, all in the body frame (so CT and MR of a subject share them)."""

    organ: NoiseField    # ~30 mm scale: organ surface irregularity, colon gas
    fine: NoiseField     # ~10 mm scale: kidney pyramids, gastric rugae, haustra, stool bubbles, pancreas lobules
    bowel: NoiseField    # ~18 mm scale: small-bowel loops (3 channels)
    lung: NoiseField     # ~12 mm scale: lung vessels (2 channels)
    deform: NoiseField   # ~55 mm scale: anatomy displacement (3 channels, unit variance)

    @staticmethod
    def sample(rng: np.random.Generator) -> "SubjectNoise":
        return SubjectNoise(
            organ=NoiseField(rng, (-230, -170, -350), (230, 230, 360), 16.0, len(ORGAN_CH), 1.0),
            fine=NoiseField(rng, (-150, -60, -330), (150, 190, 150), 5.0, len(FINE_CH), 1.0),
            bowel=NoiseField(rng, (-160, -20, -330), (160, 220, 40), 11.0, 3, 1.0),
            lung=NoiseField(rng, (-170, -100, -40), (170, 180, 380), 6.0, 2, 0.8),
            deform=NoiseField(rng, (-260, -200, -420), (260, 260, 420), 24.0, 3, 1.2),
        )


@dataclass
class Pose:
    """Rigid placement and breathing state of a subject in the scanner.

    Attributes:
        fov_centre: body-frame point (mm) at the centre of the field of view.
        rotation_deg: small rotation (about x, y, z) of the body in the scanner.
        breath_mm: inferior displacement of the upper-abdominal organs relative to full expiration (mm).
        deform_mm: standard deviation of the anatomy displacement field (mm).
        extra_mm: standard deviation of an additional smooth displacement (posture), 0 for none.
    """

    fov_centre: np.ndarray
    rotation_deg: np.ndarray
    breath_mm: float
    deform_mm: float
    extra_mm: float = 0.0


def world_coordinates(shape, spacing: float) -> torch.Tensor:
    """Scanner coordinates (3,D,H,W) float32 mm of every voxel centre (field-of-view centre at 0)."""
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0) * spacing for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def grid_affine(shape, spacing: float) -> np.ndarray:
    """(4,4) RAS voxel -> world affine of the phantom grid (positive diagonal, centred field of view)."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -spacing * (np.asarray(shape, np.float64) - 1) / 2.0
    return aff


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def breathing_weight(q: torch.Tensor, anat: Anatomy) -> torch.Tensor:
    """Weight in [0,1] of the breathing motion at body points q (3,...): 1 for the liver, ~0.4 for kidneys and
    spleen, 0 at the spine, the back muscles, the ribs and the lower pelvis."""
    x, y, z = q[0], q[1], q[2]
    fz = anat.params["fz"]
    wz = _smoothstep(z, -170.0 * fz, -30.0 * fz)
    wlat = 1.0 - _smoothstep(x.abs(), anat.body["a_cav"] - 20.0, anat.body["a_cav"] + 15.0)
    wpost = 0.4 * _smoothstep(x.abs(), 30.0, 55.0) + 0.6 * _smoothstep(y, 15.0, 45.0)
    wback = _smoothstep(y, -60.0, -35.0)
    return (wz * wlat * wpost.clamp(max=1.0) * wback).clamp(0.0, 1.0)


def coordinate_field(shape, spacing: float, anat: Anatomy, noise: SubjectNoise, pose: Pose,
                     extra: NoiseField | None = None, stride: int = 2) -> CoordField:
    """Body-frame coordinates of every voxel for one acquisition (see the module docstring).

    The mapping is smooth, so it is evaluated every ``stride`` voxels and interpolated trilinearly.
    """
    shape = tuple(int(n) for n in shape)
    nc = [(n - 1 + stride - 1) // stride + 1 for n in shape]
    axes = [(torch.arange(m, dtype=torch.float32) * stride - (n - 1) / 2.0) * spacing for m, n in zip(nc, shape)]
    xw = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    R = torch.as_tensor(rotation_matrix(pose.rotation_deg), dtype=torch.float32)
    q = torch.einsum("ij,j...->i...", R, xw) + torch.as_tensor(np.asarray(pose.fov_centre, np.float32)).view(3, 1, 1, 1)
    if pose.breath_mm:
        w = breathing_weight(q, anat) * float(pose.breath_mm)
        q = torch.stack([q[0], q[1] - 0.25 * w, q[2] + w])
    if extra is not None and pose.extra_mm:
        q = q + float(pose.extra_mm) * extra.sample(q)
    p = q + float(pose.deform_mm) * noise.deform.sample(q)
    full = tuple((m - 1) * stride + 1 for m in nc)
    p = torch.nn.functional.interpolate(p[None], size=full, mode="trilinear", align_corners=True)[0]
    p = p[:, :shape[0], :shape[1], :shape[2]].contiguous()
    return CoordField(p, world_coordinates(shape, spacing), spacing)


# ------------------------------------------------------------------------------------------ body model

class _Section:
    """Per-voxel quantities shared by every body layer: |x| / zmod(z), |y - y0|, front/back side."""

    def __init__(self, P: torch.Tensor, y0: float, anat: Anatomy):
        z = P[2]
        fz = anat.params["fz"]
        zmod = 1.0 + 0.06 * torch.exp(-((z + 190.0 * fz) / 60.0) ** 2) - 0.03 * torch.exp(-((z + 60.0 * fz) / 60.0) ** 2)
        self.ax = P[0].abs() / zmod
        dy = P[1] - y0
        self.ant = dy > 0
        self.ady = dy.abs()


def _superellipse(sec: _Section, a, b_ant, b_post):
    """|x/a|^n + |dy/b|^n of the body cross-section family (< 1 inside): n = 2 in front, 4 at the flat back."""
    u2 = (sec.ax * (1.0 / a)).square_()
    w2 = (sec.ady * torch.where(sec.ant, torch.tensor(1.0 / b_ant), torch.tensor(1.0 / b_post))).square_()
    return torch.where(sec.ant, u2 + w2, u2.square() + w2.square())


class Body:
    """Body outline, layers, diaphragm and the clip regions used while painting."""

    Y0 = 15.0

    def __init__(self, anat: Anatomy):
        b = anat.body
        self.anat = anat
        self.cav = (b["a_cav"], b["y_cav_ant"] - self.Y0, self.Y0 - b["y_cav_post"])
        out = b["t_muscle"] + b["t_fat"] + b["t_skin"]
        self.outer = (b["a_cav"] + out, b["y_cav_ant"] + out - self.Y0, self.Y0 - b["y_post"])
        t = b["t_skin"]
        self.fat = (self.outer[0] - t, self.outer[1] - t, self.outer[2] - t)
        t = b["t_skin"] + b["t_fat"]
        tp = b["t_skin"] + 0.7 * b["t_fat"]
        self.muscle = (self.outer[0] - t, self.outer[1] - t, self.outer[2] - tp)

    def r(self, P, layer, sec: _Section | None = None) -> torch.Tensor:
        """Superellipse value of ``layer`` at body points P (< 1 inside)."""
        return _superellipse(sec if sec is not None else _Section(P, self.Y0, self.anat), *layer)

    def diaphragm_z(self, P) -> torch.Tensor:
        """Height (mm) of the diaphragm above body point (x, y): two domes, the right one higher."""
        a, d = self.anat, self.anat.diaphragm
        fx = a.params["fx"]
        x, y = P[0], P[1]
        dy = y - 25.0
        cy = torch.where(dy > 0, torch.tensor(40.0), torch.tensor(130.0))
        ty = cy * (dy / 95.0) ** 2
        right = d["zR"] - 110.0 * ((x - 50.0 * fx) / (110.0 * fx)) ** 2 - ty
        left = d["zL"] - 110.0 * ((x + 55.0 * fx) / (110.0 * fx)) ** 2 - ty
        # the deepest (postero-lateral) recesses reach about T12/L1, not lower
        return torch.maximum(torch.maximum(right, left), torch.tensor(min(d["zR"], d["zL"]) - 70.0))


# ------------------------------------------------------------------------------------------ painting

class Canvas:
    """Tissue and label maps being painted ((D,H,W) uint8 torch tensors)."""

    def __init__(self, shape):
        self.tissue = torch.zeros(shape, dtype=torch.uint8)
        self.label = torch.zeros(shape, dtype=torch.uint8)

    def put(self, sl, mask, tissue, label=0):
        self.tissue[sl][mask] = tissue
        if label is not None:
            self.label[sl][mask] = label


def _paint(cv: Canvas, f: CoordField, shape, tissue, label=0, *, noise=None, ch=0, amp=0.0, clip=None,
           where=None, margin=0.0):
    """Paint ``shape`` (its SDF, plus ``amp`` mm of noise channel ``ch``) as ``tissue``/``label``.

    ``clip`` is a full-grid bool mask the painting is restricted to; ``where(sl)`` an extra crop-level test.
    Returns (slices, sdf, mask) of the painted crop, or None when the shape lies outside the field of view.
    """
    lo, hi = shape.bbox()
    pad = 3.0 * amp + margin + 3.0
    sl = f.crop(np.asarray(lo) - pad, np.asarray(hi) + pad)
    if sl is None:
        return None
    d = shape_sdf(shape, f, sl, pad)
    if amp:
        d = d + amp * noise.sample(f.points(sl), ch)
    m = d < 0
    if clip is not None:
        m &= clip[sl]
    if where is not None:
        m &= where(sl)
    if tissue is not None:
        cv.put(sl, m, tissue, label)
    return sl, d, m


def _paint_bone(cv, f, shape, shell_mm, clip=None):
    out = _paint(cv, f, shape, None, None, clip=clip)
    if out is None:
        return
    sl, d, m = out
    cv.put(sl, m & (d > -shell_mm), T["bone_cortical"], 0)
    cv.put(sl, m & (d <= -shell_mm), T["bone_cancellous"], 0)


def _gas_on_top(cv, f, sl, lumen, depth_mm, gas=T["gas"]):
    """Turn the (world-)anterior ``depth_mm`` of a lumen into gas (supine air-fluid level)."""
    if not bool(lumen.any()):
        return
    yw = f.world_points(sl)[1]
    top = float(yw[lumen].max())
    cv.put(sl, lumen & (yw > top - depth_mm), gas, None)


def rasterize(anat: Anatomy, noise: SubjectNoise, f: CoordField) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint one acquisition: returns (tissue, label) (D,H,W) uint8 tensors (tissue ids index ``TISSUES``)."""
    S, prm = anat.shapes, anat.params
    body = Body(anat)
    cv = Canvas(f.shape)
    shell = max(1.5, 0.5 * f.spacing)

    # 1. body layers on the whole grid: skin, subcutaneous fat, muscle wall, visceral fat
    P = f.atlas
    sec = _Section(P, body.Y0, anat)
    outside = body.r(P, body.outer, sec) >= 1.0
    inside = body.r(P, body.fat, sec) < 1.0
    cav = body.r(P, body.cav, sec) < 1.0
    zd = body.diaphragm_z(P)
    abd = cav & (P[2] < zd - 5.0)
    cv.tissue[~outside] = T["skin"]
    cv.tissue[inside] = T["fat"]
    muscle_outer = body.r(P, body.muscle, sec) < 1.0
    cv.tissue[muscle_outer] = T["muscle"]
    del sec
    cv.tissue[cav] = T["fat"]

    # 2. thorax: lungs with vessels above the diaphragm, the diaphragm muscle, the heart
    media = ((P[0] + 8.0) / 48.0) ** 2 + ((P[1] - 60.0 * prm["fy"]) / 85.0) ** 2 < 1.0
    yv = torch.as_tensor(np.interp(P[2].numpy(), anat.spine["z_tab"], anat.spine["y_tab"]).astype(np.float32))
    spine_zone = (P[0] / 42.0) ** 2 + ((P[1] - yv + 15.0) / 42.0) ** 2 < 1.0
    lung = cav & (P[2] > zd) & ~media & ~spine_zone
    cv.tissue[lung] = T["lung"]
    cv.tissue[cav & (P[2] <= zd) & (P[2] > zd - 5.0)] = T["muscle"]
    sl = f.crop((-200, -150, 0), (200, 250, 500))
    if sl is not None:
        n = noise.lung.sample(f.points(sl))
        vessel = (n[0].square() + n[1].square()) < 0.05
        cv.put(sl, vessel & lung[sl], T["lung_vessel"], 0)
    _paint(cv, f, S["heart"], T["heart"], 0, clip=cav & (P[2] > zd + 2.0))
    del media, spine_zone, lung, yv

    # 3. hollow organs of the lower abdomen: small bowel loops, colon, duodenum, bladder, ureters
    fz = prm["fz"]
    sl = f.crop((-body.cav[0], 10.0, -240.0 * fz), (body.cav[0], 200.0, -20.0 * fz))
    if sl is not None:
        Pb = f.points(sl)
        n = noise.bowel.sample(Pb)
        q = (n[0].square() + n[1].square()).sqrt()
        taper = _smoothstep(Pb[2], -235.0 * fz, -200.0 * fz) * (1.0 - _smoothstep(Pb[2], -70.0 * fz, -25.0 * fz))
        taper = taper * _smoothstep(Pb[1], 5.0, 30.0) * (1.0 - _smoothstep(Pb[0].abs(), body.cav[0] - 40.0, body.cav[0]))
        w = 1.0 * prm["bowel_fill"] * taper
        region = abd[sl]
        loop = region & (q < w)
        lumen = region & (q < w - 0.25)
        cv.put(sl, loop, T["bowel_wall"], 0)
        cv.put(sl, lumen, T["bowel_fluid"], 0)
        gas_thr = float(np.sqrt(2.0) * _erfinv(1.0 - 2.0 * prm["bowel_gas"]))
        cv.put(sl, lumen & (n[2] > gas_thr), T["gas"], 0)
    out = _paint(cv, f, S["colon"], T["bowel_wall"], 0, noise=noise.organ, ch=ORGAN_CH["colon"], amp=ORGAN_AMP["colon"],
                 clip=abd)
    if out is not None:
        sl, d, m = out
        Pc = f.points(sl)
        d2 = d + 2.5 * noise.fine.sample(Pc, FINE_CH["haustra"])
        lumen = m & (d2 < -3.0)
        yw = f.world_points(sl)[1]
        gas_score = noise.organ.sample(Pc, ORGAN_CH["colon_gas"]) + (yw - float(yw[lumen].mean() if lumen.any() else 0.0)) / 40.0
        gas = lumen & (gas_score > float(np.sqrt(2.0) * _erfinv(1.0 - 2.0 * prm["colon_gas"])))
        cv.put(sl, lumen, T["feces"], 0)
        cv.put(sl, lumen & (noise.fine.sample(Pc, FINE_CH["bubbles"]) > 1.1), T["gas"], 0)
        cv.put(sl, gas, T["gas"], 0)
    out = _paint(cv, f, S["duodenum"], T["bowel_wall"], 0, noise=noise.organ, ch=ORGAN_CH["duodenum"],
                 amp=ORGAN_AMP["duodenum"], clip=abd)
    if out is not None:
        sl, d, m = out
        lumen = m & (d < -3.0)
        cv.put(sl, lumen, T["bowel_fluid"], 0)
        _gas_on_top(cv, f, sl, lumen, 5.0)
    _paint(cv, f, S["bladder"], T["urine"], 0, clip=abd)
    for side in ("right", "left"):
        _paint(cv, f, S[f"ureter_{side}"], T["urine"], 0, clip=abd)

    # 4. solid organs
    out = _paint(cv, f, S["stomach"], T["stomach_wall"], 7, noise=noise.organ, ch=ORGAN_CH["stomach"],
                 amp=ORGAN_AMP["stomach"], clip=abd)
    if out is not None:
        sl, d, m = out
        rug = 2.0 * noise.fine.sample(f.points(sl), FINE_CH["rugae"])
        lumen = m & (d + rug < -4.5)
        cv.put(sl, lumen, T["stomach_fluid"], 7)
        _gas_on_top(cv, f, sl, lumen, prm["stomach_gas_depth"])
    _paint(cv, f, S["liver"], T["liver"], 6, noise=noise.organ, ch=ORGAN_CH["liver"], amp=ORGAN_AMP["liver"], clip=abd)
    in_liver = lambda sl: cv.label[sl] == 6
    for s in S["portal_branches"]:
        _paint(cv, f, s, T["portal_vein"], 6, where=in_liver)
    for s in S["hepatic_veins"]:
        _paint(cv, f, s, T["hepatic_vein"], 6, where=in_liver)
    _paint(cv, f, S["gallbladder"], T["bile"], 4, noise=noise.organ, ch=ORGAN_CH["gallbladder"],
           amp=ORGAN_AMP["gallbladder"], clip=abd)
    _paint(cv, f, S["spleen"], T["spleen"], 1, noise=noise.organ, ch=ORGAN_CH["spleen"], amp=ORGAN_AMP["spleen"], clip=abd)
    out = _paint(cv, f, S["pancreas"], T["pancreas"], 11, noise=noise.organ, ch=ORGAN_CH["pancreas"],
                 amp=ORGAN_AMP["pancreas"], clip=abd)
    if out is not None:
        sl, d, m = out
        Pp = f.points(sl)
        lob = noise.fine.sample(Pp, FINE_CH["lobules"])
        edge = m & (d + 2.0 * lob > 0)          # lobulated outline: the fat between lobules is not pancreas
        cv.put(sl, edge, T["fat"], 0)
        fat = m & ~edge & (noise.fine.sample(Pp, FINE_CH["pancreas_fat"]) > 1.6)
        cv.put(sl, fat, T["fat"], 11)
    for side in ("right", "left"):
        lab = prm["kidney_labels"][side]
        name = f"kidney_{side}"
        out = _paint(cv, f, S[name], T["kidney_cortex"], lab, noise=noise.organ, ch=ORGAN_CH[name],
                     amp=ORGAN_AMP[name], clip=abd)
        if out is not None:
            sl, d, m = out
            pyr = noise.fine.sample(f.points(sl), FINE_CH["pyramids"])
            cv.put(sl, m & (d < -6.5) & (pyr > -0.5), T["kidney_medulla"], lab)
        _paint(cv, f, S[f"{name}_sinus"], T["fat"], lab, clip=abd, where=lambda sl, lab=lab: cv.label[sl] == lab)
        _paint(cv, f, S[f"{name}_pelvis"], T["urine"], lab, clip=abd)
        _paint(cv, f, S[f"adrenal_{side}"], T["adrenal"], 12 if side == "right" else 13, clip=abd)

    # 5. vessels (unlabelled branches first, then the labelled trunks), esophagus
    for s in S["crura"]:
        _paint(cv, f, s, T["muscle"], 0, clip=abd)
    for s in S["arteries"]:
        _paint(cv, f, s, T["artery"], 0, clip=inside)
    for s in S["renal_veins"]:
        _paint(cv, f, s, T["vein"], 0, clip=inside)
    for side in ("right", "left"):
        _paint(cv, f, S[f"iliac_artery_{side}"], T["artery"], 0, clip=inside)
        _paint(cv, f, S[f"iliac_vein_{side}"], T["vein"], 0, clip=inside)
    _paint(cv, f, S["smv_low"], T["portal_vein"], 0, clip=inside)
    _paint(cv, f, S["portal_vein"], T["portal_vein"], 10, clip=inside)
    _paint(cv, f, S["portal_link"], T["portal_vein"], 10, clip=inside)
    _paint(cv, f, S["ivc"], T["vein"], 9, clip=inside)
    _paint(cv, f, S["aorta"], T["artery"], 8, clip=inside)
    out = _paint(cv, f, S["esophagus"], T["esophagus"], 5, clip=inside)
    if out is not None:
        sl, d, m = out
        cv.put(sl, m & (d < -6.0), T["gas"], 5)

    # 6. muscles: the back muscle mass (erector spinae, multifidus) fills the space between the spine and the
    # posterior wall; psoas, quadratus lumborum, erector columns and gluteal muscles on top
    _paint_back_muscles(cv, f, anat, muscle_outer)
    for key in ("psoas", "quadratus", "erector", "gluteus"):
        for s in S[key]:
            _paint(cv, f, s, T["muscle"], 0, clip=inside)

    # 7. bones
    _paint_spine(cv, f, anat, shell)
    for s in S["ribs"] + S["iliac_wings"] + S["femoral_heads"]:
        _paint_bone(cv, f, s, shell, clip=inside)
    for s in S["cartilage"]:
        _paint(cv, f, s, T["cartilage"], 0, clip=inside)

    # nothing outside the skin
    cv.tissue[outside] = T["air"]
    cv.label[outside] = 0
    return cv.tissue, cv.label


def _paint_back_muscles(cv: Canvas, f: CoordField, anat: Anatomy, muscle_outer: torch.Tensor) -> None:
    """Muscle between the vertebral arches and the posterior wall: an ellipse (x half-width ~65 mm) centred
    about 40 mm behind the vertebral body, kept inside the muscle layer (not in the subcutaneous fat)."""
    zt, yt = anat.spine["z_tab"], anat.spine["y_tab"]
    sl = f.crop((-90.0, float(yt.min()) - 130.0, -1000.0), (90.0, float(yt.max()), 1000.0))
    if sl is None:
        return
    P = f.points(sl)
    yv = torch.as_tensor(np.interp(P[2].numpy(), zt, yt).astype(np.float32))
    half = 62.0 * anat.params["fx"]
    m = ((P[0] / half).square() + ((P[1] - yv + 40.0) / 42.0).square() < 1.0) & (P[1] < yv - 12.0)
    cv.put(sl, m & muscle_outer[sl] & (cv.tissue[sl] != T["lung"]), T["muscle"], 0)


def _paint_spine(cv: Canvas, f: CoordField, anat: Anatomy, shell: float) -> None:
    """Vertebrae (bodies with cortical rim, discs, arches, spinous and transverse processes), canal, cord, sacrum.

    Every lumbar/thoracic level has the same local geometry relative to its level centre, so the whole column is
    painted at once from per-voxel local coordinates (x, y - y_vb(z), z - nearest level centre).
    """
    zt, yt = anat.spine["z_tab"], anat.spine["y_tab"]
    sl = f.crop((-75.0, float(yt.min()) - 75.0, -1000.0), (75.0, float(yt.max()) + 25.0, 1000.0))
    if sl is None:
        return
    P = f.points(sl)
    x, y, z = P[0], P[1], P[2]
    H = anat.spine["H"]
    yv = torch.as_tensor(np.interp(z.numpy(), zt, yt).astype(np.float32))
    w = (21.0 - 0.03 * z).clamp(15.0, 26.0)
    dep = (16.0 - 0.015 * z).clamp(13.0, 19.0)
    yl = y - yv
    z_sac = -4.5 * H
    lumbar_thoracic = z > z_sac
    zz = z - torch.round(z / H) * H
    h_vb = (H - 8.0) / 2.0
    ell = ((x / w).square() + (yl / dep).square()).sqrt()
    d_xy = (ell - 1.0) * dep
    d_vb = torch.maximum(d_xy, zz.abs() - h_vb)
    vb = lumbar_thoracic & (d_vb < 0)
    disc = lumbar_thoracic & (d_xy < 0.5) & (zz.abs() >= h_vb)
    # sacrum: wider, flatter, fused, tilting back with the spine curve
    ws = w * (1.0 + 0.8 * _smoothstep(-z, -z_sac, -z_sac + 40.0))
    ell_s = ((x / ws).square() + (yl / (0.8 * dep)).square()).sqrt()
    d_s = (ell_s - 1.0) * 0.8 * dep
    sac = ~lumbar_thoracic & (d_s < 0) & (z > z_sac - 130.0)
    # canal, cord and arch
    rc = torch.where(lumbar_thoracic, torch.full_like(z, 9.0), torch.full_like(z, 6.0))
    cy = -dep - rc
    rr = (x.square() + (yl - cy).square()).sqrt()
    canal = rr < rc
    cord = rr < 4.5
    zr = zz - 2.0
    arch = lumbar_thoracic & (rr >= rc) & (rr < rc + 6.5) & (yl < -dep + 3.0) & (zr.abs() < h_vb * 0.8)
    # processes: capsules in level-local coordinates
    def capsule(px, py, pz, qx, qy, qz, r):
        ax, ay, az = qx - px, qy - py, qz - pz
        L2 = ax * ax + ay * ay + az * az
        t = (((x - px) * ax + (yl - py) * ay + (zz - pz) * az) / L2).clamp(0.0, 1.0)
        return ((x - px - t * ax).square() + (yl - py - t * ay).square() + (zz - pz - t * az).square()).sqrt() - r
    sp_len = torch.where(z > 40.0, torch.full_like(z, 30.0), torch.full_like(z, 36.0))
    d_sp = capsule(0.0, cy - rc - 2.0, 0.0, 0.0, cy - rc - sp_len, -10.0 - 0.08 * z.clamp(min=0.0), 5.0)
    tp = torch.where(z > 40.0, w + 8.0, w + 16.0)
    tpy = torch.where(z > 40.0, cy - 12.0, cy + 1.0)
    d_tr = torch.minimum(capsule(8.0, cy + 2.0, 3.0, tp, tpy, 3.0, 4.0), capsule(-8.0, cy + 2.0, 3.0, -tp, tpy, 3.0, 4.0))
    d_proc = torch.minimum(d_sp, d_tr)
    proc = lumbar_thoracic & (d_proc < 0)
    inside = (cv.tissue[sl] != T["air"]) & (cv.tissue[sl] != T["skin"])
    cv.put(sl, inside & disc, T["disc"], 0)
    cv.put(sl, inside & (arch | proc), T["bone_cortical"], 0)
    cv.put(sl, inside & proc & (d_proc < -shell), T["bone_cancellous"], 0)
    cv.put(sl, inside & vb, T["bone_cortical"], 0)
    cv.put(sl, inside & vb & (d_vb < -shell), T["bone_cancellous"], 0)
    cv.put(sl, inside & sac, T["bone_cortical"], 0)
    cv.put(sl, inside & sac & (d_s < -shell), T["bone_cancellous"], 0)
    cv.put(sl, inside & canal, T["csf"], 0)
    cv.put(sl, inside & canal & cord & (z > -25.0), T["spinal_cord"], 0)


def _erfinv(y: float) -> float:
    """Inverse error function (scalar), for Gaussian thresholds that leave a given fraction above."""
    return float(torch.special.erfinv(torch.tensor(float(np.clip(y, -0.999999, 0.999999)), dtype=torch.float64)))
