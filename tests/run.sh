#!/usr/bin/env bash
# The test command (README): installs the Redis servers the tests start if
# they are missing, then runs every test of the workspace. Extra arguments
# go to `cargo test` (e.g. `tests/run.sh -p engine`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo test --workspace --locked "$@"
