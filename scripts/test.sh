#!/usr/bin/env bash
# Runs the tests: installs what they need when it is missing (redis-server,
# chromium, nginx, openssl, node/npm, the browser test's npm packages), then cargo.
#   ./scripts/test.sh                   every test: the library's, the binary's,
#                                       every tests/*.rs file and the examples;
#                                       the benchmarks are compiled, not run;
#                                       then the loom model tests (the outbox,
#                                       the catch-up gates); about 12 minutes
#                                       on 2 cores once built
#   ./scripts/test.sh fanout            the tests of tests/fanout.rs (any file
#                                       name of tests/*.rs: cargo test --test)
#   ./scripts/test.sh fanout room       those of its tests whose name has "room"
#   ./scripts/test.sh room              every test whose name has "room", in the
#                                       library, the binary and every tests/ file
#   ./scripts/test.sh -- --nocapture    arguments for the test binaries
#   ./scripts/test.sh --bench SCENARIO  a benchmark: cargo bench --bench load --
#                                       SCENARIO [options] (--bench alone lists them)
# Options before the first word (--release, -j 1, --features F) go to
# cargo. The loom model tests are a second build with RUSTFLAGS="--cfg loom",
# in target/loom.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
  -h | --help)
    sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

cd "$REPO_ROOT"

# Nothing may download a browser: the tests use Debian's /usr/bin/chromium.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export PUPPETEER_SKIP_DOWNLOAD=1

have cargo || die "cargo is not installed: install Rust from https://rustup.rs, then run this again"

step "Checking test dependencies (redis-server, chromium, nginx, openssl, node)"
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

if [[ "${1:-}" == --bench ]]; then
  # The benchmark starts its own Redis and instances; it needs no browser.
  shift
  step "cargo bench --bench load --${*:+ $*}"
  exec cargo bench --bench load -- "$@"
fi

# Split the arguments: cargo options, then test files (tests/NAME.rs) and
# name filters, then what follows `--`, for the test binaries.
cargo_opts=()
files=()
filters=()
passed=()
while (($#)); do
  case "$1" in
    --)
      shift
      passed=("$@")
      break
      ;;
    -j | --jobs | -F | --features | -p | --package | --profile | --target)
      (($# >= 2)) || die "$1 needs a value"
      cargo_opts+=("$1" "$2")
      shift
      ;;
    -*) cargo_opts+=("$1") ;;
    *)
      name="${1#tests/}"
      name="${name%.rs}"
      if [[ -f "tests/$name.rs" ]]; then
        files+=(--test "$name")
      else
        filters+=("$1")
      fi
      ;;
  esac
  shift
done
if ((${#filters[@]} > 1)); then
  die "one name filter at a time (got: ${filters[*]}); test files may be several"
fi

# The tests' temporary files go to a directory of this run's own, which
# must be empty at the end: a test suite leaves nothing behind.
run_tmp="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-chat-test-run.XXXXXX")"
export TMPDIR="$run_tmp"

rc=0
if ((${#files[@]})); then
  command=(cargo test "${cargo_opts[@]}" "${files[@]}")
else
  # Not --all-targets: it would run the load benchmark (harness = false),
  # which takes a filter for a scenario name.
  command=(cargo test "${cargo_opts[@]}" --lib --bins --tests --examples)
fi
command+=("${filters[@]}")
((${#passed[@]})) && command+=(-- "${passed[@]}")
full=$((${#files[@]} == 0 && ${#filters[@]} == 0))

if ((full)); then
  info "a full run takes about 12 minutes on 2 cores once built (the first"
  info "build adds about 5); ./scripts/test.sh NAME runs a part (--help)"
  # Compiled on every full run, so that they cannot rot; run only when asked.
  step "Compiling the benchmarks (run them with ./scripts/test.sh --bench)"
  cargo test "${cargo_opts[@]}" --benches --no-run || rc=$?
fi
if ((rc == 0)); then
  step "${command[*]}"
  "${command[@]}" || rc=$?
fi

if ((rc == 0 && full)); then
  # Every interleaving of the outbox's threads, and of the subscriber and
  # catch-up threads at a room's gate, explored by loom over the real code
  # (src/delivery/outbox.rs and src/broker/redis/gates.rs, modules loom_model).
  step "Model tests of the outbox and the catch-up gates (loom)"
  RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$REPO_ROOT/target/loom" \
    cargo test --release --lib loom || rc=$?
fi
leftovers="$(find "$run_tmp" -mindepth 1 -maxdepth 1 -printf '    %f\n' | head -n 20)"
if [[ -n "$leftovers" ]]; then
  warn "the tests left these behind in the temporary directory ($run_tmp):"
  printf '%s\n' "$leftovers" >&2
  ((rc != 0)) || rc=1
fi
rm -rf "$run_tmp"
took="$((SECONDS / 60)) min $((SECONDS % 60)) s"
if ((rc == 0)); then
  step "All tests passed (in $took)"
else
  step "Tests FAILED (cargo exited with status $rc, after $took)"
fi
exit "$rc"
