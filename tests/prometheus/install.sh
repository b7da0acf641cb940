#!/usr/bin/env bash
# Installs the real Prometheus that tests/tests/prometheus.rs runs: Debian bookworm's
# `prometheus` package (2.42). The test starts its own server on loopback with its own
# config and data directory; the packaged system service is never started.
#
# Result: /usr/bin/prometheus (KUBETRAIN_PROMETHEUS overrides the path the test uses).
# Idempotent: an installed package is left alone. Root only if the package is missing.
set -euo pipefail

log() { printf '[prometheus-install] %s\n' "$*" >&2; }

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ -n "${KUBETRAIN_PROMETHEUS:-}" ]; then
	log "using KUBETRAIN_PROMETHEUS=$KUBETRAIN_PROMETHEUS"
	exit 0
fi

if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'install ok installed'; then
	as_root apt-get update -qq
	# The package's postinst starts a system Prometheus on :9090 through invoke-rc.d,
	# which would take the trainers' metrics port (they bind <pod IP>:9090). A
	# policy-rc.d that exits 101 forbids that; an existing policy file is respected.
	made_policy=0
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
		as_root chmod 755 /usr/sbin/policy-rc.d
		made_policy=1
	fi
	log "apt-get install prometheus"
	rc=0
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus || rc=$?
	if [ "$made_policy" -eq 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
	[ "$rc" -eq 0 ] || exit "$rc"
fi

# A service manager that started it anyway is told to stop.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
	as_root systemctl stop prometheus || true
	as_root systemctl disable prometheus >/dev/null 2>&1 || true
fi

version=$(/usr/bin/prometheus --version 2>&1 | head -1)
log "$version"
case "$version" in
*"version 2."*) ;;
*)
	log "expected Prometheus 2.x, got: $version"
	exit 1
	;;
esac
