#!/usr/bin/env bash
# Lint and the whole test suite (no GPU, no network). Sets up .venv with the dev extras on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
ruff check src tests bench
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that counts as a failure" >&2
  exit 1
fi
exit "$status"
