"""The registration pipeline in four typed stages (DESIGN.md section 7, "one code path")::

    pair    = align(fixed, moving, fixed_labels=..., moving_labels=..., init="none")    # -> AlignedPair
    disp    = get_registration_method("mind").register(pair, options)                  # -> Displacement
    metrics = evaluate(pair, disp)                                                      # -> Metrics
    files   = write(out_dir, pair, disp, metrics, config=..., timings=...)              # -> {kind: path}

:func:`dinoreg_core.api.register` is their composition; the CLI, the evaluation runner, the notebooks, the benchmarks
and the peers call the same stages.
"""

from .align import AlignedPair, align, covered_box, load_pair, map_label_ids, save_pair
from .config import RegisterConfig, config_from
from .evaluate import Metrics, evaluate, label_metrics, warp_moving
from .displacement import Displacement, RegistrationMethod, RegistrationOutput, zero_displacement
from .methods import available_registration_methods, get_registration_method, method_status, register_registration_method
from .write import prepare_out_dir, write

__all__ = ["AlignedPair", "align", "covered_box", "load_pair", "map_label_ids", "save_pair", "RegisterConfig", "config_from", "Metrics",
           "evaluate", "label_metrics", "warp_moving", "Displacement", "RegistrationMethod", "RegistrationOutput",
           "available_registration_methods", "get_registration_method", "method_status",
           "register_registration_method", "zero_displacement", "prepare_out_dir", "write"]
