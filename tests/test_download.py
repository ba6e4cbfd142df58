"""The download helper (fope_lm.data.download, scripts/download_data.py) against a local HTTP server on 127.0.0.1
started here: range requests continue a partial file and a dropped connection, Content-MD5 / ETag / sha256 verify
the bytes (of files already complete too), several files download in parallel, a server without range support
still gives whole files, a file changed on the server between attempts restarts (If-Range) instead of being spliced,
and a partial file longer than the server's is downloaded again."""

import base64
import email.utils
import hashlib
import http.server
import os
import runpy
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from fope_lm.data.download import download, urls_in
from fope_lm.errors import DataError

from conftest import REPO

FILES = {f"part-{i:03d}-00000.npy": np.random.default_rng(i).integers(0, 50280, 150_000 + i, dtype=np.uint16).tobytes() for i in range(3)}


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` (FILES, which a test may change); `cut` maps a name to a byte count after which its next full
    GET drops the connection; `ranges` off makes it ignore Range headers; `md5` chooses how it states checksums
    (content-md5, etag, none, wrong); `validator` what it states about the version of a file (none, etag: one that is
    not an MD5, last-modified), which an If-Range must match for a range to be sent (else the whole file, 200);
    every request's (method, path, Range, If-Range) is recorded."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.cut, self.ranges, self.md5, self.validator, self.requests = dict(FILES), {}, True, "content-md5", "none", []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _version(self, body: bytes) -> str | None:
        if self.server.validator == "etag":
            return f'"v-{hashlib.sha1(body).hexdigest()[:12]}"'
        if self.server.validator == "last-modified":
            return email.utils.formatdate(1_700_000_000 + zlib.crc32(body) % 10**6, usegmt=True)
        return None

    def _headers(self, body: bytes, status: int, length: int):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if version := self._version(body):
            self.send_header("ETag" if self.server.validator == "etag" else "Last-Modified", version)
        digest = hashlib.md5(body).digest()
        if self.server.md5 == "wrong":
            digest = hashlib.md5(b"other bytes").digest()
        if self.server.md5 in ("content-md5", "wrong"):
            self.send_header("Content-MD5", base64.b64encode(digest).decode())
        elif self.server.md5 == "etag":
            self.send_header("ETag", f'"{digest.hex()}"')
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def _body(self, name: str) -> bytes | None:
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
        return body

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, None, None))
        if (body := self._body(self.path.lstrip("/"))) is not None:
            self._headers(body, 200, len(body))

    def do_GET(self):
        name, byte_range, if_range = self.path.lstrip("/"), self.headers.get("Range"), self.headers.get("If-Range")
        self.server.requests.append(("GET", self.path, byte_range, if_range))
        if (body := self._body(name)) is None:
            return
        same_version = if_range is None or if_range == self._version(body)
        start = int(byte_range.removeprefix("bytes=").rstrip("-")) if byte_range and self.server.ranges and same_version else 0
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
        else:
            self._headers(body, 200, len(body))
        if (cut := self.server.cut.pop(name, None)) is not None:
            self.wfile.write(body[start:cut])  # then drop the connection mid-body
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_parallel_download_continues_a_partial_file_and_a_dropped_connection(server, tmp_path):
    names = sorted(FILES)
    (tmp_path / f"{names[0]}.part").write_bytes(FILES[names[0]][:70_001])  # left by a killed run
    server.cut[names[1]] = 123_457  # the connection drops after these bytes
    files = download([f"{server.url}/{name}" for name in names], tmp_path, workers=3, progress=False)
    assert [f.name for f in files] == names and all(f.read_bytes() == FILES[f.name] for f in files)
    assert not list(tmp_path.glob("*.part"))
    gets = {(path.lstrip("/"), byte_range) for method, path, byte_range, _ in server.requests if method == "GET"}
    assert (names[0], "bytes=70001-") in gets  # continued where the partial file ended
    continued = [int(r.removeprefix("bytes=").rstrip("-")) for n, r in gets if n == names[1] and r]
    assert (names[1], None) in gets and len(continued) == 1 and 0 < continued[0] <= 123_457  # from what had arrived
    server.requests.clear()
    assert download([f"{server.url}/{name}" for name in names], tmp_path, progress=False) == files
    assert all(method == "HEAD" for method, *_ in server.requests)  # complete already: nothing fetched again


def test_checksums_are_verified(server, tmp_path):
    name = sorted(FILES)[0]
    server.md5 = "etag"
    assert download([f"{server.url}/{name}"], tmp_path / "etag", progress=False)[0].read_bytes() == FILES[name]
    server.md5 = "wrong"
    with pytest.raises(DataError, match="md5 .* does not match the expected .*; moved the file to .*bad"):
        download([f"{server.url}/{name}"], tmp_path / "wrong", progress=False)
    bad = tmp_path / "wrong" / f"{name}.bad"  # neither a file under its name nor a partial one to continue
    assert list((tmp_path / "wrong").iterdir()) == [bad]
    server.md5 = "none"
    with pytest.raises(DataError, match="sha256 .* does not match the expected 00"):
        download([f"{server.url}/{name}"], tmp_path / "sha", sha256={name: "00" * 32}, progress=False)
    good = {name: hashlib.sha256(FILES[name]).hexdigest()}
    assert download([f"{server.url}/{name}"], tmp_path / "sha", sha256=good, progress=False)[0].read_bytes() == FILES[name]


def test_a_server_without_ranges_and_the_command_line(server, tmp_path):
    server.ranges, server.md5 = False, "none"
    name = sorted(FILES)[1]
    listing = tmp_path / "run_download.sh"  # OLMo's is a shell script of wget lines
    listing.write_text("".join(f"wget {server.url}/{n} -O data/{n}\n" for n in sorted(FILES)) + f"wget {server.url}/{name}\n")
    assert urls_in(listing.read_text()) == [f"{server.url}/{n}" for n in sorted(FILES)]
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{name}.part").write_bytes(b"stale bytes of an older download")  # the server cannot continue it: replaced
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "download_data.py"), str(listing), "--out", str(out), "--workers", "2"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert all((out / n).read_bytes() == body for n, body in FILES.items()) and not list(out.glob("*.part"))
    (out / "x").mkdir()
    with pytest.raises(DataError, match="the server answered 404"):
        download([f"{server.url}/missing.npy"], out / "x", progress=False)


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_a_file_changed_on_the_server_between_attempts_restarts_instead_of_being_spliced(server, tmp_path, validator):
    """The connection drops inside version 1 (retries=0: the run fails and keeps its .part); the file then changes
    on the server, keeping its length, so only its version tells. The next run's range request carries If-Range (the
    first response's ETag or Last-Modified), the server answers with the whole new file, and that is what ends up on
    disk, not the old head spliced onto the new tail."""
    name = sorted(FILES)[0]
    url = f"{server.url}/{name}"
    server.md5, server.validator = "none", validator
    server.cut[name] = 100_000  # more than one read (CHUNK_BYTES): some of it arrives
    with pytest.raises(DataError, match="run the download again to continue from"):
        download([url], tmp_path, retries=0, progress=False)
    have = (tmp_path / f"{name}.part").read_bytes()
    assert 0 < len(have) <= 100_000 and FILES[name].startswith(have)
    started_as = [if_range for *_, if_range in server.requests]
    server.files[name] = new = np.random.default_rng(99).integers(0, 50280, len(FILES[name]) // 2, dtype=np.uint16).tobytes()
    server.requests.clear()
    assert download([url], tmp_path, retries=0, progress=False)[0].read_bytes() == new
    (get,) = [request for request in server.requests if request[0] == "GET"]
    assert get[2] == f"bytes={len(have)}-" and get[3] is not None and started_as == [None, None]  # If-Range: version 1's
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no .part, no .part.if-range


def test_a_partial_file_longer_than_the_servers_is_downloaded_again(server, tmp_path):
    name = sorted(FILES)[1]
    (tmp_path / f"{name}.part").write_bytes(FILES[name] + b"the tail of an older, longer version")
    assert download([f"{server.url}/{name}"], tmp_path, progress=False)[0].read_bytes() == FILES[name]
    assert [(method, byte_range) for method, _, byte_range, _ in server.requests] == [("HEAD", None), ("GET", None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_sha256_is_checked_for_files_already_complete(server, tmp_path):
    """A file of the right length but other bytes is complete by its size; --sha256 (one hex digest for one URL, on
    the command line) catches it: a one-line error, the file moved to <name>.bad, and the next run downloads it."""
    name = sorted(FILES)[2]
    url, digest = f"{server.url}/{name}", hashlib.sha256(FILES[name]).hexdigest()
    server.md5 = "none"
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(bytes(len(FILES[name])))
    command = [sys.executable, str(REPO / "scripts" / "download_data.py"), url, "--out", str(out), "--sha256", digest]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    wrong = hashlib.sha256(bytes(len(FILES[name]))).hexdigest()
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr == (
        f"error: {url}: sha256 {wrong} does not match the expected {digest}; moved the file to {out / name}.bad "
        "(delete it once looked at): run the download again for a fresh copy\n"
    )
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.bad"]
    assert download([url], out, sha256=digest, progress=False)[0].read_bytes() == FILES[name]
    with pytest.raises(DataError, match="one sha256 digest for 2 URLs"):
        download([url, f"{server.url}/{sorted(FILES)[0]}"], out, sha256=digest, progress=False)
    with pytest.raises(DataError, match="'abc' is not a sha256 digest"):
        download([url], out, sha256={name: "abc"}, progress=False)
    read_digests = runpy.run_path(command[1])["read_digests"]  # the script's --sha256 reader
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{digest}  *{name}\n\n{digest}  other.npy\n")
    assert read_digests(str(sums)) == {name: digest, "other.npy": digest} and read_digests(digest) == digest
    sums.write_text(f"{digest}  {name}\n{digest}\n")
    with pytest.raises(DataError) as err:
        read_digests(str(sums))
    assert str(err.value) == f"{sums} line 2: expected '<sha256 hex>  <file name>' (sha256sum output), got '{digest}'"
