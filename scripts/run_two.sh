#!/usr/bin/env bash
# Runs the chat: two instances of pubsub-chat (a and b) joined by Redis,
# each logging to this terminal with an [a] / [b] prefix. Ctrl-C stops
# everything it started. See --help.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: ./scripts/run_two.sh [--no-redis] [--demo] [--auth] [--ports A,B]

Builds pubsub-chat (cargo build --release) and runs two instances of it,
"a" on port A and "b" on port B (WebSocket ports A+10000 and B+10000,
admin listeners on 127.0.0.1, ports A+20000 and B+20000), joined by Redis,
then prints the two URLs to open. Ctrl-C stops everything.

Options:
  --ports A,B   HTTP ports of the two instances (default 5000,5001;
                also PORT_A=... PORT_B=...)
  --no-redis    Run the two instances without Redis (--broker local): they
                do NOT see each other's messages. The isolated starting point.
  --demo        Turn on the page's fault panel (--demo-controls; also
                DEMO_CONTROLS=1): cut an instance's Redis subscription, pause
                its delivery, stall a tab, and watch the server recover.
                The URLs printed are then the admin listeners' pages (the
                fault panel and the instances view live there), with the
                message X-ray on (?trace=1).
  --auth        Signed identity (--auth token): the script makes an HS256
                secret, mints tokens for alice, bob and a second "alice"
                (another user) with `pubsub-chat token`, and prints URLs
                that carry them in their fragment (#token=..., which the
                browser never sends to a server). The name in the URL no
                longer counts: the token says who you are.
  -h, --help    Show this help.

Redis: if REDIS_URL is set and answers PING, it is used. Otherwise the
script starts a private redis-server on a free loopback port (no
persistence, data in a temporary directory) and stops it on exit; it never
silently uses a Redis that happens to run on 6379. If redis-server is not
installed, it is installed with apt-get when running as root (or with
password-less sudo); otherwise the script says how to install it.
EOF
}

NO_REDIS=0
DEMO=0
AUTH=0
PORT_A="${PORT_A:-5000}"
PORT_B="${PORT_B:-5001}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-redis) NO_REDIS=1 ;;
    --demo) DEMO=1 ;;
    --auth) AUTH=1 ;;
    --ports)
      need_value "$@"
      PORTS="$2"
      shift
      ;;
    --ports=*) PORTS="${1#--ports=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) bad_argument "$1" ;;
  esac
  shift
done
if [[ -n "${PORTS:-}" ]]; then
  [[ "$PORTS" == *,* ]] || die "--ports wants two ports separated by a comma, e.g. --ports 5100,5101"
  PORT_A="${PORTS%%,*}"
  PORT_B="${PORTS#*,}"
fi

