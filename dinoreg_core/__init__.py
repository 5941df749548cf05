"""dinoreg_core: 3D DINO features + ConvexAdam for label-free abdominal CT/MR registration.

The pipeline (see README): io -> preprocess -> features -> pca -> registration.convex_adam
-> registration.warp -> evaluation.metrics. ``dinoreg_core.api.register`` runs it in one call.
"""

__version__ = "0.1.0"

from .errors import DinoregError  # noqa: F401
