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


def load_label_id_map(path: str | Path) -> dict[int, int]:
    """Read a JSON map of moving label ids to fixed label ids into {moving_id: fixed_id}: values are ids or objects
    with a ``total_id`` (as ``mr_label_ids_to_ct_label_ids.json``: TotalSegmentator MR id -> {"total_id": CT id})."""
    raw = json.loads(Path(path).read_text())
    return {int(k): int(v["total_id"] if isinstance(v, dict) else v) for k, v in raw.items()}


def keep_labels(labels, ids) -> "np.ndarray":  # noqa: F821
    """Zero every label id not in ``ids``."""
    import numpy as np

    a = np.asarray(labels)
    return np.where(np.isin(a, list(ids)), a, 0).astype(a.dtype)
