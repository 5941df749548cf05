"""`dinoreg data fetch` against a local HTTP server on 127.0.0.1 (no internet).

The server supports HTTP Range requests (206 with Content-Range, If-Range with an ETag) and can drop the
connection midway through a response once, to test resumable downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinoreg_core import cli
from dinoreg_core.data.download import DOWNLOAD_DIR, MARKER, DownloadInterrupted, FetchConfig, fetch_dataset
from dinoreg_core.data.manifests import parse_manifest
from dinoreg_core.errors import DinoregError

# ----------------------------------------------------------------------------------------- test server


class _Files:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_once: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.log: list[dict] = []
        self.lock = threading.Lock()


def _handler(state: _Files):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404, "Not Found")
                state.log.append({"path": self.path, "status": 404, "range": None, "sent": 0})
                return
            etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            start, end, status = 0, len(data) - 1, 200
            if rng and (if_range is None or if_range == etag):
                m = re.match(r"^bytes=(\d+)-(\d*)$", rng)
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    state.log.append({"path": self.path, "status": 416, "range": rng, "sent": 0})
                    return
                status = 206
            body = data[start:end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            with state.lock:
                n = state.drop_once.pop(self.path, len(body))
            self.wfile.write(body[:n])
            self.wfile.flush()
            state.log.append({"path": self.path, "status": status, "range": rng, "sent": n})
            if n < len(body):
                self.close_connection = True

        def log_message(self, *args):  # keep the test output quiet
            pass

    return Handler


@pytest.fixture
def server():
    state = _Files()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------------------- test data

def _nifti_bytes(seed: int, shape=(12, 10, 8)) -> bytes:
    rng = np.random.default_rng(seed)
    img = nib.Nifti1Image(rng.normal(0, 100, shape).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    return _gz(img)


def _gz(img) -> bytes:
    import gzip

    return gzip.compress(img.to_bytes(), mtime=0)


def _dataset_files(n_cases: int = 3) -> dict[str, bytes]:
    """A tiny Learn2Reg-style dataset: ToySet/imagesTr, labelsTr and ToySet_dataset.json with all pairs."""
    files = {}
    for i in range(1, n_cases + 1):
        files[f"ToySet/imagesTr/ToySet_{i:04d}_0000.nii.gz"] = _nifti_bytes(i)
        lab = nib.Nifti1Image(np.ones((12, 10, 8), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
        files[f"ToySet/labelsTr/ToySet_{i:04d}_0000.nii.gz"] = _gz(lab)
    pairs = [{"fixed": f"./imagesTr/ToySet_{a:04d}_0000.nii.gz", "moving": f"./imagesTr/ToySet_{b:04d}_0000.nii.gz"}
             for a in range(1, n_cases + 1) for b in range(a + 1, n_cases + 1)]
    files["ToySet/ToySet_dataset.json"] = json.dumps({"name": "ToySet", "labels": {"0": "background", "1": "organ"},
                                                      "registration_val": pairs}).encode()
    files["README_LICENCE.txt"] = b"toy licence\n"
    return files


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _manifest(url: str, archive: str, fmt: str = "zip", *, checksum=None, size=None, n_cases: int = 3):
    return parse_manifest({
        "name": "toyset", "title": "Toy set", "description": "A tiny test dataset.", "access": "open",
        "role": ["evaluation"], "modalities": ["ct"], "license": "test", "source": ["made in the test"],
        "downloads": [{"url": url, "archive": archive, "format": fmt, "size_bytes": size, "checksum": checksum}],
        "layout": {"data_root": "ToySet", "dataset_json": "ToySet/ToySet_dataset.json", "files": [
            {"pattern": "ToySet/ToySet_dataset.json", "count": 1},
            {"pattern": "ToySet/imagesTr/ToySet_*_0000.nii.gz", "count": n_cases, "modality": "ct"},
            {"pattern": "ToySet/labelsTr/*.nii.gz", "count": n_cases}]},
        "image_shape": [12, 10, 8], "labels": {"1": "organ"},
        "pairs": {"registration_val": n_cases * (n_cases - 1) // 2}}, "<test manifest>")


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_sentence(msg: str) -> bool:
    return msg.endswith(".") and "\n" not in msg and msg[0].isupper()


QUIET = dict(progress=False, retry_wait_s=0.0, timeout_s=10.0)


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("fmt,pack", [("zip", _zip), ("tar.gz", _targz)])
def test_fetch_good_archive_is_verified_extracted_and_validated(server, tmp_path, fmt, pack):
    blob = pack(_dataset_files())
    server.files["/toy.bin"] = blob
    sha = hashlib.sha256(blob).hexdigest()
    m = _manifest(server.base + "/toy.bin", f"toy.{fmt}", fmt, checksum={"algorithm": "sha256", "value": sha},
                  size=len(blob))
    res = fetch_dataset(m, tmp_path, FetchConfig(**QUIET))
    folder = tmp_path / "toyset"
    assert res["folder"] == str(folder) and res["data_root"] == str(folder / "ToySet")
    assert res["downloads"][f"toy.{fmt}"] == {"bytes_received": len(blob), "resumed_from": 0, "total": len(blob)}
    assert res["layout"]["files"]["ToySet/imagesTr/ToySet_*_0000.nii.gz"] == 3
    assert res["layout"]["pairs"] == {"registration_val": 3}
    # the archive's content is there as it was packed, nothing else but the marker is left in DEST
    for name, data in _dataset_files().items():
        assert (folder / name).read_bytes() == data
    marker = json.loads((folder / MARKER).read_text())
    assert marker["name"] == "toyset" and marker["fetched"]["archives"][f"toy.{fmt}"]["total"] == len(blob)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toyset"]
    # a second fetch finds it valid and does not download again
    n_requests = len(server.log)
    res2 = fetch_dataset(m, tmp_path, FetchConfig(**QUIET))
    assert res2["already_present"] and len(server.log) == n_requests


def test_interrupted_download_resumes_with_range_request(server, tmp_path):
    blob = _zip(_dataset_files())
    cut = int(len(blob) * 0.4)
    server.files["/toy.zip"] = blob
    server.drop_once["/toy.zip"] = cut
    md5 = hashlib.md5(blob).hexdigest()
    m = _manifest(server.base + "/toy.zip", "toy.zip", checksum={"algorithm": "md5", "value": md5})

    with pytest.raises(DownloadInterrupted) as err:
        fetch_dataset(m, tmp_path, FetchConfig(retries=0, **QUIET))
    assert _one_sentence(str(err.value)) and f"after {cut} of {len(blob)} bytes" in str(err.value)
    part = tmp_path / DOWNLOAD_DIR / "toy.zip.part"
    assert part.stat().st_size == cut
    assert not (tmp_path / "toyset").exists()
    assert server.log[-1] == {"path": "/toy.zip", "status": 200, "range": None, "sent": cut}

    res = fetch_dataset(m, tmp_path, FetchConfig(retries=0, **QUIET))
    second = server.log[-1]
    assert second["status"] == 206 and second["range"] == f"bytes={cut}-"
    assert second["sent"] == len(blob) - cut < len(blob)  # fewer bytes the second time
    assert res["downloads"]["toy.zip"] == {"bytes_received": len(blob) - cut, "resumed_from": cut, "total": len(blob)}
    assert (tmp_path / "toyset" / "ToySet" / "ToySet_dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toyset"]  # the .part file is gone


def test_interrupted_download_resumes_automatically_within_one_fetch(server, tmp_path):
    blob = _zip(_dataset_files())
    server.files["/toy.zip"] = blob
    server.drop_once["/toy.zip"] = 1000
    m = _manifest(server.base + "/toy.zip", "toy.zip", size=len(blob))
    res = fetch_dataset(m, tmp_path, FetchConfig(retries=1, **QUIET))
    assert [(e["status"], e["sent"]) for e in server.log] == [(200, 1000), (206, len(blob) - 1000)]
    assert res["downloads"]["toy.zip"]["bytes_received"] == len(blob)


def test_changed_file_on_server_is_downloaded_afresh_not_spliced(server, tmp_path):
    blob = _zip(_dataset_files())
    server.files["/toy.zip"] = blob
    server.drop_once["/toy.zip"] = 700
    m = _manifest(server.base + "/toy.zip", "toy.zip")
    with pytest.raises(DownloadInterrupted):
        fetch_dataset(m, tmp_path, FetchConfig(retries=0, **QUIET))
    new_blob = _zip({**_dataset_files(), "ToySet/extra.txt": b"new release"})
    server.files["/toy.zip"] = new_blob  # new ETag: If-Range fails, the server sends the whole file
    fetch_dataset(m, tmp_path, FetchConfig(retries=0, **QUIET))
    assert server.log[-1]["status"] == 200 and server.log[-1]["sent"] == len(new_blob)
    assert (tmp_path / "toyset" / "ToySet" / "extra.txt").read_bytes() == b"new release"


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_checksum_mismatch_is_one_sentence_and_leaves_nothing(server, tmp_path, algorithm):
    blob = _zip(_dataset_files())
    server.files["/toy.zip"] = blob
    wrong = hashlib.new(algorithm, b"something else").hexdigest()
    m = _manifest(server.base + "/toy.zip", "toy.zip", checksum={"algorithm": algorithm, "value": wrong})
    with pytest.raises(DinoregError) as err:
        fetch_dataset(m, tmp_path, FetchConfig(**QUIET))
    msg = str(err.value)
    assert _one_sentence(msg) and "toy.zip" in msg and wrong in msg and hashlib.new(algorithm, blob).hexdigest() in msg
    assert _all_files(tmp_path) == []


def test_size_mismatch_is_reported(server, tmp_path):
    blob = _zip(_dataset_files())
    server.files["/toy.zip"] = blob
    m = _manifest(server.base + "/toy.zip", "toy.zip", size=len(blob) + 1)
    # the server's file is shorter than the manifest says: the transfer ends "early", then the size check fails
    with pytest.raises(DinoregError) as err:
        fetch_dataset(m, tmp_path, FetchConfig(retries=0, **QUIET))
    assert _one_sentence(str(err.value)) and f"{len(blob)} bytes" in str(err.value)
    assert _all_files(tmp_path) == []


def _corrupt_zip() -> bytes:
    blob = bytearray(_zip(_dataset_files()))
    i = blob.index(b"ToySet/imagesTr/ToySet_0002_0000.nii.gz") + 60  # inside that member's (stored) data
    blob[i:i + 16] = bytes(16)
    return bytes(blob)


@pytest.mark.parametrize("fmt,make", [
    ("zip", _corrupt_zip),
    ("zip", lambda: _zip(_dataset_files())[: 3000]),  # truncated: no central directory
    ("tar.gz", lambda: _targz(_dataset_files())[: 3000]),  # truncated gzip stream
])
def test_corrupt_archive_is_one_sentence_and_leaves_nothing(server, tmp_path, fmt, make):
    blob = make()
    server.files["/toy.bin"] = blob
    m = _manifest(server.base + "/toy.bin", f"toy.{fmt}", fmt,
                  checksum={"algorithm": "sha256", "value": hashlib.sha256(blob).hexdigest()})
    with pytest.raises(DinoregError) as err:
        fetch_dataset(m, tmp_path, FetchConfig(**QUIET))
    assert _one_sentence(str(err.value)) and "corrupt" in str(err.value) and f"toy.{fmt}" in str(err.value)
    assert _all_files(tmp_path) == []


def test_layout_mismatch_names_the_rule_and_leaves_nothing(server, tmp_path):
    files = _dataset_files()
    del files["ToySet/imagesTr/ToySet_0003_0000.nii.gz"]
    server.files["/toy.zip"] = _zip(files)
    with pytest.raises(DinoregError) as err:
        fetch_dataset(_manifest(server.base + "/toy.zip", "toy.zip"), tmp_path, FetchConfig(**QUIET))
    assert "'ToySet/imagesTr/ToySet_*_0000.nii.gz' matched 2 files where exactly 3 were expected" in str(err.value)
    assert _one_sentence(str(err.value))
    assert _all_files(tmp_path) == []


def test_wrong_image_shape_and_pair_count_are_layout_errors(server, tmp_path):
    files = _dataset_files()
    files["ToySet/imagesTr/ToySet_0002_0000.nii.gz"] = _nifti_bytes(2, shape=(12, 10, 9))
    server.files["/a.zip"] = _zip(files)
    with pytest.raises(DinoregError, match=r"has shape \(12, 10, 9\), but the manifest expects \(12, 10, 8\)"):
        fetch_dataset(_manifest(server.base + "/a.zip", "a.zip"), tmp_path / "a", FetchConfig(**QUIET))
    files = _dataset_files()
    ds = json.loads(files["ToySet/ToySet_dataset.json"])
    ds["registration_val"] = ds["registration_val"][:2]
    files["ToySet/ToySet_dataset.json"] = json.dumps(ds).encode()
    server.files["/b.zip"] = _zip(files)
    with pytest.raises(DinoregError, match="lists 2 'registration_val' pairs, but the manifest expects 3"):
        fetch_dataset(_manifest(server.base + "/b.zip", "b.zip"), tmp_path / "b", FetchConfig(**QUIET))


def test_archive_member_outside_the_folder_is_refused(server, tmp_path):
    files = {**_dataset_files(), "../escaped.txt": b"no"}
    server.files["/evil.zip"] = _zip(files)
    dest = tmp_path / "dest"
    with pytest.raises(DinoregError, match="points outside the extraction folder"):
        fetch_dataset(_manifest(server.base + "/evil.zip", "evil.zip"), dest, FetchConfig(**QUIET))
    assert not (tmp_path / "escaped.txt").exists() and _all_files(dest) == []


def test_http_error_is_one_sentence(server, tmp_path):
    with pytest.raises(DinoregError) as err:
        fetch_dataset(_manifest(server.base + "/missing.zip", "missing.zip"), tmp_path, FetchConfig(**QUIET))
    assert "HTTP 404" in str(err.value) and _one_sentence(str(err.value))
    assert _all_files(tmp_path) == []


def test_existing_foreign_folder_is_not_overwritten(server, tmp_path):
    (tmp_path / "toyset").mkdir()
    (tmp_path / "toyset" / "mine.txt").write_text("keep")
    server.files["/toy.zip"] = _zip(_dataset_files())
    with pytest.raises(DinoregError, match="was not made by 'dinoreg data fetch'"):
        fetch_dataset(_manifest(server.base + "/toy.zip", "toy.zip"), tmp_path, FetchConfig(**QUIET))
    assert server.log == [] and (tmp_path / "toyset" / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def data_cli(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["dinoreg_core.commands.data"])
    return cli.main


def test_cli_fetch_from_a_manifest_file(server, tmp_path, data_cli, capsys):
    blob = _zip(_dataset_files())
    server.files["/toy.zip"] = blob
    mpath = tmp_path / "toyset.json"
    mpath.write_text(json.dumps(_manifest(server.base + "/toy.zip", "toy.zip").to_dict()))
    rc = data_cli(["data", "fetch", str(mpath), "--dest", str(tmp_path / "data"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and f"downloaded toy.zip: {len(blob)} bytes" in out and "registration_val: 3 pairs" in out
    assert (tmp_path / "data" / "toyset" / "ToySet" / "imagesTr" / "ToySet_0001_0000.nii.gz").is_file()
    # checksum failure through the CLI: exit status 2 and one line on stderr
    bad = _manifest(server.base + "/toy.zip", "toy.zip", checksum={"algorithm": "md5", "value": "0" * 32}).to_dict()
    mpath.write_text(json.dumps(bad))
    rc = data_cli(["data", "fetch", str(mpath), "--dest", str(tmp_path / "other"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dinoreg: error: The file toy.zip") and err.count("\n") == 1


def test_cli_fetch_restricted_prints_how_to_apply_and_exits_2(data_cli, capsys, tmp_path):
    rc = data_cli(["data", "fetch", "nako", "--dest", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 2 and "https://transfer.nako.de" in out and "Use and Access Committee" in out
    assert _all_files(tmp_path) == []
