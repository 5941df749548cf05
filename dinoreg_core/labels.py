"""Label vocabularies used by the project.

* ``L2R_ABDOMEN_CT``: the 13 Learn2Reg AbdomenCTCT labels (also used by the synthetic cohort).
* ``L2R_ABDOMEN_MRCT``: the 4 Learn2Reg AbdomenMRCT labels.
* ``TOTALSEG_MAIN_ABDOMEN``: the 13 main abdominal organs in TotalSegmentator "total" ids, as found in the real
  CT of ``../shared/data/real`` (duodenum takes the place of the esophagus, which that scan does not show).
"""

from __future__ import annotations

import json
from pathlib import Path

L2R_ABDOMEN_CT = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
                  7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas",
                  12: "right adrenal gland", 13: "left adrenal gland"}

L2R_ABDOMEN_MRCT = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}

TOTALSEG_MAIN_ABDOMEN = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
                         6: "stomach", 7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left",
                         19: "duodenum", 52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein"}


MAX_LABEL_ID = 65535  # largest label id accepted in a label map (uint16; TotalSegmentator uses < 120, Learn2Reg
#                       < 20); ids are looked up in a table of max id + 1 entries, so larger ones are a mistake


def _label_id(x, path, role: str) -> int:
    """``x`` (a JSON key string or value) as a label id in 0..MAX_LABEL_ID, else one sentence naming it."""
    from .errors import DinoregError

    v = x
    if isinstance(v, str):
        try:
            v = int(v.strip(), 10)
        except ValueError:
            raise DinoregError(f"The label map {path} has the {role} {x!r}, which is not an integer label id.") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise DinoregError(f"The label map {path} has the {role} {x!r}, which is not an integer label id.")
    if v < 0:
        raise DinoregError(f"The label map {path} has the negative {role} {v}; label ids are >= 0.")
    if v > MAX_LABEL_ID:
        raise DinoregError(f"The label map {path} has the {role} {v}, which is too large (label ids are at most "
                           f"{MAX_LABEL_ID}).")
    return v


def load_label_id_map(path: str | Path) -> dict[int, int]:
    """Read a JSON map of moving label ids to fixed label ids into {moving_id: fixed_id}: values are ids or objects
    with a ``total_id`` (as ``mr_label_ids_to_ct_label_ids.json``: TotalSegmentator MR id -> {"total_id": CT id}).

    Validated before use: one JSON object, keys and values integer ids in 0..:data:`MAX_LABEL_ID`; anything else
    raises :class:`~dinoreg_core.errors.DinoregError` naming the file and the entry.
    """
    from .errors import DinoregError

    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DinoregError(f"The label map {p} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DinoregError(f"The label map {p} could not be read as JSON ({type(e).__name__}).") from None
    if not isinstance(raw, dict):
        raise DinoregError(f"The label map {p} must be a JSON object of moving id -> fixed id, not a "
                           f"{type(raw).__name__}.")
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            if "total_id" not in v:
                raise DinoregError(f"The label map {p} entry {k!r} is an object without 'total_id'.")
            v = v["total_id"]
        out[_label_id(k, p, "moving id")] = _label_id(v, p, "fixed id")
    if not out:
        raise DinoregError(f"The label map {p} is empty.")
    return out


def keep_labels(labels, ids) -> "np.ndarray":  # noqa: F821
    """Zero every label id not in ``ids``."""
    import numpy as np

    a = np.asarray(labels)
    return np.where(np.isin(a, list(ids)), a, 0).astype(a.dtype)
