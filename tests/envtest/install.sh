#!/usr/bin/env bash
# Installs the two binaries the real-API-server test tier needs (DESIGN.md §6.3):
#   etcd            from Debian's `etcd-server` package;
#   kube-apiserver  built from Debian bookworm's *source* package `kubernetes`
#                   (1.20.2, full upstream tree with vendor/) with Debian's golang-go.
#
# Result: ${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}/bin/{etcd,kube-apiserver}.
# The Rust fixture (tests/src/envtest.rs) looks there; KUBETRAIN_ETCD and
# KUBETRAIN_APISERVER override either path.
#
# Idempotent: a stamp file next to the built binary makes re-runs instant.
# Must run as root (apt-get). The system's apt sources are left unchanged: the
# deb-src line lives in a private apt state directory.
set -euo pipefail

KUBE_SRC_PKG=kubernetes
KUBE_VERSION_EXPECTED=1.20
# Bump when the build recipe (patches, flags) changes so cached binaries are rebuilt.
RECIPE=3

CACHE=${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}
BIN=$CACHE/bin
STAMP=$BIN/kube-apiserver.stamp
mkdir -p "$BIN"

log() { printf '[envtest-install] %s\n' "$*" >&2; }

# The build tree (~1 GiB with the Go build cache) is removed on any exit;
# KUBETRAIN_KEEP_BUILD=1 keeps it for debugging.
BUILD_WORK=""
cleanup() {
	if [ -n "$BUILD_WORK" ] && [ -z "${KUBETRAIN_KEEP_BUILD:-}" ]; then
		rm -rf "$BUILD_WORK"
	fi
}
trap cleanup EXIT

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- apt helpers -------------------------------------------------------------

APT_UPDATED=0
apt_update_once() {
	if [ "$APT_UPDATED" -eq 0 ]; then
		log "apt-get update"
		as_root apt-get update -qq
		APT_UPDATED=1
	fi
}

