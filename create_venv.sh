#!/usr/bin/env bash
# Make ./venv with the pinned dependencies. Safe to re-run: an existing venv is brought up to the pins.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x venv/bin/python ]; then
  "$PYTHON" -m venv venv
fi
bash ./update_req.sh
