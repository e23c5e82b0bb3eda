#!/usr/bin/env bash
# Python packages that need special install steps (kept here so .ci/run stays readable).
set -euo pipefail
# pynat's setup.py imports six at build time: install six first and build without isolation.
python3 -m pip install -q six
python3 -m pip install -q --no-build-isolation pynat
