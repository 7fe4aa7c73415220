#!/usr/bin/env bash
# Creates .venv with the pinned packages (constraints.txt) and installs this
# project into it in editable mode. Idempotent: does nothing when the stamp
# (hash of pyproject.toml + constraints.txt) is current.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
hash=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$hash"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip 26 refuses merlin-systems 23.8.0's sdist; pip 24.0 installs it.
"$VENV/bin/python" -m pip install -q "pip==24.0"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
# perf_analyzer (bundled in tritonclient 2.51.0) needs libb64.so.0d; only the
# serving benchmark uses it, so a failure here is a warning, not an error.
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null) \
      || echo "warning: could not install libb64-0d; perf_analyzer (make bench-serving) will not start" >&2
  else
    echo "warning: libb64-0d missing (apt-get install libb64-0d); needed by perf_analyzer only" >&2
  fi
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "setup: $VENV ready"