# Installs the named Debian packages that are not installed yet.
apt_install() {
	local missing=()
	local p
	for p in "$@"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$p")
		fi
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	apt_update_once
	# Debian packages that ship a service (etcd-server) start it from their
	# postinst via invoke-rc.d; a policy-rc.d that exits 101 forbids that, so no
	# system etcd is left running on the test ports' machine. Respect an existing
	# policy file (container images usually ship one).
	local made_policy=0
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
		as_root chmod 755 /usr/sbin/policy-rc.d
		made_policy=1
	fi
	log "apt-get install ${missing[*]}"
	local rc=0
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
	if [ "$made_policy" -eq 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
	return "$rc"
}

# --- etcd --------------------------------------------------------------------

install_etcd() {
	if [ -n "${KUBETRAIN_ETCD:-}" ]; then
		log "using KUBETRAIN_ETCD=$KUBETRAIN_ETCD"
		return 0
	fi
	if [ ! -x /usr/bin/etcd ]; then
		apt_install etcd-server
	fi
	# If a service manager did start the packaged etcd anyway, stop it: the
	# harness runs its own etcd on free ports with its own data dir.
	if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
		as_root systemctl stop etcd || true
		as_root systemctl disable etcd >/dev/null 2>&1 || true
	fi
	ln -sfn /usr/bin/etcd "$BIN/etcd"
}

# --- kube-apiserver ----------------------------------------------------------

# Prints "URI SUITE" of the Debian archive this machine already uses for the
# release suite (not -security/-updates), from deb822 *.sources or one-line
# *.list files.
debian_mirror() {
	local codename
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[ -n "$codename" ] || { log "cannot read VERSION_CODENAME from /etc/os-release"; return 1; }
	local files=()
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] && files+=("$f")
	done
	local found
	found=$(awk -v cn="$codename" '
		function flush() {
			if (!done && types ~ /(^| )deb( |$)/ && uris != "" && (" " suites " ") ~ (" " cn " ") && (" " comps " ") ~ / main /) {
				split(uris, u, " "); print u[1] " " cn; done = 1; exit
			}
			types = ""; uris = ""; suites = ""; comps = ""
		}
		# mawk has no ENDFILE: a new file ends the previous stanza.
		FNR == 1 { flush() }
		FILENAME ~ /\.sources$/ {
			if ($0 ~ /^[ \t]*$/) { flush(); next }
			if ($0 ~ /^[ \t]*#/) next
			key = tolower($1); $1 = ""; sub(/^ +/, "")
			if (key == "types:") types = $0
			else if (key == "uris:") uris = $0
			else if (key == "suites:") suites = $0
			else if (key == "components:") comps = $0
			next
		}
		# one-line format: deb [opts] URI SUITE COMPONENTS...
		$1 == "deb" {
			i = 2
			if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
			if (!done && $(i + 1) == cn) { print $i " " cn; done = 1; exit }
		}
		END { flush() }
	' "${files[@]}")
	[ -n "$found" ] || { log "no '$codename main' deb source found in /etc/apt"; return 1; }
	echo "$found"
}

# Brings the vendored github.com/modern-go/reflect2 (v1.0.1) to v1.0.2's map
# iteration: since Go 1.18, reflect.mapiterinit is `func(t, m, it *hiter)` and
# writes a caller-allocated, full-size hiter. v1.0.1 links it as
# `func(t, m) *hiter` with a 2-field hiter, so the runtime scribbles over memory
# it does not own and the server dies with `fatal error: fault` after ~25 s.
patch_reflect2() {
	local dir=$1/vendor/github.com/modern-go/reflect2
	[ -d "$dir" ] || { log "vendored reflect2 not found at $dir"; return 1; }
	if [ -f "$dir/go_above_118.go" ]; then
		log "reflect2 already has go_above_118.go; leaving it"
		return 0
	fi
	log "patching vendored reflect2 to v1.0.2 mapiterinit"
	# 1. Drop v1.0.1's mapiterinit declaration and short hiter from unsafe_link.go,
	#    and its UnsafeIterate from unsafe_map.go; both move to the files below.
	perl -0pi -e '
		s{\n(//[^\n]*\n)*//go:linkname mapiterinit reflect\.mapiterinit\nfunc mapiterinit\([^\n]*\n}{\n}s or die "mapiterinit decl not found\n";
		s{\n(//[^\n]*\n)*type hiter struct \{.*?\n\}\n}{\n}s or die "hiter struct not found\n";
	' "$dir/unsafe_link.go"
	perl -0pi -e '
		s{\nfunc \(type2 \*UnsafeMapType\) UnsafeIterate\(obj unsafe\.Pointer\) MapIterator \{.*?\n\}\n}{\n}s or die "UnsafeIterate not found\n";
	' "$dir/unsafe_map.go"
	# 2. The full hiter layout, as in reflect2 v1.0.2 (runtime/map.go of Go 1.x).
	cat >"$dir/unsafe_hiter.go" <<'GO'
package reflect2

import "unsafe"

// A hash iteration structure.
// If you modify hiter, also change cmd/internal/gc/reflect.go to indicate
// the layout of this structure.
type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}
GO
	# 3. Version-specific linkname, as in reflect2 v1.0.2.
	cat >"$dir/go_above_118.go" <<'GO'
//+build go1.18

package reflect2

import (
	"unsafe"
)

// m escapes into the return value, but the caller of mapiterinit
// doesn't let the return value escape.
//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)

func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {
	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,
		pKeyRType:  type2.pKeyRType,
		pElemRType: type2.pElemRType,
	}
}
GO
	cat >"$dir/go_below_118.go" <<'GO'
//+build !go1.18

package reflect2

import (
	"unsafe"
)

// m escapes into the return value, but the caller of mapiterinit
// doesn't let the return value escape.
//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) (val *hiter)

func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {
	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),
		pKeyRType:  type2.pKeyRType,
		pElemRType: type2.pElemRType,
	}
}
GO
}

build_apiserver() {
	if [ -n "${KUBETRAIN_APISERVER:-}" ]; then
		log "using KUBETRAIN_APISERVER=$KUBETRAIN_APISERVER"
		return 0
	fi
	if [ -x "$BIN/kube-apiserver" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "recipe=$RECIPE" ]; then
		return 0
	fi
	apt_install golang-go rsync make dpkg-dev gcc libc6-dev git ca-certificates

	local mirror suite found
	found=$(debian_mirror)
	read -r mirror suite <<<"$found"
	log "source package $KUBE_SRC_PKG from $suite (the machine's own mirror)"

	local work
	work=$(mktemp -d "${TMPDIR:-/tmp}/kubetrain-apiserver-build.XXXXXX")
	BUILD_WORK=$work

	# Private apt state: its own sources list (a single deb-src line), lists and
	# cache, so the system's apt configuration and lists are not touched.
	local apt="$work/apt"
	mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
	local signed_by=""
	[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] && signed_by="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
	echo "deb-src ${signed_by}$mirror $suite main" >"$apt/sources.list"
	local aptopts=(
		-o "Dir::Etc::SourceList=$apt/sources.list"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::State::Lists=$apt/lists"
		-o "Dir::Cache=$apt/cache"
		-o "Dir::Cache::pkgcache="
		-o "Dir::Cache::srcpkgcache="
		-o "APT::Sandbox::User=root"
	)
	apt-get "${aptopts[@]}" update -qq
	mkdir -p "$work/src"
	(cd "$work/src" && apt-get "${aptopts[@]}" source -qq "$KUBE_SRC_PKG" >/dev/null)
	local tree
	tree=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name "${KUBE_SRC_PKG}-*" | head -n1)
	[ -n "$tree" ] || { log "apt-get source produced no ${KUBE_SRC_PKG}-* directory"; return 1; }
	log "extracted $(basename "$tree")"

	# GOPATH layout the 1.20 build scripts expect.
	export GOPATH="$work/gopath"
	mkdir -p "$GOPATH/src/k8s.io"
	mv "$tree" "$GOPATH/src/k8s.io/kubernetes"
	local k="$GOPATH/src/k8s.io/kubernetes"
	patch_reflect2 "$k"

	log "building kube-apiserver (cold: ~6 min on 2 cores)"
	local start=$SECONDS
	(
		cd "$k"
		# 1.20's hack/ scripts build in GOPATH mode from vendor/; nothing is fetched.
		export GO111MODULE=off GOCACHE="$work/gocache" GOPROXY=off
		# KUBE_GIT_* keeps `version` stamping away from git (there is no .git here).
		export KUBE_GIT_VERSION="v1.20.2" KUBE_GIT_TREE_STATE=clean
		make WHAT=cmd/kube-apiserver
	)
	log "built in $((SECONDS - start)) s"
	local out
	out=$(find "$k/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
	[ -n "$out" ] || { log "build produced no kube-apiserver"; return 1; }
	install -m 0755 "$out" "$BIN/kube-apiserver.new"
	mv -f "$BIN/kube-apiserver.new" "$BIN/kube-apiserver"
	echo "recipe=$RECIPE" >"$STAMP"
	"$BIN/kube-apiserver" --version | grep -q "v$KUBE_VERSION_EXPECTED" ||
		log "warning: unexpected version: $("$BIN/kube-apiserver" --version)"
}

install_etcd
build_apiserver

echo "etcd=${KUBETRAIN_ETCD:-$BIN/etcd}"
echo "kube-apiserver=${KUBETRAIN_APISERVER:-$BIN/kube-apiserver}"