for p in "$PORT_A" "$PORT_B"; do
  if ! [[ "$p" =~ ^[0-9]{1,5}$ ]] || ((10#$p < 1 || 10#$p > 45535)); then
    die "bad port '$p': use 1..45535 (the WebSocket port is the port + 10000, the admin port + 20000)"
  fi
done
PORT_A=$((10#$PORT_A))
PORT_B=$((10#$PORT_B))
((PORT_A != PORT_B)) || die "the two ports must differ (got $PORT_A twice)"
WS_A=$((PORT_A + 10000))
WS_B=$((PORT_B + 10000))
((WS_A != PORT_B && WS_B != PORT_A)) ||
  die "ports $PORT_A,$PORT_B collide with each other's WebSocket port (port + 10000); pick ports closer together"
ADMIN_A=$((PORT_A + 20000))
ADMIN_B=$((PORT_B + 20000))
((ADMIN_A != PORT_B && ADMIN_B != PORT_A && ADMIN_A != WS_B && ADMIN_B != WS_A)) ||
  die "ports $PORT_A,$PORT_B collide with each other's admin port (port + 20000); pick ports closer together"

cd "$REPO_ROOT"

# ----------------------------------------------------------- fail early

refuse_ports_in_use \
  "  ./scripts/run_two.sh --ports 5100,5101      (or PORT_A=5100 PORT_B=5101 ./scripts/run_two.sh)" \
  "$PORT_A:page of instance a" "$WS_A:WebSocket of instance a" \
  "$ADMIN_A:admin listener of instance a" "$PORT_B:page of instance b" \
  "$WS_B:WebSocket of instance b" "$ADMIN_B:admin listener of instance b"

have cargo || die "cargo is not installed: install Rust from https://rustup.rs, then run this again"

if [[ "$NO_REDIS" -eq 0 ]]; then
  choose_redis
fi
ensure_redis_server ./scripts/run_two.sh \
  'Or run the two instances without Redis (they will not see each other):' \
  '  ./scripts/run_two.sh --no-redis'

# ------------------------------------------------- processes and cleanup

TMP_DIR=""
BUILD_PID=""
WROTE_URL_FILE=0
IDS=()
PIDS=()     # the two instances
LOG_PIDS=() # the two [a] / [b] prefixers

cleanup() {
  local rc=$?
  # Finish the cleanup whatever happens: no more signals, no set -e (a
  # printf to a closed terminal must not stop it halfway).
  trap '' INT TERM HUP PIPE
  set +e
  stop_build
  if ((${#PIDS[@]})); then
    printf '\nStopping instances %s...\n' "${IDS[*]}"
    stop_pids "${PIDS[@]}"
  fi
  if ((WROTE_URL_FILE)); then rm -f "$RUN_REDIS_URL_FILE"; fi
  stop_private_services
  if ((${#PIDS[@]})); then printf 'Stopped.\n'; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
trap 'exit 1' HUP PIPE

# ------------------------------------------------------------------ build

# shellcheck disable=SC2119  # no CARGO_ARGS: the server alone
build_release

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-chat-run.XXXXXX")"

provide_redis ./scripts/run_two.sh

step "Starting instances a (port $PORT_A) and b (port $PORT_B)"
# After the Redis step: REDIS_URL_TO_USE is only known from there on.
BROKER_ARGS=(--broker local)
if [[ "$NO_REDIS" -eq 0 ]]; then
  # In the environment, not on the command line: every user of the
  # machine can read a process's arguments (ps), only its owner its
  # environment, and the URL may hold a password.
  export REDIS_URL="$REDIS_URL_TO_USE"
  BROKER_ARGS=(--broker redis)
  mkdir -p "$(dirname "$RUN_REDIS_URL_FILE")"
  (
    umask 077
    printf '%s\n' "$REDIS_URL_TO_USE" >"$RUN_REDIS_URL_FILE"
  )
  WROTE_URL_FILE=1
fi
DEMO_ARGS=()
PAGE_QUERY=""
if [[ "$DEMO" -eq 1 ]]; then
  DEMO_ARGS=(--demo-controls)
  PAGE_QUERY="&trace=1"
fi
AUTH_ARGS=()
if [[ "$AUTH" -eq 1 ]]; then
  # The secret the application's backend and the servers share; only the
  # servers and the `token` helper below read it.
  SECRET_FILE="$TMP_DIR/hs256.key"
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$SECRET_FILE")
  AUTH_ARGS=(--auth token --auth-hs256-secret-file "$SECRET_FILE")
fi
IDS=(a b)
INSTANCE_PORTS=("$PORT_A" "$PORT_B")
for i in 0 1; do
  port="${INSTANCE_PORTS[i]}"
  start_instance "${IDS[i]}" --port "$port" --ws-port $((port + 10000)) \
    --admin-addr "127.0.0.1:$((port + 20000))" "${BROKER_ARGS[@]}" "${DEMO_ARGS[@]}" \
    "${AUTH_ARGS[@]}"
done

# ----------------------------------------------------------- wait ready

READY_PATH=/readyz
[[ "$NO_REDIS" -eq 0 ]] || READY_PATH=/healthz
deadline=$((SECONDS + 30))
for i in 0 1; do
  wait_instance_ready "$i" "${INSTANCE_PORTS[i]}" "$READY_PATH" "$deadline"
done

# ---------------------------------------------------------------- banner

# With --demo, the admin listeners' pages: the fault panel is there.
PAGE_PORTS=("$PORT_A" "$PORT_B")
[[ "$DEMO" -eq 0 ]] || PAGE_PORTS=("$ADMIN_A" "$ADMIN_B")
URL_A="http://127.0.0.1:${PAGE_PORTS[0]}/?name=alice&room=lobby$PAGE_QUERY"
URL_B="http://127.0.0.1:${PAGE_PORTS[1]}/?name=bob&room=lobby$PAGE_QUERY"
if [[ "$AUTH" -eq 1 ]]; then
  mint() { "$BIN" token --auth-hs256-secret-file "$SECRET_FILE" --ttl 8h "$@"; }
  URL_A="http://127.0.0.1:${PAGE_PORTS[0]}/?room=lobby$PAGE_QUERY#token=$(mint --sub u-alice --name alice)"
  URL_B="http://127.0.0.1:${PAGE_PORTS[1]}/?room=lobby$PAGE_QUERY#token=$(mint --sub u-bob --name bob)"
  URL_C="http://127.0.0.1:${PAGE_PORTS[1]}/?room=lobby$PAGE_QUERY#token=$(mint --sub u-alice-2 --name alice)"
fi
RULE="================================================================================"
{
  printf '\n%s\n' "$RULE"
  if [[ "$NO_REDIS" -eq 0 ]]; then
    printf '  pubsub-chat is running: two instances joined by Redis\n\n'
  else
    printf '  pubsub-chat is running: two ISOLATED instances (--no-redis)\n\n'
  fi
  printf '  Open these in two browser tabs:\n'
  printf '    instance a:  %s\n' "$URL_A"
  printf '    instance b:  %s\n\n' "$URL_B"
  if [[ "$AUTH" -eq 1 ]]; then
    printf '  Signed identity (--auth token): each URL carries a token for one user\n'
    printf '  (alice is u-alice, bob is u-bob), valid 8 hours. A second, different\n'
    printf '  "alice" (user u-alice-2), to see two members share a name:\n'
    printf '    instance b:  %s\n\n' "$URL_C"
    printf '  Mint another (the page asks for one when its token expires):\n'
    printf '    %s token --auth-hs256-secret-file %s --sub u-carol --name carol --ttl 1h\n\n' \
      "$BIN" "$SECRET_FILE"
  fi
  if [[ "$NO_REDIS" -eq 0 ]]; then
    printf '  Try it: type a message in one tab; it appears in the other, although\n'
    printf '  each tab talks to a different server process. They meet in Redis.\n\n'
    printf '  Redis:  %s\n\n' "$REDIS_SHOWN"
    printf '  Inject a message from outside, straight into Redis (it prints the\n'
    printf '  redis-cli PUBLISH it runs):\n'
    prefix_arg=""
    [[ -z "${REDIS_PREFIX:-}" ]] || prefix_arg=" --prefix $REDIS_PREFIX"
    printf '    ./scripts/inject.sh%s "hello from outside"\n' "$prefix_arg"
    printf '  (it finds this Redis by itself while run_two.sh runs: %s)\n\n' \
      "${RUN_REDIS_URL_FILE#"$REPO_ROOT"/}"
  else
    printf '  Try it: type a message in one tab; it does NOT appear in the other.\n'
    printf '  Each instance only knows its own clients: this is the isolated\n'
    printf '  starting point. Run ./scripts/run_two.sh without --no-redis to join\n'
    printf '  the two through Redis Pub/Sub.\n\n'
  fi
  if [[ "$DEMO" -eq 1 ]]; then
    printf '  Fault panel ON (--demo, for this machine only): the pages above are\n'
    printf '  served by the admin listeners (127.0.0.1:%s and :%s), with buttons to\n' "$ADMIN_A" "$ADMIN_B"
    printf '  cut an instance'"'"'s Redis subscription, pause its delivery and stall\n'
    printf '  the tab. Each message shows its path (the X-ray, ?trace=1). The public\n'
    printf '  pages (ports %s and %s) have neither.\n\n' "$PORT_A" "$PORT_B"
  fi
  printf '  Ctrl-C stops everything.\n'
  printf '%s\n\n' "$RULE"
}

# --------------------------------------------------------------- monitor

redis_warned=0
while true; do
  for i in 0 1; do
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      rc=0
      wait "${PIDS[i]}" || rc=$?
      warn "instance ${IDS[i]} exited (status $rc); stopping everything"
      exit 1
    fi
  done
  if [[ -n "$REDIS_PID" && "$redis_warned" -eq 0 ]] && ! kill -0 "$REDIS_PID" 2>/dev/null; then
    warn "the private redis-server has exited; the instances keep running and retry it"
    redis_warned=1
  fi
  sleep 0.5
done
