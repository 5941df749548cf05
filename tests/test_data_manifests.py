"""Dataset manifests: every built-in manifest validates; the schema rejects broken ones with one clear sentence."""

from __future__ import annotations

import copy
import json

import pytest

from dinoreg_core import cli
from dinoreg_core.data.manifests import (MANIFEST_DIR, builtin_manifest_paths, get_manifest, list_manifests,
                                         load_manifest_file, parse_manifest)
from dinoreg_core.errors import DinoregError

CTCT_LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
               7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas",
               12: "right adrenal gland", 13: "left adrenal gland"}


def test_every_builtin_manifest_validates_and_is_named_after_its_file():
    paths = builtin_manifest_paths()
    ms = list_manifests()
    assert [p.stem for p in paths] == [m.name for m in ms]
    assert {"l2r_abdomen_ctct", "l2r_abdomen_mrct", "amos22", "totalsegmentator_ct", "nako"} <= {m.name for m in ms}
    for m in ms:
        assert m.source, m.name
        # the schema's own round trip: to_dict -> parse gives the same manifest
        again = parse_manifest(json.loads(json.dumps(m.to_dict())), m.path)
        assert again == m
        for d in m.downloads:
            assert d.url.startswith("https://")
            assert d.checksum is None or len(d.checksum.value) in (32, 64)
        if m.access == "open":
            assert m.image_rules, f"{m.name} marks no images for the corpus builder"


def test_facts_of_the_evaluation_datasets():
    ctct = get_manifest("l2r_abdomen_ctct")
    assert ctct.labels == CTCT_LABELS
    assert ctct.image_shape == (192, 160, 256) and ctct.spacing_mm == (2.0, 2.0, 2.0)
    assert ctct.pairs == {"registration_val": 45}
    assert ctct.evaluation.metrics == ("dice", "hd95", "sdlogj") and not ctct.evaluation.masked
    assert ctct.downloads[0].archive == "AbdomenCTCT.zip" and ctct.downloads[0].checksum is None
    mrct = get_manifest("l2r_abdomen_mrct")
    assert set(mrct.labels.values()) == {"liver", "spleen", "right kidney", "left kidney"}
    assert mrct.image_shape == (192, 160, 192) and mrct.evaluation.masked
    assert {r.modality for r in mrct.image_rules} == {"mr", "ct"}
    ts = get_manifest("totalsegmentator_ct")
    assert ts.downloads[0].checksum.algorithm == "md5"
    amos = get_manifest("amos22")
    assert set(amos.modalities) == {"ct", "mr"} and len(amos.labels) == 15


def test_restricted_manifest_has_instructions_and_no_url():
    nako = get_manifest("nako")
    assert nako.access == "restricted" and nako.downloads == ()
    assert "transfer.nako.de" in nako.how_to_apply


def test_manifest_by_path_and_unknown_name(tmp_path):
    p = tmp_path / "copy.json"
    p.write_text((MANIFEST_DIR / "nako.json").read_text())
    assert get_manifest(str(p)).name == "nako"
    with pytest.raises(DinoregError, match="no dataset manifest named 'nope'; known datasets: amos22"):
        get_manifest("nope")
    p.write_text("{not json")
    with pytest.raises(DinoregError, match="is not valid JSON"):
        load_manifest_file(p)


def _good() -> dict:
    return json.loads((MANIFEST_DIR / "l2r_abdomen_ctct.json").read_text())


def _set(path: str, value):
    def f(d):
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
        return d
    return f


_DELETE = object()

BROKEN = [
    (_set("name", _DELETE), "'name' is missing"),
    (_set("name", "Bad Name"), "'name' is 'Bad Name'; use lower-case letters"),
    (_set("urls", ["x"]), "has unknown key(s) urls"),
    (_set("access", "public"), "'access' is 'public'; expected one of 'open', 'restricted', 'generated'"),
    (_set("downloads", []), "'downloads' must list at least one download for an open dataset"),
    (_set("downloads.0.url", "ftp://x/y.zip"), "'downloads[0].url' is 'ftp://x/y.zip'; expected an http"),
    (_set("downloads.0.format", "rar"), "'downloads[0].format' is 'rar'"),
    (_set("downloads.0.checksum", {"algorithm": "sha256", "value": "abc"}),
     "'downloads[0].checksum.value' must be 64 lower-case hex digits for sha256"),
    (_set("downloads.0.checksum", {"algorithm": "crc32", "value": "abc"}), "'downloads[0].checksum.algorithm'"),
    (_set("downloads.0.archive", "../evil.zip"), "'downloads[0].archive' is '../evil.zip'; it must be a plain file"),
    (_set("layout.files.1.pattern", "../imagesTr/*.nii.gz"), "it must be a relative path inside the dataset"),
    (_set("layout.files.1.min_count", 3), "'layout.files[1]' gives both count and min_count"),
    (_set("layout.files.1.modality", "pet"), "'layout.files[1].modality' is 'pet'"),
    (_set("labels.0", "background"), "'labels.0' is not a positive integer label id"),
    (_set("image_shape", [192, 160]), "'image_shape' must be a list of three positive integers"),
    (_set("spacing_mm", [2, 0, 2]), "'spacing_mm' must be a list of three positive numbers"),
    (_set("pairs.registration_val", -1), "'pairs.registration_val' must be an integer >= 1"),
    (_set("source", []), "'source' must be a non-empty list"),
    (_set("role", ["training"]), "'role[0]' is 'training'"),
]


@pytest.mark.parametrize("mutate,fragment", BROKEN, ids=[b[1][:40] for b in BROKEN])
def test_schema_rejects_broken_manifest_with_one_sentence(mutate, fragment):
    d = mutate(copy.deepcopy(_good()))
    with pytest.raises(DinoregError) as err:
        parse_manifest(d, "broken.json")
    msg = str(err.value)
    assert fragment in msg
    assert msg.startswith("The manifest broken.json is invalid: ") and msg.endswith(".") and "\n" not in msg


def test_schema_rules_that_depend_on_access():
    d = _good()
    d.update(access="restricted")
    with pytest.raises(DinoregError, match="'downloads' must be empty for a restricted dataset"):
        parse_manifest(d)
    d["downloads"] = []
    with pytest.raises(DinoregError, match="'how_to_apply' must say how to request access"):
        parse_manifest(d)
    d.update(access="generated", how_to_apply=None)
    with pytest.raises(DinoregError, match="'generator' is required for a generated dataset"):
        parse_manifest(d)
    d = _good()
    d["layout"]["dataset_json"] = None
    with pytest.raises(DinoregError, match="'pairs' needs layout.dataset_json"):
        parse_manifest(d)


def test_cli_list_and_show(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["dinoreg_core.commands.data"])
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["NAME", "ACCESS", "MODALITIES", "ROLE", "SIZE"]
    names = [line.split()[0] for line in out[1:]]
    assert names == [m.name for m in list_manifests()]
    assert cli.main(["data", "show", "l2r_abdomen_ctct"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pairs"] == {"registration_val": 45} and shown["labels"]["10"] == "portal and splenic vein"
    assert cli.main(["data", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(names)
