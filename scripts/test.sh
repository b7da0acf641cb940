#!/usr/bin/env bash
# The project's one test command (README, .ci/run): installs what the tests run for real if
# it is not cached yet (the API-server harness binaries, a virtualenv with TensorFlow), then
# runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/envtest/install.sh
bash tests/tensorflow/install.sh
bash tests/prometheus/install.sh
exec cargo test --workspace --locked "$@"
