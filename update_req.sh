#!/usr/bin/env bash
# Bring ./venv to the exact pins of requirements.txt (installs what is missing, moves what differs).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x venv/bin/python ]; then
  echo "no venv/ here: run ./create_venv.sh first" >&2
  exit 1
fi
venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# requirements.txt doubles as the constraints file, so a package that depends on torch or torchvision
# can never pull a different build of either.
PIP_CONSTRAINT="$PWD/requirements.txt" venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -r requirements.txt
venv/bin/python -m pip check
