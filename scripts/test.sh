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

# The scale-out test keeps its tables on moto's S3 server (PyPI).
if ! python3 -c "import moto.server, flask_cors" >/dev/null 2>&1; then
  echo "installing moto[server] (an S3-compatible server) for the scale-out test…"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi

# The Postgres-protocol test runs the stock client (psql); the browser test drives headless
# Chromium; the scale-out test starts nats-server (JetStream) and redis-server on loopback
# itself. All come from Debian packages.
missing=()
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (Debian packages) for the Postgres-protocol, browser and scale-out tests…"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
