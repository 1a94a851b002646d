#!/usr/bin/env bash
# The README's test command: installs what the tests need (nothing by hand), then runs every
# test of the workspace. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

# The outside-reader test reads the events table with Python's deltalake (PyPI).
if ! python3 -c "import deltalake, pyarrow" >/dev/null 2>&1; then
  echo "installing python deltalake + pyarrow for the outside-reader test…"
  python3 -m pip install --quiet --disable-pip-version-check deltalake pyarrow
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
