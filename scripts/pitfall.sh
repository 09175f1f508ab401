#!/usr/bin/env bash
# Runs the blocking-subscription pitfall: each broken design next to the
# real server and the minimal example (examples/minimal_chat.rs), measured,
# with a verdict per variant. Exits non-zero when a broken design does not
# show its symptom, or the real server or the minimal example shows one.
# See --help.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: ./scripts/pitfall.sh [VARIANT...]

The blocking-subscription pitfall, run: four ways to get Redis Pub/Sub
wrong, each a small program in examples/ whose broken lines are marked
"// PITFALL:", each run next to the real server doing the same thing right.

  1. Subscribing on the connection that publishes: Redis refuses the next
     command.                               examples/pitfall_shared_connection.rs
  2. Reading the subscription where requests are served: /healthz and
     every other request hang.              examples/pitfall_blocking_handler.rs
  3. The subscriber writing to clients itself, with blocking writes: one
     client that stops reading stalls everyone, then Redis cuts the
     subscriber and messages are lost.      examples/pitfall_subscriber_writes.rs
  4. Republishing what came from Redis: one message multiplies.
                                            examples/pitfall_republish.rs

Each check then runs, unchanged, against the fix at its smallest: a chat
of about 250 lines that avoids all four.     examples/minimal_chat.rs

It builds the server and the examples (cargo build --release), starts a
private redis-server on a free loopback port (variant 3 lowers its
client-output-buffer-limit), two instances of the real server, a and b
(with --client-buffer-bytes 65536), and two of the minimal example, runs
the variants and prints two verdict lines each; it stops everything it
started. About 25 s after the build; no browser, everything on 127.0.0.1.

Arguments:
  VARIANT...   run only these variants (1 to 4); default: all
  -h, --help   show this help

Exit status: 0 when every broken design showed its symptom and neither
the real server nor the minimal example showed one; 1 otherwise (CI runs
it).

One variant by hand, against any Redis you can spare (variant 3 changes
its settings while it runs), without the working designs' half:
  cargo run --release --example pitfall_republish -- --redis redis://127.0.0.1:6379
The minimal example by hand (two instances on one Redis are one chat):
  cargo run --release --example minimal_chat -- --redis redis://127.0.0.1:6379 --port 8000 --ws-port 8001
EOF
}

EXAMPLES=(pitfall_shared_connection pitfall_blocking_handler pitfall_subscriber_writes pitfall_republish)
NAMES=(
  "subscribe on the publishing connection"
  "read the subscription where requests are served"
  "the subscriber writes to clients, blocking"
  "republish what came from Redis"
)
MINIMAL=minimal_chat
# Its one channel, which the checks publish on.
MINIMAL_CHANNEL="minimal:chat"
# The real server's flags for the demo: a stuck client is dropped after
# 64 KiB (default 1 MiB), and has 30 s to read its Close (default 1 s) so
# that it finds it when it reads at last.
REAL_FLAGS=(--client-buffer-bytes 65536 --close-grace-ms 30000)

SELECTED=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    [1-4]) SELECTED+=("$1") ;;
    *)
      usage >&2
      printf '\nerror: unknown argument: %s (variants are 1 to 4)\n' "$1" >&2
      exit 2
      ;;
  esac
  shift
