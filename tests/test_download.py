"""The download helper (fope_lm.data.download, scripts/download_data.py) against a local HTTP server on 127.0.0.1
started here: range requests continue a partial file and a dropped connection, Content-MD5 / ETag / sha256 verify
the bytes, several files download in parallel, and a server without range support still gives whole files."""

import base64
import hashlib
import http.server
import subprocess
import sys
import threading

import numpy as np
import pytest

from fope_lm.data.download import download, urls_in
from fope_lm.errors import DataError

from conftest import REPO

FILES = {f"part-{i:03d}-00000.npy": np.random.default_rng(i).integers(0, 50280, 150_000 + i, dtype=np.uint16).tobytes() for i in range(3)}


class Server(http.server.ThreadingHTTPServer):
    """Serves FILES; `cut` maps a name to a byte count after which its next full GET drops the connection;
    `ranges` off makes it ignore Range headers; `md5` chooses how it states checksums (content-md5, etag, none,
    wrong); every request's (method, path, Range) is recorded."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.cut, self.ranges, self.md5, self.requests = {}, True, "content-md5", []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _headers(self, body: bytes, status: int, length: int):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
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
        body = FILES.get(name)
        if body is None:
            self.send_error(404)
        return body

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, None))
        if (body := self._body(self.path.lstrip("/"))) is not None:
            self._headers(body, 200, len(body))

    def do_GET(self):
        name, byte_range = self.path.lstrip("/"), self.headers.get("Range")
        self.server.requests.append(("GET", self.path, byte_range))
        if (body := self._body(name)) is None:
            return
        start = int(byte_range.removeprefix("bytes=").rstrip("-")) if byte_range and self.server.ranges else 0
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
    gets = {(path.lstrip("/"), byte_range) for method, path, byte_range in server.requests if method == "GET"}
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
    with pytest.raises(DataError, match="md5 .* does not match the expected"):
        download([f"{server.url}/{name}"], tmp_path / "wrong", progress=False)
    assert not list((tmp_path / "wrong").iterdir())  # neither a file under its name nor a corrupt partial one
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
