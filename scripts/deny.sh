#!/usr/bin/env bash
# cargo-deny over the workspace's dependency graph (deny.toml): licences, duplicate
# versions, sources, and advisories from the RustSec database. cargo-deny is installed
# from crates.io once and cached under ~/.cache/kubetrain/cargo-deny.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.20.2
root="$HOME/.cache/kubetrain/cargo-deny"
deny="$root/bin/cargo-deny"
if ! "$deny" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
    echo "[deny] installing cargo-deny $version into $root (~5 min, once)"
    cargo install cargo-deny --version "$version" --locked --root "$root" \
        --target-dir "$HOME/.cache/kubetrain/cargo-deny-build"
    rm -rf "$HOME/.cache/kubetrain/cargo-deny-build"
fi

# cargo-deny reads `cargo metadata` offline, which needs every crate of the lock file on
# disk, those for other platforms (Windows) too; a build fetches only this platform's, so a
# cold machine lacks them.
cargo fetch --locked
"$deny" --offline check licenses bans sources

# The advisory database is a git repository on github.com. Where GitHub cannot be reached
# (this workplace's machines reach package registries only), say so rather than pass.
if git ls-remote --exit-code https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
    "$deny" check advisories
else
    echo "[deny] advisories NOT CHECKED: github.com/rustsec/advisory-db is unreachable from this machine"
fi
