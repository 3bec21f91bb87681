#!/usr/bin/env bash
# Builds the Linux .deb of the desktop app here (release build, ~10 min cold).
# AppImage, msi and dmg need downloads or other OSes: .github/workflows/installers.yml
# builds them on hosted runners. The bundle settings live in src-tauri/tauri.conf.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps --desktop
[ -x node_modules/.bin/tauri ] || npm ci --no-audit --no-fund
npx tauri build --bundles deb "$@"
target="${CARGO_TARGET_DIR:-target}"
ls -l "$target"/release/bundle/deb/*.deb
