#!/usr/bin/env bash
# The main job on the built-in defaults: no server, no download. Sets up .venv on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec glimpse demo "$@"
