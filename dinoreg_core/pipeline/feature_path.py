"""The project's own registration path: features -> joint PCA -> upsampling -> our ConvexAdam.

Every extractor of :mod:`dinoreg_core.features.registry` becomes a registration method through
:func:`feature_registration_method`; :func:`dinoreg_core.api.register`, the CLI, the runner, the notebooks and the
benchmarks all reach it through :mod:`.methods`, so ``mind`` or ``dino3d`` mean the same code wherever a number is
printed.

Options (:class:`FeaturePathOptions`): ``pca_dim``, ``seed``, ``feature_scale`` (the features, after PCA and
upsampling, are multiplied by it before ConvexAdam: both SSD costs scale by its square, so it trades the data term
against the coupling and ``lambda_weight`` regularisation), ``convex`` (a
:class:`~dinoreg_core.registration.convex_adam.ConvexAdamConfig`) and ``feature_options`` (checked against the
extractor's own options dataclass). The ``--set`` short forms are accepted as keys: a ConvexAdam field by its own name
(``grid_sp``) and a feature option as ``feat.NAME``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .. import settings
from ..errors import DinoregError
from ..features.pca import joint_project, upsample
from ..features.registry import checked_options, get_feature_method
from ..preprocess import normalize_intensity
from ..registration.convex_adam import ConvexAdamConfig, ConvexAdamTimings, convex_adam
from .keys import canonical_key, check_feature_scale
from .displacement import RegistrationMethod, RegistrationOutput


@dataclass
class FeaturePathOptions:
    """Options of a feature registration method (see the module docstring)."""

    pca_dim: int = 12  # channels after joint PCA (methods with joint_pca)
    seed: int = 0  # torch / numpy seed (PCA sampling)
    feature_scale: float = 1.0  # multiplies the (PCA-reduced, upsampled) features handed to ConvexAdam; > 0
    convex: ConvexAdamConfig = field(default_factory=ConvexAdamConfig)
    feature_options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, features: str, options: dict | None) -> "FeaturePathOptions":
        """Strict parse of ``options`` (nested or ``--set`` style keys), feature options checked by the extractor."""
        opts = cls()
        top = {f.name for f in fields(cls)}
        for k, v in (options or {}).items():
            if k in ("feature_options", "feat") and isinstance(v, dict):
                opts.feature_options.update(v)
            elif k == "convex" and isinstance(v, dict):
                settings.apply(opts.convex, v, prefix="convex.")
            else:
                key = canonical_key(str(k), top)
                if isinstance(v, (list, tuple)) and not key.startswith("feature_options."):
                    v = ",".join(map(str, v))
                settings.set_value(opts, key, v)
        opts.convex.validate()
        check_feature_scale(opts.feature_scale)
        opts.feature_options = checked_options(features, opts.feature_options)
        if getattr(get_feature_method(features), "extract_pair", None) is not None:  # a hybrid: check its weights now
            from ..features.hybrid import hybrid_weights

            hybrid_weights(opts.feature_options)
        return opts


def compute_features(method_name: str, fixed_img: np.ndarray, moving_img: np.ndarray, *, fixed_modality: str,
                     moving_modality: str, device: torch.device, pca_dim: int = 12, options: dict | None = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two normalised (D,H,W) images on one grid, ready for ConvexAdam: (1,C,D,H,W) float32 each.

    Applies the method's extractor (a pair method's ``extract_pair`` on both images at once, e.g. the
    ``dino3d+mind`` hybrid), joint PCA to ``pca_dim`` channels when the method asks for it, and trilinear
    upsampling (:func:`dinoreg_core.features.pca.upsample`) to the image grid.
    """
    method = get_feature_method(method_name)
    opts = dict(options or {})
    ft = torch.from_numpy(np.ascontiguousarray(fixed_img))[None, None].to(device)
    mt = torch.from_numpy(np.ascontiguousarray(moving_img))[None, None].to(device)
    with torch.no_grad():
        if getattr(method, "extract_pair", None) is not None:  # a pair method (hybrids): both images at once
            ff, mf = method.extract_pair(ft, mt, fixed_modality=fixed_modality, moving_modality=moving_modality,
                                         device=device, options=opts, pca_dim=pca_dim, seed=seed)
        else:
            ff = method.extract(ft, modality=fixed_modality, device=device, options=opts)
            mf = method.extract(mt, modality=moving_modality, device=device, options=opts)
            if method.joint_pca:
                ff, mf = joint_project(ff, mf, k=pca_dim, seed=seed)
        ff, mf = upsample(ff, fixed_img.shape), upsample(mf, fixed_img.shape)
    return ff.float(), mf.float()


