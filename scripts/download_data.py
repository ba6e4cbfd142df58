"""Download files by URL, resumable and in parallel (see docs/data.md): e.g. OLMo's C4 token files for source=npy.

python scripts/download_data.py run_download.sh --out /data/c4 --workers 8     # the URLs found in a list or script
python scripts/download_data.py https://host/part-000-00000.npy --out /data/c4
"""

import argparse
import logging
import re
import sys
from pathlib import Path

from fope_lm.data.download import download, urls_in
from fope_lm.errors import DataError, FopeError


def read_digests(value: str | None) -> dict[str, str] | str | None:
    """--sha256: one hex digest as it is, or a sha256sum output file as file name -> digest."""
    if value is None or re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return value
    try:
        lines = Path(value).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--sha256 {value}: neither a sha256 hex digest nor a readable sha256sum file ({err})") from None
    digests = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(words := line.split(maxsplit=1)) != 2:
            raise DataError(f"{value} line {number}: expected '<sha256 hex>  <file name>' (sha256sum output), got {line!r}")
        digests[Path(words[1].lstrip("*")).name] = words[0]
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="URLs, or files listing them (any text: every http(s) URL in it)")
    parser.add_argument("--out", type=Path, required=True, help="directory the files go to (under their own names)")
    parser.add_argument("--workers", type=int, default=4, help="files downloaded at a time")
    parser.add_argument(
        "--sha256", help="a `sha256sum` output file ('<hex>  <file name>' per line), or one hex digest for one URL; also "
        "checked for files already complete, and a file that fails it is moved to <name>.bad"
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    urls = [url for source in args.sources for url in (urls_in(Path(source).read_text()) if Path(source).is_file() else [source])]
    if not urls:
        print(f"error: no http(s) URL in {' '.join(args.sources)}", file=sys.stderr)
        return 2
    try:
        files = download(urls, args.out, workers=args.workers, sha256=read_digests(args.sha256))
    except FopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(files)} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
