#!/usr/bin/env bash
# Builds the Linux .deb and .rpm of the desktop app with the `swarmllm` CLI inside
# (a Tauri sidecar, installed beside the app as /usr/bin/swarmllm) and a desktop
# entry. Release build by default (~10 min cold); `--debug` builds the debug
# profile, quick on a warm target dir: what CI installs and tests
# (tests/e2e/installer.py). AppImage, msi and dmg need downloads or other OSes:
# .github/workflows/installers.yml builds them on hosted runners. The bundle
# settings live in src-tauri/tauri.conf.json; installers/sidecar.json adds the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps --desktop
[ -x node_modules/.bin/tauri ] || npm ci --no-audit --no-fund
profile=release
flags=()
if [ "${1:-}" = "--debug" ]; then
  profile=debug
  flags=(--debug)
  shift
fi
target="${CARGO_TARGET_DIR:-target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
if [ "$profile" = release ]; then
  cargo build --locked --release -p swarmllm-cli
else
  cargo build --locked -p swarmllm-cli
fi
# Tauri takes a sidecar from src-tauri/binaries/<name>-<target triple>.
mkdir -p src-tauri/binaries
cp "$target/$profile/swarmllm" "src-tauri/binaries/swarmllm-$triple"
npx tauri build "${flags[@]}" --bundles deb,rpm --config installers/sidecar.json "$@"
ls -l "$target/$profile"/bundle/deb/*.deb "$target/$profile"/bundle/rpm/*.rpm
