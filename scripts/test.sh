#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install what the tests need when it is
# absent (redis-server, nginx, wrk from Debian; Python deps from PyPI), then ruff, mypy
# and pytest. CI runs exactly this (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing from Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "== ruff";  python3 -m ruff check .
echo "== mypy";  python3 -m mypy
echo "== pytest"
python3 -m pytest -q -p no:cacheprovider "$@"
