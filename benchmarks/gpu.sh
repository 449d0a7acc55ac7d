#!/usr/bin/env bash
# Every GPU measurement of the README in one command (benchmarks/gpu.py; its docstring lists the steps):
#   bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--data DIR] [--steps a,b] [--budget-s S] [--commit SHA]
# On the lent GPU machine (no internet, no DVC, maybe no zarr): the wheels that ../shared/gpu/pack.sh put in
# .device/whl are installed into a temporary target first when the imports are missing. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
need='import zarr, numcodecs, donfig, google_crc32c, ruamel.yaml, tqdm, h5py, click'
if ! "$py" -c "$need" 2>/dev/null; then
  if ! compgen -G "$repo/.device/whl/*.whl" >/dev/null; then
    echo "gpu.sh: error: $py lacks a package ($need) and .device/whl has no wheels. Run bash ../shared/gpu/pack.sh" \
      "on a machine with the package index, then carry .device" >&2
    exit 2
  fi
  site=${BANCACHE_SITE:-/tmp/site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$repo"/.device/whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "$need"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$repo/benchmarks/gpu.py" "$@"
