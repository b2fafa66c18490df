#!/usr/bin/env bash
# The device check (scripts/device_check.py says what it runs), with this checkout's package first.
#   scripts/device_check.sh --out device-check               # CUDA, at most 8 minutes
#   scripts/device_check.sh --device cpu --out device-check  # the same steps at small sizes
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "${PYTHON:-python}" "$root/scripts/device_check.py" "$@"
