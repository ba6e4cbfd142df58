"""Download files by URL, resumable and in parallel (see docs/data.md): e.g. OLMo's C4 token files for source=npy.

python scripts/download_data.py run_download.sh --out /data/c4 --workers 8     # the URLs found in a list or script
python scripts/download_data.py https://host/part-000-00000.npy --out /data/c4
"""

import argparse
import logging
import sys
from pathlib import Path

from fope_lm.data.download import download, urls_in
from fope_lm.errors import FopeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="URLs, or files listing them (any text: every http(s) URL in it)")
    parser.add_argument("--out", type=Path, required=True, help="directory the files go to (under their own names)")
    parser.add_argument("--workers", type=int, default=4, help="files downloaded at a time")
    parser.add_argument("--sha256", type=Path, help="a `sha256sum` output file: '<hex>  <file name>' per line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    urls = [url for source in args.sources for url in (urls_in(Path(source).read_text()) if Path(source).is_file() else [source])]
    if not urls:
        print(f"error: no http(s) URL in {' '.join(args.sources)}", file=sys.stderr)
        return 2
    digests = {}
    if args.sha256:
        for line in args.sha256.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                digests[Path(name.lstrip("*")).name] = digest
    try:
        files = download(urls, args.out, workers=args.workers, sha256=digests)
    except FopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(files)} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
