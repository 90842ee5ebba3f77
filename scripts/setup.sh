#!/usr/bin/env bash
# Shared set-up, sourced by demo.sh and test.sh: a virtual environment in .venv with Glimpse installed.
# Usage: source scripts/setup.sh [extras]   (extras such as "dev"; empty for the runtime only)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python_bin=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    python_bin="$candidate"
    break
  fi
done
if [ -z "$python_bin" ]; then
  echo "Glimpse needs Python 3.11 or newer; none was found on PATH." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv with $("$python_bin" --version)" >&2
  "$python_bin" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi

extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.glimpse-installed-${extras:-runtime}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # The hf extra needs torch. Install the pinned build first unless one is already there, so pip does not
  # pick another (on a CPU-only machine: a CPU build from your index; on a GPU machine install yours first).
  case ",$extras," in
    *,dev,*|*,hf,*)
      .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
      ;;
  esac
  .venv/bin/python -m pip install --quiet --editable "$spec"
  case ",$extras," in
    *,dev,*)  # the verl plugin's tests: verl without its dependencies (see scripts/verl-test-requirements.txt)
      .venv/bin/python -m pip install --quiet --no-deps "verl==0.9.1"
      .venv/bin/python -m pip install --quiet -r scripts/verl-test-requirements.txt
      ;;
  esac
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
