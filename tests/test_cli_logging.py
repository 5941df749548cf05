"""The CLI's --version, its stage progress lines and -q / -v."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from dinoreg_core import __version__
from dinoreg_core.cli import main


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.avg_pool3d(torch.rand((1, 1, 24, 24, 24), generator=g), 5, 1, 2)[0, 0].numpy()
    paths = []
    for name, a in (("f.nii.gz", img), ("m.nii.gz", np.roll(img, 1, axis=0))):
        nib.save(nib.Nifti1Image((a * 3000 - 1000).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                 str(tmp_path / name))
        paths.append(str(tmp_path / name))
    return paths


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dinoreg {__version__}"


@pytest.mark.parametrize("flag", [None, "-q", "-v"])
def test_register_stage_lines_follow_the_verbosity(tmp_path, capsys, flag):
    f, m = _pair(tmp_path)
    argv = ([flag] if flag else []) + ["register", f, m, "--features", "intensity", "--out", str(tmp_path / "o"),
                                       "--set", "grid_sp=4", "--set", "iterations=5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    stages = ["align ...", "register (intensity) done in", "evaluate done in", "write done in"]
    if flag == "-q":
        assert not any(s in out for s in stages) and "wrote:" not in out
        assert "SDlogJ" in out  # the result itself is still printed
    else:
        assert all(s in out for s in stages) and "wrote:" in out
    log = logging.getLogger("dinoreg")
    assert log.level == {None: logging.INFO, "-q": logging.WARNING, "-v": logging.DEBUG}[flag]
    for h in list(log.handlers):  # the handlers write to this test's captured streams
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)
