#!/usr/bin/env bash
# Runs the tests: installs what they need when it is missing (redis-server,
# chromium, nginx, node/npm, the browser test's npm packages), then
# `cargo test --all-targets`, passing extra arguments through:
#   ./scripts/test.sh                  every test
#   ./scripts/test.sh fanout           only tests whose name has "fanout"
#   ./scripts/test.sh -- --nocapture   arguments for the test binaries
# With no arguments it also runs the outbox's loom model test (a second
# build with RUSTFLAGS="--cfg loom", in target/loom).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
  -h | --help)
    sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

cd "$REPO_ROOT"

# Nothing may download a browser: the tests use Debian's /usr/bin/chromium.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export PUPPETEER_SKIP_DOWNLOAD=1

have cargo || die "cargo is not installed: install Rust from https://rustup.rs, then run this again"

step "Checking test dependencies (redis-server, chromium, node)"
ensure_test_packages

step "Installing the browser test's npm packages (tests/browser)"
browser_dir=tests/browser
if [[ ! -f "$browser_dir/package.json" || ! -f "$browser_dir/package-lock.json" ]]; then
  die "$browser_dir/package.json and package-lock.json are missing; the browser test cannot run without them"
fi
# npm ci writes node_modules/.package-lock.json: when it is newer than the
# lock file and package.json, node_modules is already what `npm ci` makes.
stamp="$browser_dir/node_modules/.package-lock.json"
if [[ -f "$stamp" && ! "$browser_dir/package-lock.json" -nt "$stamp" &&
  ! "$browser_dir/package.json" -nt "$stamp" ]]; then
  info "up to date (node_modules is newer than package-lock.json)"
else
  npm ci --prefix "$browser_dir" --no-audit --no-fund --loglevel=error
fi

step "cargo test --all-targets${*:+ $*}"
rc=0
cargo test --all-targets "$@" || rc=$?

if ((rc == 0 && $# == 0)); then
  # Every interleaving of the outbox's threads, explored by loom over the
  # real code (src/session/outbox.rs, module loom_model).
  step "Model test of the outbox (loom)"
  RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$REPO_ROOT/target/loom" \
    cargo test --release --lib loom || rc=$?
fi
if ((rc == 0)); then
  step "All tests passed"
else
  step "Tests FAILED (cargo test exited with status $rc)"
fi
exit "$rc"
