"""Anatomy of one synthetic abdominal subject: nominal shapes plus per-subject variation (numpy only).

The body frame (the "atlas") is in millimetres, RAS: x towards the patient's Right, y Anterior, z Superior,
with the origin at the centre of the first lumbar vertebral body (L1). Every structure is a shape from
:mod:`.phantom_geometry` (ellipsoids and tubes around polylines, smoothly united, later roughened by smooth
noise). :func:`sample_anatomy` draws one subject: body habitus (subcutaneous fat, muscle, cavity size), spine
curvature and level height, diaphragm dome heights, and for every organ group a size change (volume x0.75..1.25
plus +-5 % per axis), a displacement of 5-15 mm and a rotation of a few degrees. The rasteriser
(:mod:`.phantom_raster`) paints these shapes at deformed coordinates (anatomy field, breathing, pose).

Nominal positions were read off a real contrast CT (TotalSegmentator test case, ../shared/data/real), as
offsets from the L1 vertebral body: liver right (+x) and anterior, spleen left (-x) and posterior, right kidney
lower than the left, pancreas crossing the midline in front of the aorta, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .phantom_geometry import Ellipsoid, Subtract, Tube, Union, rotation_matrix, smooth_path

MIRROR = np.diag([-1.0, 1.0, 1.0])

# --------------------------------------------------------------------------------------------- tissues

TISSUES = (
    "air", "fat", "skin", "muscle", "bone_cancellous", "bone_cortical", "csf", "spinal_cord", "disc", "lung",
    "lung_vessel", "heart", "bowel_wall", "bowel_fluid", "gas", "feces", "liver", "hepatic_vein", "spleen",
    "kidney_cortex", "kidney_medulla", "urine", "bile", "stomach_wall", "stomach_fluid", "pancreas", "adrenal",
    "artery", "vein", "portal_vein", "esophagus", "cartilage",
)
T = {name: i for i, name in enumerate(TISSUES)}

# Learn2Reg AbdomenCTCT label ids
LABELS = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas", 12: "right adrenal gland",
    13: "left adrenal gland",
}

# --------------------------------------------------------------------------------------- nominal anatomy
# Control points are (x, y, z) mm in the body frame; radii in mm. Points marked "spine-relative" below get
# y_vb(z) (the vertebral body centre line) added to their y.

LIVER_BLOBS = [  # centre, semi-axes, rotation (deg about x, y, z)
    ((70, 50, 32), (73, 79, 90), (0, 0, -10)),
    ((86, 40, -30), (47, 49, 51), (0, 0, 0)),
    ((8, 88, 52), (56, 42, 44), (0, 0, 0)),
    ((-46, 92, 60), (49, 29, 33), (0, 0, 15)),
    ((22, 36, 44), (26, 26, 37), (0, 0, 0)),
]
GALLBLADDER = ((56, 92, -10), (14, 16, 36), (35, 0, -20))
SPLEEN = ((-98, -4, 24), (27, 57, 66), (0, 0, -32))
SPLEEN_HILUM = ((-68, 12, 24), (20, 28, 34))
KIDNEY_CENTRE = {"right": (80, 4, -40), "left": (-76, 0, -27)}
# kidney local frame: +x lateral, hilum at -x; rotation makes the hilum face antero-medially, upper pole medial
KIDNEY_AXES = (28, 26, 57)
KIDNEY_HILUM = ((-25, 6, 0), (12, 10, 22))
KIDNEY_SINUS = ((-11, 4, 0), (12, 10, 30))
KIDNEY_PELVIS = [((-12, 4, 0), (7, 6, 17)), ((-26, 5, -4), (8, 7, 9))]
KIDNEY_ROT = (-10, -12, -30)  # deg about x (upper pole posterior), y (upper pole medial), z (hilum anterior)
ADRENAL = {  # (points, radii)
    "right": (((40, 20, 36), (40, 12, 20), (35, 6, 4)), (4.6, 4.6, 3.6)),
    "right_limb": (((40, 12, 20), (50, 6, 6)), (4.2, 3.4)),
    "left": (((-36, 34, 30), (-38, 26, 14), (-34, 22, -4)), (4.6, 4.6, 3.6)),
    "left_limb": (((-38, 26, 14), (-48, 18, 2)), (4.2, 3.4)),
}
PANCREAS = (((36, 60, -36), (34, 66, -18), (18, 78, -8), (2, 84, -4), (-22, 80, 2), (-48, 66, 10), (-72, 46, 18),
             (-86, 32, 22)), (12, 16, 12, 10, 11, 10, 9, 8))
PORTAL = (((44, 54, 32), (36, 54, 22), (24, 58, 8), (12, 64, -8)), (6, 7.5, 7.5, 7))
SPLENIC_VEIN = (((12, 64, -8), (-10, 66, 0), (-35, 63, 6), (-60, 49, 14), (-82, 30, 20)), (7, 5.5, 5, 5, 5))
SMV = (((12, 64, -8), (14, 72, -30), (14, 78, -45)), (7, 6.5, 6))
SMV_LOW = (((14, 78, -45), (14, 82, -80), (12, 86, -130)), (6, 5, 4))
PORTAL_BRANCHES = [(((44, 54, 32), (75, 48, 36), (98, 40, 26)), (5.5, 4, 2.5)),
                   (((44, 54, 32), (15, 74, 46), (-22, 90, 56)), (5, 3.5, 2.5))]
HEPATIC_VEINS = [(((98, 34, 8), (62, 40, 48), (28, 42, 80)), (2.5, 4.5, 6.5)),
                 (((46, 92, 8), (36, 66, 54), (24, 46, 82)), (2.5, 4, 6)),
                 (((-30, 94, 44), (0, 70, 70), (20, 48, 84)), (2.5, 4, 5.5))]
STOMACH = (((-25, 52, 62), (-48, 42, 78), (-64, 60, 56), (-62, 88, 26), (-42, 106, -2), (-10, 110, -14),
            (18, 102, -10), (34, 92, -4)), (11, 30, 34, 32, 27, 19, 14, 9))
DUODENUM = (((34, 92, -4), (52, 86, -2), (62, 70, -12), (63, 62, -44), (52, 56, -68), (20, 52, -76),
             (-15, 56, -72), (-32, 62, -52), (-38, 72, -36)), (9, 13, 13, 13, 13, 12, 12, 12, 11))
COLON = (((68, 55, -150), (82, 45, -100), (86, 45, -62), (82, 72, -44), (45, 112, -60), (0, 124, -76),
          (-45, 110, -52), (-78, 78, -22), (-92, 46, -10), (-98, 20, -60), (-96, 24, -120), (-80, 55, -170),
          (-40, 80, -190), (-5, 45, -200), (0, -20, -240), (0, -35, -300)),
         (30, 26, 24, 24, 22, 22, 22, 22, 22, 20, 19, 18, 18, 18, 20, 18))
# vessels along the spine: (x, y offset in front of the vertebral body surface, z), radius
AORTA = ((-18, 320, 13), (-14, 150, 12), (-11, 60, 11.5), (-8, 0, 11), (-6, -60, 10), (-3, -100, 9))
IVC = ((12, -112, 10, -4), (20, -60, 11, -2), (23, 0, 12, 2), (26, 40, 12, 14), (24, 80, 13, 22),
       (18, 100, 14, 30))  # x, z, r, extra y
ESOPHAGUS = (((-2, 40, 300), (-5, 38, 150), (-12, 40, 92)), ((-22, 50, 68), (-28, 54, 60)))
PSOAS = ((24, 6, 30, 6), (32, 8, -10, 11), (40, 10, -60, 16), (50, 12, -110, 21), (62, 20, -160, 23),
         (72, 40, -210, 21), (78, 60, -260, 19))  # |x|, y offset from y_vb, z, r
QUADRATUS = ((45, -30, 20, 6), (58, -36, -40, 12), (70, -36, -110, 11), (84, -30, -150, 6))  # |x|, y, z, r
ERECTOR = ((18, -46, 340, 17), (20, -52, 100, 21), (21, -54, 0, 23), (20, -52, -120, 22), (17, -46, -200, 16),
           (14, -40, -260, 9))  # |x|, y offset, z, r (medial column)
ERECTOR_LATERAL = ((40, -40, 300, 14), (42, -44, 100, 18), (44, -46, 0, 20), (42, -44, -120, 18), (34, -40, -200, 12))


def smoothstep(x, lo, hi):
    t = np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ------------------------------------------------------------------------------------------ placements

@dataclass
class Placement:
    """Per-subject pose and size of one organ group: p -> new_pivot + s * R (p - pivot)."""

    pivot: np.ndarray
    new_pivot: np.ndarray
    R: np.ndarray
    s: float

    def point(self, p) -> np.ndarray:
        p = np.atleast_2d(np.asarray(p, np.float64))
        out = self.new_pivot + self.s * (p - self.pivot) @ self.R.T
        return out

    def ellipsoid(self, c, a, rot_deg=(0, 0, 0), jitter=None, mirror=False) -> Ellipsoid:
        R0 = rotation_matrix(rot_deg)
        if mirror:
            R0 = MIRROR @ R0 @ MIRROR
        a = np.asarray(a, np.float64) * self.s * (1.0 if jitter is None else jitter)
        return Ellipsoid(self.point(c)[0], a, self.R @ R0)

    def tube(self, pts, radii, n_sub=3, scale_r=True) -> Tube:
        p, r = smooth_path(self.point(pts), np.asarray(radii, np.float64) * (self.s if scale_r else 1.0), n_sub)
        return Tube(p, r)


@dataclass
class Anatomy:
    """All per-subject shape parameters in the body frame (see the module docstring).

    Attributes:
        body: habitus numbers (mm): cavity half-width ``a_cav``, anterior cavity extent ``y_cav_ant``, posterior
            cavity extent ``y_cav_post``, ``t_fat``, ``t_muscle``, ``t_skin``, posterior body extent ``y_post``.
        spine: ``H`` (level height, mm), ``z_tab``/``y_tab`` (vertebral body centre line y_vb(z)).
        diaphragm: dome apex heights ``zR``, ``zL`` (mm).
        shapes: name -> shape (Ellipsoid / Tube / Union / Subtract).
        params: other scalars (stomach gas depth, bowel gas fraction, bladder filling, ...).
        placements: organ group -> :class:`Placement` (kept for inspection and tests).
    """

    body: dict
    spine: dict
    diaphragm: dict
    shapes: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    placements: dict = field(default_factory=dict)

    def y_vb(self, z) -> np.ndarray:
        """Vertebral body centre y (mm) at heights z (mm)."""
        return np.interp(z, self.spine["z_tab"], self.spine["y_tab"])

    def vb_depth(self, z) -> np.ndarray:
        """Vertebral body half depth (antero-posterior, mm) at heights z."""
        return np.clip(16.0 - 0.015 * np.asarray(z, np.float64), 13.0, 19.0)

    def vb_width(self, z) -> np.ndarray:
        """Vertebral body half width (mm) at heights z."""
        return np.clip(21.0 - 0.03 * np.asarray(z, np.float64), 15.0, 26.0)


def _random_rotation(rng, sd_deg):
    return rotation_matrix(np.clip(rng.normal(0, sd_deg, 3), -2.5 * sd_deg, 2.5 * sd_deg))


def _random_shift(rng, lo_mm, hi_mm):
    v = rng.normal(size=3)
    return v / np.linalg.norm(v) * rng.uniform(lo_mm, hi_mm)


def _size_factor(rng, spread=0.25):
    """Linear scale whose cube (volume factor) is uniform in [1-spread, 1+spread]."""
    return float(rng.uniform(1 - spread, 1 + spread) ** (1 / 3))


def sample_anatomy(rng: np.random.Generator, *, variation: float = 1.0) -> Anatomy:
    """Draw one subject's anatomy (all shapes in the body frame, mm).

    Args:
        rng: numpy random generator (the subject's seed).
        variation: multiplies every between-subject variation (0 gives the nominal anatomy).
    """
    v = float(variation)

    def U(lo, hi, mid=None):  # uniform draw shrunk towards the middle by `variation`
        mid = 0.5 * (lo + hi) if mid is None else mid
        return mid + v * (rng.uniform(lo, hi) - mid)

    # habitus
    body = dict(a_cav=U(110, 136), y_cav_ant=U(120, 152), y_cav_post=-45.0, t_fat=U(8, 40, 22),
                t_muscle=U(8, 15), t_skin=2.5)
    body["y_post"] = -80.0 - 0.7 * body["t_fat"] - body["t_skin"]
    # the retroperitoneal fat reaches back to the posterior wall muscles (the spine and paraspinal muscles are
    # painted over it)
    body["y_cav_post"] = body["y_post"] + body["t_skin"] + 0.7 * body["t_fat"] + 0.8 * body["t_muscle"]
    fx, fy = body["a_cav"] / 123.0, body["y_cav_ant"] / 136.0

    # spine: level height and curvature (lordosis amplitude)
    H = U(30.0, 36.0)
    fz = H / 33.0
    lord = U(0.6, 1.4, 1.0)
    z_tab = np.array([-340, -250, -200, -150, -90, -30, 30, 100, 200, 340], np.float64) * fz
    y_tab = np.array([-70, -40, -10, 8, 14, 6, -2, -8, -22, -45], np.float64)
    y_tab = np.where(y_tab > 0, y_tab * lord, y_tab)
    spine = dict(H=H, z_tab=z_tab, y_tab=y_tab)
    diaphragm = dict(zR=U(94.0, 113.0) * fz)
    diaphragm["zL"] = diaphragm["zR"] - U(8.0, 25.0)
    # organs under a dome follow its height (a low dome must not cut the liver or spleen)
    dz_right = diaphragm["zR"] - 103.5 * fz
    dz_left = diaphragm["zL"] - (103.5 * fz - 16.5)
    anat = Anatomy(body, spine, diaphragm)

    def habitus(p):
        p = np.asarray(p, np.float64)
        return np.array([p[0] * fx, p[1] * fy if p[1] > 0 else p[1], p[2] * fz])

    def place(name, pivot, shift=(5, 15), rot_sd=4.0, size=0.25, dz=0.0):
        pivot = np.asarray(pivot, np.float64)
        t = _random_shift(rng, *shift) * v + np.array([0.0, 0.0, dz])
        R = _random_rotation(rng, rot_sd * v) if v > 0 else np.eye(3)
        s = 1.0 + v * (_size_factor(rng, size) - 1.0)
        pl = Placement(pivot, habitus(pivot) + t, R, s)
        anat.placements[name] = pl
        return pl

    def axis_jitter():
        return 1.0 + v * rng.uniform(-0.05, 0.05, 3)

    S = anat.shapes
    # liver (+ gallbladder and intrahepatic vessels, which move with it)
    pl = place("liver", (55, 55, 30), size=0.15, dz=0.9 * dz_right)
    S["liver"] = Union([pl.ellipsoid(c, a, r, axis_jitter()) for c, a, r in LIVER_BLOBS], k=22.0)
    # gallbladder: hangs under the liver, moves with it plus a small displacement of its own
    gb_c = pl.point(GALLBLADDER[0])[0] + v * _random_shift(rng, 2, 7)
    gb_s = 1.0 + v * (_size_factor(rng, 0.3) - 1.0)
    S["gallbladder"] = Ellipsoid(gb_c, np.asarray(GALLBLADDER[1]) * gb_s * axis_jitter(),
                                 pl.R @ _random_rotation(rng, 6.0 * v) @ rotation_matrix(GALLBLADDER[2]))
    S["portal_branches"] = [pl.tube(p, r, scale_r=False) for p, r in PORTAL_BRANCHES]
    S["hepatic_veins"] = [pl.tube(p, r, scale_r=False) for p, r in HEPATIC_VEINS]

    # spleen
    pl = place("spleen", SPLEEN[0], dz=0.9 * dz_left)
    S["spleen"] = Subtract(pl.ellipsoid(SPLEEN[0], SPLEEN[1], SPLEEN[2], axis_jitter()),
                           pl.ellipsoid(*SPLEEN_HILUM), k=10.0)

    # kidneys (left = mirror image of the right, placed higher)
    for side, label in (("right", 2), ("left", 3)):
        c = np.asarray(KIDNEY_CENTRE[side], np.float64)
        m = side == "left"
        pl = place(f"kidney_{side}", c, dz=0.3 * (dz_left if m else dz_right))
        Rk = rotation_matrix(KIDNEY_ROT)
        if m:
            Rk = MIRROR @ Rk @ MIRROR
        loc = (lambda q: c + Rk @ (MIRROR @ np.asarray(q, np.float64) if m else np.asarray(q, np.float64)))
        jit = axis_jitter()
        outer = Ellipsoid(pl.point(c)[0], np.asarray(KIDNEY_AXES) * pl.s * jit * (0.97 if m else 1.0), pl.R @ Rk)
        hil = Ellipsoid(pl.point(loc(KIDNEY_HILUM[0]))[0], np.asarray(KIDNEY_HILUM[1]) * pl.s, pl.R @ Rk)
        S[f"kidney_{side}"] = Subtract(outer, hil, k=6.0)
        S[f"kidney_{side}_sinus"] = Ellipsoid(pl.point(loc(KIDNEY_SINUS[0]))[0], np.asarray(KIDNEY_SINUS[1]) * pl.s,
                                              pl.R @ Rk)
        S[f"kidney_{side}_pelvis"] = Union([Ellipsoid(pl.point(loc(cc))[0], np.asarray(aa) * pl.s, pl.R @ Rk)
                                           for cc, aa in KIDNEY_PELVIS], k=4.0)
        hilum = pl.point(loc((-30, 5, -6)))[0]
        S[f"kidney_{side}_hilum"] = hilum
        sx = -1.0 if m else 1.0
        # ureter: from the hilum down along the front of the psoas into the pelvis
        ure = [hilum, hilum + np.array([-4 * sx, 4, -30]), (sx * 42 * fx, 18, -140 * fz), (sx * 48 * fx, 30, -220 * fz),
               (sx * 30, 50, -255 * fz)]
        S[f"ureter_{side}"] = Tube(*smooth_path(np.asarray(ure), np.full(len(ure), 2.8), 3))
        # adrenal gland above and medial to the upper pole (own small displacement)
        ap, ar = ADRENAL[side]
        lp, lr = ADRENAL[f"{side}_limb"]
        pa = place(f"adrenal_{side}", ap[1], shift=(3, 9), rot_sd=6.0, size=0.25, dz=0.4 * (dz_left if m else dz_right))
        S[f"adrenal_{side}"] = Union([pa.tube(ap, ar, n_sub=2), pa.tube(lp, lr, n_sub=2)], k=2.0)
    anat.params["kidney_labels"] = {"right": 2, "left": 3}

    # pancreas with the portal / splenic vein that runs behind it
    pl = place("pancreas", (0, 70, -5))
    S["pancreas"] = pl.tube(*PANCREAS)
    S["portal_vein"] = Union([pl.tube(*PORTAL, scale_r=False), pl.tube(*SPLENIC_VEIN, scale_r=False),
                              pl.tube(*SMV, scale_r=False)], k=3.0)
    S["smv_low"] = pl.tube(*SMV_LOW, scale_r=False)
    # the portal vein must reach the liver hilum even when liver and pancreas moved apart
    hil_liver = anat.placements["liver"].point(PORTAL[0][0])[0]
    S["portal_link"] = Tube(np.stack([pl.point(PORTAL[0][1])[0], hil_liver]), np.array([7.0, 6.0]))

    # stomach, duodenum, colon
    pl = place("stomach", (-40, 75, 30), dz=0.6 * dz_left)
    dist = U(0.65, 1.15, 0.9)
    r = np.asarray(STOMACH[1], np.float64) * np.r_[1.0, [dist] * 6, 1.0]
    S["stomach"] = pl.tube(STOMACH[0], r, n_sub=2)
    anat.params["stomach_gas_depth"] = U(3.0, 25.0)
    pl_d = place("duodenum", (30, 70, -40), shift=(3, 10), size=0.15)
    S["duodenum"] = pl_d.tube(*DUODENUM, n_sub=2)
    pl = place("colon", (0, 60, -80), shift=(4, 12), size=0.2)
    S["colon"] = pl.tube(*COLON, n_sub=2)
    anat.params["colon_gas"] = U(0.1, 0.45)
    anat.params["bowel_gas"] = U(0.03, 0.2)
    anat.params["bowel_fill"] = U(0.75, 1.1)

    # great vessels along the spine
    def along_spine(pts):  # (x, z, r, dy) -> points/radii in front of the vertebral body
        p, rr = [], []
        for x, z, r_, dy in pts:
            z = z * fz
            p.append((x, anat.y_vb(z) + anat.vb_depth(z) + r_ + 1.0 + dy, z))
            rr.append(r_)
        return np.asarray(p), np.asarray(rr)

    ap_, ar_ = along_spine([(x, z, r_, 0.0) for x, z, r_ in AORTA])
    ap_ += np.r_[v * rng.normal(0, 3, 2), 0.0]
    S["aorta"] = Tube(*smooth_path(ap_, ar_, 3))
    bif = ap_[-1]
    for sx in (1.0, -1.0):
        pts = [bif, bif + (sx * 20, 6, -38 * fz), bif + (sx * 40, 12, -80 * fz), bif + (sx * 62, 30, -140 * fz)]
        S[f"iliac_artery_{'right' if sx > 0 else 'left'}"] = Tube(*smooth_path(np.asarray(pts), np.r_[8, 7, 6.5, 6], 3))
    ip_, ir_ = along_spine([(x, z, r_, dy) for x, z, r_, dy in IVC])
    # the retro-hepatic IVC moves with the liver
    liver_t = anat.placements["liver"].new_pivot - habitus(anat.placements["liver"].pivot)
    ip_[3:] += liver_t * 0.7
    ip_ += np.r_[v * rng.normal(0, 3, 2), 0.0]
    S["ivc"] = Tube(*smooth_path(ip_, ir_, 3))
    conf = ip_[0]
    for sx in (1.0, -1.0):
        pts = [conf, conf + (sx * 22 + 8, -4, -40 * fz), conf + (sx * 40 + 8, 4, -85 * fz), conf + (sx * 55, 22, -140 * fz)]
        S[f"iliac_vein_{'right' if sx > 0 else 'left'}"] = Tube(*smooth_path(np.asarray(pts), np.r_[9, 8, 7.5, 7], 3))
    # aortic branches (celiac, hepatic, splenic, superior mesenteric, renal arteries) and renal veins
    def aorta_xy(z):  # aorta centre (x, y) at height z
        zs = ap_[:, 2][::-1]
        return np.interp(z, zs, ap_[:, 0][::-1]), np.interp(z, zs, ap_[:, 1][::-1])

    cel = np.array([*aorta_xy(24.0), 24.0]) + (0, 8, 0)
    hil_l = anat.placements["liver"].point(PORTAL[0][0])[0]
    spl_h = anat.placements["spleen"].point((-72, 20, 26))[0]
    sma0 = np.array([*aorta_xy(10.0), 10.0]) + (0, 8, 0)
    branches = [
        ([cel, cel + (0, 22, 6)], [4.0, 4.0]),
        ([cel + (0, 22, 6), hil_l + (-8, 4, -4)], [3.2, 3.0]),
        ([cel + (0, 22, 6), cel + (-30, 14, 2), spl_h], [3.2, 3.0, 3.0]),
        ([sma0, sma0 + (1, 28, -14), sma0 + (-2, 42, -60), sma0 + (-4, 52, -120)], [4.2, 4.0, 3.5, 3.0]),
    ]
    for side in ("right", "left"):
        h = S[f"kidney_{side}_hilum"]
        z_r = h[2] + 8
        a0 = np.array([*aorta_xy(z_r), z_r]) + (0, -2, 0)
        branches.append(([a0, 0.5 * (a0 + h) + (0, -6, 0), h + (0, -4, 0)], [3.4, 3.0, 3.0]))
    S["arteries"] = [Tube(*smooth_path(np.asarray(p, np.float64), np.asarray(r_), 3)) for p, r_ in branches]
    veins = []
    for side in ("right", "left"):
        h = S[f"kidney_{side}_hilum"]
        z_v = h[2] + (2 if side == "right" else 0)
        ivc_x = np.interp(z_v, ip_[:, 2], ip_[:, 0])
        ivc_y = np.interp(z_v, ip_[:, 2], ip_[:, 1])
        if side == "left":  # crosses in front of the aorta
            mid = np.array([*aorta_xy(z_v), z_v]) + (0, 15, 0)
            pts = [h + (0, 4, 0), 0.5 * (h + mid) + (0, 6, 0), mid, (ivc_x, ivc_y, z_v + 2)]
        else:
            pts = [h + (0, 4, 0), (ivc_x, ivc_y, z_v + 2)]
        veins.append(Tube(*smooth_path(np.asarray(pts, np.float64), np.full(len(pts), 5.0), 3)))
    S["renal_veins"] = veins

    # esophagus: in front of the spine / aorta, through the hiatus into the cardia of the stomach
    up = [(x, anat.y_vb(z * fz) + dy, z * fz) for x, dy, z in ESOPHAGUS[0]]
    cardia = anat.placements["stomach"].point(STOMACH[0][0])[0]
    low = [np.asarray(ESOPHAGUS[1][0], np.float64), cardia]
    low[0] = 0.5 * (low[0] + cardia) + np.array([0.0, 0.0, 10.0])
    S["esophagus"] = Tube(*smooth_path(np.vstack([up, low]), np.r_[8.0, 8.0, 8.5, 9.0, 9.5], 3))

    # heart (sits on the diaphragm) and diaphragmatic crura
    zc = 0.5 * (diaphragm["zR"] + diaphragm["zL"])
    S["heart"] = Ellipsoid(np.array([-18.0, 72.0 * fy, zc + 52.0]), np.array([62.0, 48.0, 56.0]) * U(0.9, 1.1, 1.0),
                           rotation_matrix((0, 18, -30)))
    S["crura"] = [Tube(*smooth_path(np.asarray([(15, 30, 70), (12, 22, 20), (8, 15, -40)], np.float64) * (1, 1, fz)
                                    + np.r_[0, anat.y_vb(0.0), 0], np.r_[5, 5, 4], 3)),
                  Tube(*smooth_path(np.asarray([(-22, 30, 66), (-16, 20, 10), (-10, 14, -30)], np.float64) * (1, 1, fz)
                                    + np.r_[0, anat.y_vb(0.0), 0], np.r_[4.5, 4.5, 3.5], 3))]

    # muscles along the spine
    def paired(table, spine_rel):
        out = []
        for sx in (1.0, -1.0):
            p = []
            for ax_, y, z, r_ in table:
                z = z * fz
                yy = y + (anat.y_vb(z) if spine_rel else 0.0)
                p.append((sx * ax_ * (fx if abs(ax_) > 40 else 1.0), yy, z))
            out.append(Tube(*smooth_path(np.asarray(p), np.asarray([t[3] for t in table], np.float64) * U(0.85, 1.15, 1.0), 3)))
        return out
    S["psoas"] = paired(PSOAS, True)
    S["quadratus"] = paired(QUADRATUS, False)
    S["erector"] = paired(ERECTOR, True) + paired(ERECTOR_LATERAL, True)
    S["gluteus"] = [Ellipsoid(np.array([sx * 88.0 * fx, -40.0, -235.0 * fz]), np.array([52.0, 42.0, 70.0]))
                    for sx in (1.0, -1.0)]

    # pelvis: iliac wings, femoral heads, bladder
    S["iliac_wings"] = [Ellipsoid(np.array([sx * 92.0 * fx, 8.0, -200.0 * fz]), np.array([58.0, 8.0, 48.0]),
                                  rotation_matrix((0, sx * 15, -sx * 38))) for sx in (1.0, -1.0)]
    S["femoral_heads"] = [Ellipsoid(np.array([sx * 88.0 * fx, 40.0, -290.0 * fz]), np.array([24.0, 24.0, 24.0]))
                          for sx in (1.0, -1.0)]
    fill = U(0.6, 1.2, 0.9)
    S["bladder"] = Ellipsoid(np.array([0.0, 60.0, -255.0 * fz]), np.array([45.0, 36.0, 34.0]) * fill)

    # ribs 4..12: heads at their thoracic level, running round the cavity and down, then costal cartilage
    ribs, cart = [], []
    A = body["a_cav"] + 5.0
    yA = body["y_cav_ant"] + 4.0
    B = 0.5 * (yA + 38.0)
    y0 = -38.0 + B
    for k in range(4, 13):
        z_head = (13 - k) * H + 8.0
        end = {11: 1.75, 12: 1.25}.get(k, 2.25 - 0.02 * (k - 4))
        drop = 60.0 + 6.0 * (k - 4)
        phis = np.linspace(0.45, end, 9)
        for sx in (1.0, -1.0):
            w = float(anat.vb_width(z_head))
            head = np.array([sx * (w + 8.0), anat.y_vb(z_head) - 4.0, z_head])
            arc = np.stack([sx * A * np.sin(phis), y0 - B * np.cos(phis), z_head - drop * (phis / np.pi) ** 0.8], 1)
            ribs.append(Tube(np.vstack([head, arc]), np.full(len(arc) + 1, 4.5)))
            if k <= 10:
                cphi = np.linspace(end, np.pi - 0.12, 4)
                z_end = arc[-1, 2]
                z_tip = zc + 10.0 if k >= 7 else z_head - drop * 0.75
                cz = z_end + (z_tip - z_end) * np.linspace(0, 1, 4) ** 1.5
                cc = np.stack([sx * A * np.sin(cphi), y0 - B * np.cos(cphi), cz], 1)
                cart.append(Tube(*smooth_path(cc, np.full(4, 4.0), 2)))
    S["ribs"] = ribs
    S["cartilage"] = cart
    anat.params["fx"], anat.params["fy"], anat.params["fz"] = fx, fy, fz
    return anat
