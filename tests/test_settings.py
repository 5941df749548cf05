"""The one settings mechanism: strict keys and types, dotted keys, JSON files, the same rules for every caller."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from dinoreg_core import settings
from dinoreg_core.errors import DinoregError
from dinoreg_core.pipeline.config import RegisterConfig, config_from


@dataclass
class Inner:
    size: int = 4
    rate: float = 0.5


@dataclass
class Outer:
    name: str = "a"
    flag: bool = False
    maybe: int | None = None
    sizes: tuple = (1, 2)
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def test_typed_values_from_strings_and_json_values():
    o = settings.from_dict(Outer, {"name": "b", "flag": "yes", "maybe": "none", "sizes": "3,4,5",
                                   "inner": {"size": "1e1"}})
    assert (o.name, o.flag, o.maybe, o.sizes, o.inner.size) == ("b", True, None, (3, 4, 5), 10)
    settings.apply(o, [("inner.rate", "0.25"), ("extra.k", "[1, 2]"), ("maybe", 3), ("flag", "OFF")])
    assert (o.inner.rate, o.extra, o.maybe, o.flag) == (0.25, {"k": [1, 2]}, 3, False)


@pytest.mark.parametrize("key,value,match", [
    ("nmae", "x", "Unknown setting 'nmae' of Outer; known: .*name"),
    ("inner.sise", "1", "Unknown setting 'inner.sise' of Inner"),
    ("flag", "maybe", "flag='maybe' must be true or false"),
    ("inner.size", "2.5", "must be an integer"),
    ("inner.rate", "nan", "not a finite number"),
    ("inner.rate", "inf", "not a finite number"),
    ("extra.k", "nan", "not a finite number"),
    ("name", 3, "must be a string"),
    ("name.x", "1", "addresses a field inside 'name'"),
])
def test_bad_keys_and_values_are_one_sentence_errors(key, value, match):
    with pytest.raises(DinoregError, match=match) as e:
        settings.set_value(Outer(), key, value)
    assert "\n" not in str(e.value)


def test_assignments_and_files(tmp_path):
    assert settings.parse_assignments(["a=1", " b.c = x=y "]) == [("a", "1"), ("b.c", "x=y")]
    with pytest.raises(DinoregError, match="not of the form KEY=VALUE"):
        settings.parse_assignments(["a"])
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"inner": {"rate": 2}}))
    assert settings.from_dict(Outer, settings.load_file(p)).inner.rate == 2.0
    p.write_text("[1]")
    with pytest.raises(DinoregError, match="must hold one object"):
        settings.load_file(p)
    with pytest.raises(DinoregError, match="does not exist"):
        settings.load_file(tmp_path / "none.json")


def test_register_config_short_keys_match_the_cli():
    cfg = RegisterConfig()
    for k, v in [("grid_sp", "4"), ("convex.lr", "0.5"), ("feat.mind_r", "2"), ("ic", "false"), ("pca_dim", 8),
                 ("coupling_weights", "0.1,1")]:
        cfg.set(k, v)
    assert (cfg.convex.grid_sp, cfg.convex.lr, cfg.feature_options, cfg.convex.ic, cfg.pca_dim) == \
        (4, 0.5, {"mind_r": 2}, False, 8)
    assert cfg.convex.coupling_weights == (0.1, 1.0)
    with pytest.raises(DinoregError, match="Unknown setting 'grid'"):
        cfg.set("grid", "4")
    with pytest.raises(DinoregError, match="must be positive|positive integer"):
        config_from("mind", {"grid_sp": 0})