def _declared_options(features: str) -> set[str]:
    """Names of the feature options method ``features`` declares (empty when it declares none); for a hybrid
    (``dino3d+mind``) also those of its learned part, which receives them unchanged."""
    from dataclasses import fields

    from ..features.registry import get_feature_method, options_class

    cls = options_class(features)
    names = {f.name for f in fields(cls)} if cls is not None else set()
    learned = getattr(get_feature_method(features), "learned", "")
    return names | (_declared_options(learned) if learned else set())


def _run(features: str):
    def run(fixed, moving, *, fixed_modality: str, moving_modality: str, device=torch.device("cpu"),
            options: dict | None = None) -> RegistrationOutput:
        """Features + ConvexAdam on one grid -> (1,3,D,H,W) fixed-voxel displacement."""
        from .. import io

        if not io.same_grid(fixed, moving):
            raise DinoregError(f"The {features} method needs the moving scan resampled onto the fixed grid first "
                               f"(got shapes {tuple(moving.shape)} and {tuple(fixed.shape)} or different affines).")
        opts = FeaturePathOptions.parse(features, options)
        if "spacing_mm" in _declared_options(features) and opts.feature_options.get("spacing_mm") is None:
            opts.feature_options["spacing_mm"] = list(fixed.spacing)  # spacing-aware dino3d meets the image's scale
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed)
        device = torch.device(device)
        t = time.perf_counter()
        fn = normalize_intensity(fixed.array, fixed_modality)
        mn = normalize_intensity(moving.array, moving_modality)
        ff, mf = compute_features(features, fn, mn, fixed_modality=fixed_modality, moving_modality=moving_modality,
                                  device=device, pca_dim=opts.pca_dim, options=opts.feature_options, seed=opts.seed)
        if opts.feature_scale != 1.0:
            ff, mf = ff * opts.feature_scale, mf * opts.feature_scale
        t_feat = time.perf_counter() - t
        t = time.perf_counter()
        ct = ConvexAdamTimings()
        disp = convex_adam(ff, mf, opts.convex, ct)
        del ff, mf
        t_reg = time.perf_counter() - t
        resolved = {"features": features, **settings.to_dict(opts), "fixed_modality": fixed_modality,
                    "moving_modality": moving_modality}
        return RegistrationOutput(disp.float(), resolved,
                                  {"features_s": t_feat, "convex_adam_s": t_reg,
                                   "discrete_s": ct.seconds.get("discrete", 0.0), "adam_s": ct.seconds.get("adam", 0.0)})

    return run


def _check(features: str):
    def check(options: dict | None = None) -> str | None:
        """None when the feature method can run here (options valid, weights found), else the one-sentence reason."""
        try:
            opts = FeaturePathOptions.parse(features, options)
            if features == "dino3d":
                from ..features.dino3d import resolve_weights

                resolve_weights(opts.feature_options)
            elif features == "dinov2":
                from ..models.dinov2_slices import Dinov2SliceConfig, load_dinov2_model

                load_dinov2_model(Dinov2SliceConfig.from_options(opts.feature_options))
        except (DinoregError, ImportError) as e:
            return " ".join(str(e).split())
        return None

    return check


def feature_registration_method(name: str) -> RegistrationMethod:
    """The registration method of feature extractor ``name``."""
    fm = get_feature_method(name)
    pca = " (joint PCA)" if fm.joint_pca else ""
    return RegistrationMethod(name, _run(name), _check(name), "features", f"{fm.description}{pca} + our ConvexAdam",
                              FeaturePathOptions)
