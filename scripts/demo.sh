#!/usr/bin/env bash
# The main job on the built-in defaults: no server, no download. Sets up .venv on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" ""  # no extras (an explicit argument, or the demo's own would be read as extras)
exec glimpse demo "$@"
