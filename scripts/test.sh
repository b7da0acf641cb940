#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs the real API-server harness
# binaries if they are not cached yet, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f tests/envtest/install.sh ]; then
  bash tests/envtest/install.sh
fi
exec cargo test --workspace --locked "$@"
