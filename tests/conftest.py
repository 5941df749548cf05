"""Shared fixtures: the real test volumes in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DINOREG_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL = SHARED_DATA / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Folder with the real CT/MR test volumes; skips the test when ../shared/data/real is missing."""
    if not (REAL / "ct_abdomen_pelvis.nii.gz").exists():
        pytest.skip(f"real test volumes not found in {REAL} (../shared/data/real beside the repository)")
    return REAL
