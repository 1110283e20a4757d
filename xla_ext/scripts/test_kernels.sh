#!/usr/bin/env bash
# Builds and runs the plain C++ CQ kernel tests (xla_ext/tests/cq_kernel_test.cc):
#   asan     host build with AddressSanitizer + UndefinedBehaviorSanitizer (every x86 path
#            this CPU supports against the reference, golden vectors, pack/unpack)
#   neon     aarch64 cross build (Debian g++-aarch64-linux-gnu, static) run under
#            qemu-aarch64: -cpu max (NEON + dotprod) and -cpu cortex-a53 (NEON only)
#   native   host build without sanitizers (-O2)
# Usage: xla_ext/scripts/test_kernels.sh [asan|neon|native|all]   (default: all)
# Needs: g++; for neon: apt-get install g++-aarch64-linux-gnu qemu-user
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${CQJAX_KERNEL_TEST_DIR:-${TMPDIR:-/tmp}/cqjax_kernel_tests}"
mkdir -p "$OUT"
SRC=(xla_ext/src/cpu_features.cc xla_ext/src/cq_common.cc xla_ext/src/cq_x86.cc
     xla_ext/src/cq_neon.cc xla_ext/src/rotate.cc xla_ext/tests/cq_kernel_test.cc)
GOLDEN="$ROOT/tests/golden/cq_kernel_v1.txt"
cd "$ROOT"

native() {
  local name=$1; shift
  g++ -std=c++17 -Wall -Wextra -Wno-maybe-uninitialized -Ixla_ext/include "$@" "${SRC[@]}" -o "$OUT/$name"
  "$OUT/$name" "$GOLDEN"
}

run_asan() {
  echo "== host build, ASan + UBSan"
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
    native cq_kernel_test_asan -O1 -g -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined
}

run_native() {
  echo "== host build, -O2"
  native cq_kernel_test -O2
}

run_neon() {
  if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    echo "neon: needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)" >&2
    return 1
  fi
  echo "== aarch64 cross build (static), run under qemu-aarch64"
  aarch64-linux-gnu-g++ -std=c++17 -O2 -Wall -Wextra -Ixla_ext/include -c \
    -march=armv8.2-a+dotprod xla_ext/src/cq_neon_dot.cc -o "$OUT/cq_neon_dot.o"
  aarch64-linux-gnu-g++ -std=c++17 -O2 -Wall -Wextra -static -Ixla_ext/include \
    "${SRC[@]}" "$OUT/cq_neon_dot.o" -o "$OUT/cq_kernel_test_aarch64"
  for cpu in max cortex-a53; do
    echo "-- qemu-aarch64 -cpu $cpu"
    qemu-aarch64 -cpu "$cpu" "$OUT/cq_kernel_test_aarch64" "$GOLDEN"
  done
}

case "${1:-all}" in
  asan) run_asan ;;
  neon) run_neon ;;
  native) run_native ;;
  all) run_native; run_asan; run_neon ;;
  *) echo "usage: $0 [asan|neon|native|all]" >&2; exit 2 ;;
esac
