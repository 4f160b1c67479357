#!/usr/bin/env bash
# An aarch64 Python with only numpy + onnxruntime, run under qemu-user emulation on an x86_64 machine: what
# tests/test_aarch64.py runs a profiling bundle with (docs/profiling.md, "An ARM board").
#
#   scripts/setup_aarch64_emulation.sh [DIR]     # default: ${NASPRUNE_CACHE:-~/.cache/nasprune}/aarch64
#
# Needs Debian's qemu-user-static and debootstrap (apt-get install qemu-user-static debootstrap; as root this script
# installs them) and the package registries only: Debian's arm64 packages for Python 3.11 (debootstrap, first stage:
# the packages are unpacked, not configured, so no binfmt or chroot is needed) and PyPI's aarch64 wheels of numpy
# and onnxruntime (pip --platform). Afterwards:
#
#   PYTHONPATH=DIR/site qemu-aarch64-static -L DIR/root DIR/root/usr/bin/python3 run_profile.py --out table.json
#
# onnxruntime is capped below 1.28 here: Debian 12's qemu 7.2 crashes (SIGSEGV) importing the aarch64 wheels of
# 1.28 to 1.32; 1.27 and older import and run. A real board takes the newest onnxruntime.
set -euo pipefail
DIR="${1:-${NASPRUNE_CACHE:-$HOME/.cache/nasprune}/aarch64}"
ORT="${NASPRUNE_AARCH64_ORT:-onnxruntime>=1.20,<1.28}"
SUITE="${NASPRUNE_AARCH64_SUITE:-bookworm}"
MIRROR="${NASPRUNE_AARCH64_MIRROR:-http://deb.debian.org/debian}"

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap
  else
    echo "error: needs qemu-aarch64-static and debootstrap: sudo apt-get install qemu-user-static debootstrap" >&2
    exit 2
  fi
fi
mkdir -p "$DIR"
if [ ! -x "$DIR/root/usr/bin/python3" ]; then
  rm -rf "$DIR/root.partial"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$DIR/root.partial" "$MIRROR" \
    > "$DIR/debootstrap.log" 2>&1 || { echo "error: debootstrap failed, see $DIR/debootstrap.log" >&2; exit 1; }
  for deb in "$DIR"/root.partial/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$DIR/root.partial"; done
  mv "$DIR/root.partial" "$DIR/root"
fi
PYVER="$(basename "$(ls -d "$DIR"/root/usr/bin/python3.[0-9]* | grep -E 'python3\.[0-9]+$' | head -1)" | sed 's/^python//')"
if [ ! -d "$DIR/site/onnxruntime" ]; then
  rm -rf "$DIR/site.partial"
  python3 -m pip install -q --target "$DIR/site.partial" --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --python-version "$PYVER" \
    --implementation cp --only-binary=:all: "numpy>=1.26,<3" "$ORT"
  mv "$DIR/site.partial" "$DIR/site"
fi
PYTHONPATH="$DIR/site" qemu-aarch64-static -L "$DIR/root" "$DIR/root/usr/bin/python3" -c \
  "import platform, numpy, onnxruntime; print('aarch64 python ready:', platform.machine(), 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
