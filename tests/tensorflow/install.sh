#!/usr/bin/env bash
# Installs real TensorFlow (CPU) into a cached virtualenv for the tests that run the
# programs in examples/tensorflow and tests/fixtures/tensorflow as pods.
#
# Result: ${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}/tf-venv/bin/python, with the exact
# set pinned in requirements.txt beside this script.
#
# requirements.txt is a complete lock and is installed with --no-deps, so pip never
# resolves anything outside it; `pip check` then proves the set is closed.
#
# Idempotent: a stamp file in the venv holds the sha256 of requirements.txt, so a re-run
# with the same file is instant, and a changed file rebuilds the venv from scratch (a
# fresh venv rather than an upgrade in place, so no package dropped from the file
# lingers). pip's own cache is kept, so a rebuild downloads nothing it already has.
# Needs Python 3.11 (the pins were resolved for it); KUBETRAIN_PYTHON picks the
# interpreter (default: python3). Root only if python3-venv must be installed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQS=$HERE/requirements.txt
PYTHON=${KUBETRAIN_PYTHON:-python3}

CACHE=${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}
VENV=$CACHE/tf-venv
STAMP=$VENV/kubetrain-requirements.sha256
mkdir -p "$CACHE"

log() { printf '[tf-install] %s\n' "$*" >&2; }

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Two test binaries may call this at once; the second waits and then finds the stamp.
exec 9>"$CACHE/tf-venv.lock"
flock 9

want=$(sha256sum "$REQS" | cut -d' ' -f1)

# The stamp alone is not enough: the venv's python is a link to the base interpreter,
# which may have been removed or replaced since.
venv_ok() {
	[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c '' 2>/dev/null
}

make_venv() {
	rm -rf "$VENV"
	if "$PYTHON" -m venv "$VENV" 2>/dev/null; then return 0; fi
	# Debian's python3 ships venv without ensurepip; python3-venv brings it.
	rm -rf "$VENV"
	log "'$PYTHON -m venv' failed; installing Debian's python3-venv"
	as_root apt-get update -qq
	local ver
	ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		python3-venv "python$ver-venv" ||
		as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
	"$PYTHON" -m venv "$VENV"
}

if venv_ok; then
	log "venv up to date: $VENV"
else
	log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
	make_venv
	log "pip install -r $REQS (cold: ~40 s here; the venv is ~1.6 GB)"
	start=$SECONDS
	PIP_NO_INPUT=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$REQS"
	# Any gap is a missing pin (or a wrong one).
	gaps=$("$VENV/bin/python" -m pip check 2>&1 || true)
	if [ "$gaps" != "No broken requirements found." ]; then
		log "requirements.txt is not a closed set:"
		printf '%s\n' "$gaps" >&2
		exit 1
	fi
	log "installed in $((SECONDS - start)) s"
	# Written last, so an interrupted install is redone on the next run.
	echo "$want" >"$STAMP"
fi

# Import check. Level 2 hides the CPU-feature notice; the oneDNN line is logged before
# absl reads it and shows anyway.
TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2} "$VENV/bin/python" -c 'import tensorflow as tf; print(tf.__version__)'
echo "python=$VENV/bin/python"
