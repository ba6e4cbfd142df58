"""Download URL lists like OLMo's (`commands/run_download.sh` of the FoPE code lists its 171 C4 token files):
resumable, parallel, verified where the server says what the bytes should be, with progress bars.

Each file is written to `<name>.part` beside its destination and renamed into place once whole and verified, so a
file under its final name is always complete. A `.part` left by a killed run, or by a connection that dropped, is
continued with an HTTP range request (from its size) with If-Range: the ETag (or Last-Modified) of the response that
started it, kept in `<name>.part.if-range`, so a file changed on the server since then is sent whole and replaces the
partial one rather than being spliced onto it; so does a server that ignores ranges. A `.part` longer than the
server's Content-Length is discarded. Verified: the length against Content-Length, and the content against
Content-MD5, an S3/R2-style ETag that is a plain MD5 (single-part uploads), or a sha256 the caller gives (also for
files already complete); a file that fails a checksum is moved to `<name>.bad` and the next run downloads it anew.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from fope_lm.errors import DataError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16  # read and written at a time: what a dropped connection loses at most
URL = re.compile(r"https?://[^\s'\"]+")


def urls_in(text: str) -> list[str]:
    """Every http(s) URL of a list or of a download script (`wget URL -O ...` lines), in order, once each."""
    return list(dict.fromkeys(URL.findall(text)))


def destination(url: str, out_dir: Path) -> Path:
    name = Path(unquote(urlparse(url).path)).name
    if not name:
        raise DataError(f"{url} names no file (its path ends with /): download it by a URL that ends with its file name")
    return Path(out_dir) / name


def download(
    urls: Iterable[str],
    out_dir: str | Path,
    *,
    workers: int = 4,
    sha256: Mapping[str, str] | str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Download every URL into out_dir (keeping its file name), `workers` at a time; return the files, in order.

    Files already complete are skipped (their size matches the server's Content-Length, and their sha256 the
    expected one when given); partial ones continue. A dropped connection is retried `retries` times from where it
    stopped. sha256: file name -> expected hex digest, or one hex digest when there is one URL.
    """
    urls = list(urls)
    out_dir = Path(out_dir)
    targets = [destination(url, out_dir) for url in urls]
    if len(set(targets)) < len(targets):
        raise DataError("two URLs have the same file name; download them into different dirs")
    if isinstance(sha256, str):
        if len(targets) != 1:
            raise DataError(f"one sha256 digest for {len(targets)} URLs: pass a sha256sum file that names each file instead")
        sha256 = {targets[0].name: sha256}
    sha256 = dict(sha256 or {})
    if bad := [digest for digest in sha256.values() if not re.fullmatch(r"[0-9a-fA-F]{64}", digest)]:
        raise DataError(f"{bad[0]!r} is not a sha256 digest (64 hex characters): check the --sha256 value or file")
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [
            pool.submit(_fetch, url, target, sha256.get(target.name), retries, timeout, position if progress else None)
            for position, (url, target) in enumerate(zip(urls, targets, strict=True))
        ]
        return [job.result() for job in jobs]


def _fetch(url: str, target: Path, sha256: str | None, retries: int, timeout: float, position: int | None) -> Path:
    partial = target.with_name(target.name + ".part")
    with requests.Session() as session:
        head = session.head(url, allow_redirects=True, timeout=timeout)
        if head.status_code >= 400:
            raise DataError(f"{url}: the server answered {head.status_code} {head.reason}")
        total = int(head.headers["Content-Length"]) if "Content-Length" in head.headers else None
        if target.is_file() and (total is None or target.stat().st_size == total):
            _verify(target, url, None, sha256)
            logger.info("%s is complete already", target)
            return target
        expected_md5 = _server_md5(head.headers)
        if total is not None and partial.is_file() and partial.stat().st_size > total:
            logger.warning("%s has %d bytes, more than the %d of %s: downloading it again", partial, partial.stat().st_size, total, url)
            partial.unlink()
        for attempt in range(retries + 1):
            try:
                _continue(session, url, partial, total, timeout, position)
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                if attempt == retries:
                    raise DataError(f"{url}: {err}; run the download again to continue from {partial}") from None
                logger.warning("%s: %s; continuing from byte %d", url, err, partial.stat().st_size if partial.exists() else 0)
    size = partial.stat().st_size
    if total is not None and size != total:
        raise DataError(f"{url}: got {size} bytes, the server announced {total}; run the download again to continue")
    _verify(partial, url, expected_md5, sha256)
    os.replace(partial, target)
    _if_range_file(partial).unlink(missing_ok=True)
    return target


def _continue(session: requests.Session, url: str, partial: Path, total: int | None, timeout: float, position: int | None) -> None:
    """Append the rest of the file to `partial`, from its size (a range request, valid only for the version of the
    file that `partial` was started from: If-Range), or rewrite it whole."""
    have = partial.stat().st_size if partial.exists() else 0
    if total is not None and have == total:
        return
    if_range = _if_range_file(partial)
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have and if_range.is_file():
        headers["If-Range"] = if_range.read_text()
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # nothing left to send: the partial file is whole
            return
        response.raise_for_status()
        resumed = response.status_code == 206
        if have and not resumed:
            logger.info("%s changed since %s was started, or ignores range requests: downloading it from the start", url, partial)
        if not resumed:  # what a later range request must match: a strong ETag, else Last-Modified
            etag = response.headers.get("ETag", "")
            validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
            if validator:
                if_range.write_text(validator)
            else:
                if_range.unlink(missing_ok=True)
        with (
            open(partial, "ab" if resumed else "wb") as file,
            tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True, desc=partial.name[:-5],
                 position=position, leave=False, disable=position is None) as bar,
        ):  # fmt: skip
            for chunk in response.iter_content(CHUNK_BYTES):
                file.write(chunk)
                bar.update(len(chunk))


def _if_range_file(partial: Path) -> Path:
    """Beside `<name>.part`: the ETag or Last-Modified of the response that started it."""
    return partial.with_name(partial.name + ".if-range")


def _server_md5(headers: Mapping[str, str]) -> str | None:
    """The MD5 (hex) a server states for the content: Content-MD5, or an ETag that is one (no multipart suffix)."""
    if "Content-MD5" in headers:
        return base64.b64decode(headers["Content-MD5"]).hex()
    etag = headers.get("ETag", "").strip('"')
    return etag.lower() if re.fullmatch(r"[0-9a-fA-F]{32}", etag) else None


def _verify(path: Path, url: str, md5: str | None, sha256: str | None) -> None:
    """Check the file's content; one that does not match is moved to `<name>.bad` (never continued or used)."""
    for name, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        digest = hashlib.new(name)
        with open(path, "rb") as file:
            while block := file.read(CHUNK_BYTES):
                digest.update(block)
        if digest.hexdigest() != expected.lower():
            target = path.with_name(path.name.removesuffix(".part"))
            bad = target.with_name(target.name + ".bad")
            os.replace(path, bad)
            _if_range_file(target.with_name(target.name + ".part")).unlink(missing_ok=True)
            raise DataError(
                f"{url}: {name} {digest.hexdigest()} does not match the expected {expected}; moved the file to {bad} "
                "(delete it once looked at): run the download again for a fresh copy"
            )
