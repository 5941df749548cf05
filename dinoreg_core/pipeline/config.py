"""The settings of one registration: :class:`RegisterConfig` (the CLI's ``--set`` names) and their key aliases.

A key is a field of :class:`RegisterConfig`, a field of :class:`~dinoreg_core.registration.convex_adam.ConvexAdamConfig`
by its own name (``grid_sp``; also ``convex.grid_sp``) or a feature option as ``feat.NAME`` (also
``feature_options.NAME``). Values are converted by :mod:`dinoreg_core.settings` (strict types, unknown keys refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .. import settings
from ..errors import DinoregError
from ..registration.convex_adam import ConvexAdamConfig
from .keys import FEATURE_PREFIX, canonical_key, check_feature_scale  # noqa: F401 - re-exported


@dataclass
class RegisterConfig:
    """Everything :func:`dinoreg_core.api.register` needs besides the images (the CLI's ``--set key=value`` names)."""

    features: str = "mind"  # registration method name (see dinoreg_core.pipeline.methods)
    init: str = "none"  # initial alignment: none | com | affine
    device: str = "cpu"
    pca_dim: int = 12  # channels after joint PCA (methods with joint_pca)
    feature_scale: float = 1.0  # multiplies the features handed to ConvexAdam (> 0; 1 = unchanged)
    preset: str | None = None  # the preset these settings started from (name or file; recorded in config.json)
    fixed_modality: str | None = None  # "ct" | "mr" | None (guess from intensities)
    moving_modality: str | None = None
    seed: int = 0
    convex: ConvexAdamConfig = field(default_factory=ConvexAdamConfig)
    feature_options: dict = field(default_factory=dict)  # e.g. {"mind_r": 1, "mind_d": 2} or {"weights": path}

    def set(self, key: str, value) -> None:
        """Apply one ``key=value`` override (ConvexAdam fields by their own names, feature options as ``feat.X``)."""
        settings.set_value(self, canonical_key(key, _TOP), value)

    def update(self, overrides) -> "RegisterConfig":
        """Apply a mapping or (key, value) pairs of overrides (see :meth:`set`); returns self."""
        items = overrides.items() if hasattr(overrides, "items") else overrides
        for k, v in items or []:
            if isinstance(v, dict) and k in ("feature_options", "feat"):
                for kk, vv in v.items():
                    self.set(f"feature_options.{kk}", vv)
            elif isinstance(v, dict) and k == "convex":
                settings.apply(self.convex, v, prefix="convex.")
            else:
                self.set(str(k), v)
        return self

    def method_options(self) -> dict:
        """The options of the registration method :attr:`features` (feature methods: pca_dim, seed, convex,
        feature_options; see :class:`~dinoreg_core.pipeline.feature_path.FeaturePathOptions`)."""
        return {"pca_dim": self.pca_dim, "seed": self.seed, "feature_scale": self.feature_scale,
                "convex": settings.to_dict(self.convex), "feature_options": dict(self.feature_options)}

    def validate(self) -> "RegisterConfig":
        """Check the values no type can express (ConvexAdam ranges, ``feature_scale > 0``); returns self."""
        from ..errors import DinoregError

        self.convex.validate()
        check_feature_scale(self.feature_scale)
        if int(self.pca_dim) < 1:
            raise DinoregError(f"The setting pca_dim={self.pca_dim} must be a positive integer.")
        from .methods import get_registration_method

        if get_registration_method(self.features).kind == "features":  # feature options checked before any work
            from .feature_path import FeaturePathOptions

            FeaturePathOptions.parse(self.features, self.method_options())
        return self


_TOP = {f.name for f in fields(RegisterConfig)}


def config_from(features: str, overrides=None, *, preset: str | None = "official", **fixed) -> RegisterConfig:
    """A :class:`RegisterConfig` for method ``features`` with ``fixed`` fields set, then the settings of ``preset``
    (:mod:`dinoreg_core.pipeline.presets`: ``official`` = the code defaults, ``default`` = the method's default preset,
    ``authors``, ``tuned`` or a file) and then ``overrides`` on top (a mapping or (key, value) pairs of ``--set``
    names), validated."""
    cfg = RegisterConfig(features=features, **fixed)
    cfg.preset = "official" if preset == "official" else None
    if preset not in (None, "official"):
        from .methods import get_registration_method
        from .presets import DEFAULT, describe, load_preset

        if get_registration_method(features).kind != "features":
            if preset not in ("", DEFAULT):
                raise DinoregError(f"The method '{features}' takes no presets (it is a peer with its own options).")
        else:
            feat = {}
            items = (overrides or {}).items() if hasattr(overrides, "items") else (overrides or [])
            for k, v in items:  # the weights the user asks for decide which weights' JSON may carry the preset
                if str(k) in ("feat.weights", "feature_options.weights"):
                    feat["weights"] = v
                elif str(k) in ("feat", "feature_options") and isinstance(v, dict) and "weights" in v:
                    feat["weights"] = v["weights"]
            chosen = load_preset(features, preset, feat)
            try:
                cfg.update(chosen.settings)
                cfg.validate()
            except DinoregError as e:
                raise DinoregError(f"The preset {describe(chosen)} is invalid: {e}") from None
            cfg.preset = chosen.name
    cfg.update(overrides or {})
    cfg.validate()
    return cfg