done
((${#SELECTED[@]})) || SELECTED=(1 2 3 4)

cd "$REPO_ROOT"
have cargo || die "cargo is not installed: install Rust from https://rustup.rs, then run this again"
# Always a private Redis, never $REDIS_URL: variant 3 changes its settings.
# shellcheck disable=SC2034  # read by ensure_redis_server (lib.sh)
NEED_PRIVATE_REDIS=1
ensure_redis_server ./scripts/pitfall.sh

# ------------------------------------------------- processes and cleanup

TMP_DIR=""
BUILD_PID=""
IDS=()
PIDS=()         # the real instances
MINIMAL_PIDS=() # the minimal example's instances
# shellcheck disable=SC2034  # read by stop_private_services (lib.sh)
LOG_PIDS=() # none here: the instances log to files

cleanup() {
  local rc=$?
  trap '' INT TERM HUP PIPE
  set +e
  stop_build
  if ((${#PIDS[@]} + ${#MINIMAL_PIDS[@]})); then
    printf '\nStopping the instances and the private redis-server...\n'
    stop_pids "${PIDS[@]}" "${MINIMAL_PIDS[@]}"
  fi
  stop_private_services >/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 1' HUP PIPE

# wait_ready PID PORT PATH LOG NAME: waits until http://127.0.0.1:PORT/PATH
# answers 200; dies, quoting LOG, if PID exits first or 30 s pass.
wait_ready() {
  local pid="$1" port="$2" path="$3" log="$4" name="$5"
  local deadline=$((SECONDS + 30))
  until [[ "$(http_status "$port" "$path")" == 200 ]]; do
    if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
      tail -n 20 "$log" >&2
      die "$name did not become ready (its log is above)"
    fi
    sleep 0.1
  done
}

# ------------------------------------------------------------------ build

step "Building the server and the examples (cargo build --release; the first build takes a few minutes)"
build_args=(--release --quiet --bin pubsub-chat --example "$MINIMAL")
for name in "${EXAMPLES[@]}"; do build_args+=(--example "$name"); done
cargo build "${build_args[@]}" &
BUILD_PID=$!
rc=0
wait "$BUILD_PID" || rc=$?
BUILD_PID=""
((rc == 0)) || die "cargo build ${build_args[*]} failed (status $rc)"
BIN="$(release_binary)"
EXAMPLES_DIR="$(dirname "$BIN")/examples"

started=$SECONDS
TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-chat-pitfall.XXXXXX")"

step "Starting a private redis-server"
start_private_redis "$TMP_DIR/redis"

step "Starting the real server: instances a and b (${BIN#"$REPO_ROOT"/} ${REAL_FLAGS[*]})"
IDS=(a b)
HTTP_PORTS=()
WS_PORTS=()
for id in "${IDS[@]}"; do
  http="$(free_port)" || die "found no free port"
  ws="$(free_port)" || die "found no free port"
  admin="$(free_port)" || die "found no free port"
  HTTP_PORTS+=("$http")
  WS_PORTS+=("$ws")
  # Free ports may sit above 45535, where the default admin port (port +
  # 20000) does not fit: name one.
  "$BIN" --host 127.0.0.1 --port "$http" --ws-port "$ws" --admin-addr "127.0.0.1:$admin" \
    --instance-id "$id" \
    --redis-url "$REDIS_URL_TO_USE" "${REAL_FLAGS[@]}" \
    </dev/null >"$TMP_DIR/$id.log" 2>&1 &
  PIDS+=("$!")
done
for i in 0 1; do
  wait_ready "${PIDS[i]}" "${HTTP_PORTS[i]}" /readyz "$TMP_DIR/${IDS[i]}.log" "instance ${IDS[i]}"
  info "instance ${IDS[i]}: http://127.0.0.1:${HTTP_PORTS[i]}  ws://127.0.0.1:${WS_PORTS[i]}/ws"
done

step "Starting the minimal example: instances a and b (examples/$MINIMAL.rs)"
MINIMAL_HTTP_PORTS=()
MINIMAL_WS_PORTS=()
for id in "${IDS[@]}"; do
  http="$(free_port)" || die "found no free port"
  ws="$(free_port)" || die "found no free port"
  MINIMAL_HTTP_PORTS+=("$http")
  MINIMAL_WS_PORTS+=("$ws")
  "$EXAMPLES_DIR/$MINIMAL" --redis "$REDIS_URL_TO_USE" --host 127.0.0.1 --port "$http" \
    --ws-port "$ws" --channel "$MINIMAL_CHANNEL" \
    </dev/null >"$TMP_DIR/minimal-$id.log" 2>&1 &
  MINIMAL_PIDS+=("$!")
done
# It listens only once subscribed: /healthz answering means ready.
for i in 0 1; do
  wait_ready "${MINIMAL_PIDS[i]}" "${MINIMAL_HTTP_PORTS[i]}" /healthz \
    "$TMP_DIR/minimal-${IDS[i]}.log" "the minimal example's instance ${IDS[i]}"
  info "minimal ${IDS[i]}: http://127.0.0.1:${MINIMAL_HTTP_PORTS[i]}  ws://127.0.0.1:${MINIMAL_WS_PORTS[i]}/ws"
done

# ---------------------------------------------------------------- variants

step "Running the variants: each broken design, then the real server and the minimal example doing the same"
VERDICTS=()
failed=0 # variants
dead=0   # instances
for n in "${SELECTED[@]}"; do
  i=$((n - 1))
  verdict_file="$TMP_DIR/verdict-$n"
  minimal_file="$TMP_DIR/minimal-verdict-$n"
  rc=0
  with_timeout 120 "$EXAMPLES_DIR/${EXAMPLES[i]}" \
    --redis "$REDIS_URL_TO_USE" --redis-log "$TMP_DIR/redis/redis.log" \
    --real-http "127.0.0.1:${HTTP_PORTS[0]}" --real-ws "127.0.0.1:${WS_PORTS[0]}" \
    --real-b-ws "127.0.0.1:${WS_PORTS[1]}" --verdict "$verdict_file" \
    --minimal-http "127.0.0.1:${MINIMAL_HTTP_PORTS[0]}" \
    --minimal-ws "127.0.0.1:${MINIMAL_WS_PORTS[0]}" \
    --minimal-b-ws "127.0.0.1:${MINIMAL_WS_PORTS[1]}" \
    --minimal-channel "$MINIMAL_CHANNEL" --minimal-verdict "$minimal_file" || rc=$?
  verdict="$(cat "$verdict_file" 2>/dev/null || true)"
  minimal="$(cat "$minimal_file" 2>/dev/null || true)"
  if ((rc != 0)); then
    failed=$((failed + 1))
    [[ -n "$verdict" ]] || verdict="FAILED — examples/${EXAMPLES[i]}.rs exited with status $rc"
    [[ -n "$minimal" ]] || minimal="NOT CHECKED — examples/${EXAMPLES[i]}.rs exited with status $rc"
  fi
  VERDICTS+=("$n. ${NAMES[i]}: $verdict")
  VERDICTS+=("   minimal example: $minimal")
done

for i in 0 1; do
  if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
    dead=$((dead + 1))
    VERDICTS+=("the real instance ${IDS[i]} died during the demo: its log ends with $(tail -n 1 "$TMP_DIR/${IDS[i]}.log")")
  fi
  if ! kill -0 "${MINIMAL_PIDS[i]}" 2>/dev/null; then
    dead=$((dead + 1))
    VERDICTS+=("the minimal example's instance ${IDS[i]} died during the demo: its log ends with $(tail -n 1 "$TMP_DIR/minimal-${IDS[i]}.log")")
  fi
done

step "Verdicts"
for line in "${VERDICTS[@]}"; do printf '%s\n' "$line"; done
printf '\n'
if ((failed + dead == 0)); then
  if ((${#SELECTED[@]} == 1)); then
    shown="The broken design showed its symptom"
  else
    shown="All ${#SELECTED[@]} broken designs showed their symptom"
  fi
  printf '%s, and the real server and the minimal example none (%d s after the build).\n' \
    "$shown" $((SECONDS - started))
else
  printf 'FAILED: %d of %d variants did not show what they should, %d instance(s) died (see above).\n' \
    "$failed" "${#SELECTED[@]}" "$dead"
  exit 1
fi
