# shellcheck shell=bash
# Shared helpers for scripts/run_two.sh, scripts/run_cluster.sh, scripts/test.sh
# and .ci/run.
# Source it; it defines functions and a few variables and runs nothing.

# The repository root (this file lives in <root>/scripts).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Where `cargo build --release` puts the binary.
release_binary() {
  local target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
  printf '%s/release/pubsub-chat\n' "$target_dir"
}

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

# The scripts' argument parsing (each script defines its own `usage`).
# need_value OPTION [VALUE...]: dies unless OPTION has a value after it;
# call it with "$@".
need_value() {
  [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
}
# bad_argument ARG: the usage on stderr, then what was wrong; exits 2.
bad_argument() {
  usage >&2
  printf '\nerror: unknown argument: %s\n' "$1" >&2
  exit 2
}

# Runs a command with a time limit when `timeout` exists (coreutils).
with_timeout() {
  local secs="$1"
  shift
  if have timeout; then
    timeout "$secs" "$@"
  else
    "$@"
  fi
}

# ---------------------------------------------------------------- packages

# Prefix for privileged commands: "" as root, "sudo -n" when sudo works
# without a password. Returns 1 when neither, or when apt-get is missing.
SUDO=""
can_apt_install() {
  have apt-get || return 1
  if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=""
  elif have sudo && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    return 1
  fi
}

APT_UPDATED=0
# apt_install PKG...: installs Debian packages quietly (once `apt-get update`
# per script run); prints the apt log tail if it fails.
apt_install() {
  local log
  log="$(mktemp "${TMPDIR:-/tmp}/pubsub-chat-apt.XXXXXX")"
  # shellcheck disable=SC2086  # $SUDO is empty or "sudo -n", on purpose
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    info "apt-get update"
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      rm -f "$log"
      die "apt-get update failed"
    fi
    APT_UPDATED=1
  fi
  info "apt-get install -y $*"
  # shellcheck disable=SC2086
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    die "apt-get install $* failed"
  fi
  rm -f "$log"
}

# The Debian packages this project's tests need that are missing here.
# Prints them space-separated (nothing when all are present).
missing_test_packages() {
  local missing=()
  have redis-server || missing+=(redis-server)
  have chromium || missing+=(chromium)
  # nginx fronts three instances in the failover test (/usr/sbin may not be
  # on a user's PATH).
  have nginx || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  # tests/auth.rs makes its ES256 and RS256 key pairs with it.
  have openssl || missing+=(openssl)
  # Use any node already installed (e.g. NodeSource's, which bundles npm);
  # install Debian's only when there is none.
  have node || missing+=(nodejs npm)
  printf '%s\n' "${missing[*]:-}"
}

# Installs whatever missing_test_packages lists, or explains how and fails.
ensure_test_packages() {
  local missing
  missing="$(missing_test_packages)"
  if [[ -n "$missing" ]]; then
    if can_apt_install; then
      info "missing: $missing; installing with apt-get${SUDO:+ (via sudo)}"
      # shellcheck disable=SC2086  # a list of package names
      apt_install $missing
      missing="$(missing_test_packages)"
      [[ -z "$missing" ]] || die "still not on PATH after apt-get install: $missing"
    else
      printf 'These are needed to run the tests and are missing: %s\n' "$missing" >&2
      printf 'Install them, then run this again:\n' >&2
      printf '  sudo apt-get update && sudo apt-get install -y %s\n' "$missing" >&2
      exit 1
    fi
  fi
  if ! have npm; then
    die "node is installed ($(command -v node)) but npm is not; install npm for that node (for Debian's nodejs: apt-get install npm)"
  fi
  info "redis-server: $(command -v redis-server)"
  info "chromium:     $(command -v chromium)"
  info "nginx:        $(command -v nginx || echo /usr/sbin/nginx)"
  info "node:         $(command -v node) $(node --version)"
}

# ------------------------------------------------------------------- ports

# True when something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints a TCP port that is free on 127.0.0.1 right now.
free_port() {
  local port
  if have python3 && port="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null)" && [[ -n "$port" ]]; then
    printf '%s\n' "$port"
    return 0
  fi
  local _
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 20000))
    if ! port_in_use "$port"; then
      printf '%s\n' "$port"
      return 0
    fi
  done
  return 1
}

# http_status PORT PATH: prints the HTTP status code of GET
# http://127.0.0.1:PORT/PATH ("000" when nothing answers). Plain bash, so
# no curl is needed.
http_status() {
  local port="$1" path="$2"
  # shellcheck disable=SC2016  # the inner script expands its own $1 $2
  with_timeout 3 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n" "$2" "$1" >&3
    IFS=" " read -r -t 2 _ code _ <&3 || exit 1
    printf "%s\n" "$code"
  ' _ "$port" "$path" 2>/dev/null || printf '000\n'
}

# refuse_ports_in_use HINT PORT:WHAT...: dies on the first PORT something
# already listens on, naming WHAT it was for; HINT is the command line (or
# lines) that picks other ports.
refuse_ports_in_use() {
  local hint="$1" spec port
  shift
  for spec in "$@"; do
    port="${spec%%:*}"
    if port_in_use "$port"; then
      cat >&2 <<EOF
error: port $port (${spec#*:}) is already in use on 127.0.0.1.
Choose other ports, e.g.:
$hint
Each instance also uses its port + 10000 for WebSocket and + 20000 for its
admin listener.
To see what holds port $port:  ss -ltnp 'sport = :$port'
EOF
      exit 1
    fi
  done
}

# ------------------------------------------------------------------- redis

# Where run_two.sh leaves the URL of the Redis it uses while it runs, so
# that scripts/inject.sh finds it with no option (readable by its owner
# only: the URL may hold a password).
# shellcheck disable=SC2034  # read by run_two.sh and inject.sh
RUN_REDIS_URL_FILE="${RUN_REDIS_URL_FILE:-$REPO_ROOT/target/run_two.redis-url}"

# redis_cli_pings PORT: true when the redis-server on 127.0.0.1:PORT (a
# private one: no password) answers PING.
redis_cli_pings() {
  [[ "$(with_timeout 3 redis-cli -p "$1" PING 2>/dev/null)" == PONG* ]]
}

# --------------------------------------------------------------- processes
# Shared by run_two.sh and run_cluster.sh.

# stop_pids PID...: SIGTERM, up to 10 s to exit, then SIGKILL; reaps them.
stop_pids() {
  local pid alive i
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((i = 0; i < 100; i++)); do
    alive=0
    for pid in "$@"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "$@"; do
    if kill -0 "$pid" 2>/dev/null; then
      warn "process $pid did not stop within 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
}

# prefix_lines PREFIX: copies stdin to stdout, PREFIX on each line.
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

# ------------------------------------------------------- a Redis to run with
# Shared by run_two.sh and run_cluster.sh, through these globals:
#   REDIS_URL_TO_USE    the Redis the instances get ("" until chosen)
#   NEED_PRIVATE_REDIS  1 when a private redis-server must be started
#   REDIS_PID           the private redis-server's PID ("" when none)
REDIS_URL_TO_USE=""
REDIS_SHOWN=""
NEED_PRIVATE_REDIS=0
REDIS_PID=""

# choose_redis: $REDIS_URL when it is set (provide_redis checks, once the
# binary is built, that it answers); otherwise a private redis-server
# (NEED_PRIVATE_REDIS=1). It never silently uses a Redis that happens to
# run on 6379.
choose_redis() {
  if [[ -n "${REDIS_URL:-}" ]]; then
    REDIS_URL_TO_USE="$REDIS_URL"
  else
    NEED_PRIVATE_REDIS=1
  fi
}

# ensure_redis_server SCRIPT [HINT_LINE...]: when a private redis-server is
# needed (NEED_PRIVATE_REDIS=1) and not installed, installs it with apt-get
# when allowed; otherwise explains how (SCRIPT is the command to run again,
# the HINT_LINEs end the explanation) and exits 1.
ensure_redis_server() {
  local script="$1"
  shift
  [[ "$NEED_PRIVATE_REDIS" -eq 1 ]] || return 0
  if have redis-server; then return 0; fi
  if can_apt_install; then
    step "redis-server is not installed; installing it: ${SUDO:+sudo }apt-get update && ${SUDO:+sudo }apt-get install -y redis-server"
    apt_install redis-server
    have redis-server || die "redis-server is still not on PATH after installing it"
  else
    {
      printf 'error: redis-server is not installed. Install it, then run this again:\n'
      printf '  Debian/Ubuntu:  sudo apt-get install redis-server\n'
      printf '  macOS:          brew install redis\n'
      printf 'Or run Redis in Docker and point this script at it:\n'
      printf '  docker run --rm -p 6379:6379 redis:7\n'
      printf '  REDIS_URL=redis://127.0.0.1:6379 %s\n' "$script"
      if (($#)); then printf '%s\n' "$@"; fi
    } >&2
    exit 1
  fi
}

# start_private_redis DIR: starts a redis-server on a free loopback port (no
# persistence, its files in DIR) and sets REDIS_PID and REDIS_URL_TO_USE.
# Three attempts: a free port can be taken before redis-server binds it.
start_private_redis() {
  local attempt port dir="$1" i setsid=""
  if have setsid; then setsid=setsid; fi
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    port="$(free_port)" || die "found no free port for redis-server"
    # In a session of its own (when setsid exists), so that Ctrl-C in the
    # terminal does not reach it: it is stopped after the instances.
    $setsid redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --dir "$dir" --logfile "$dir/redis.log" --daemonize no \
      </dev/null >/dev/null 2>&1 &
    REDIS_PID=$!
    for ((i = 0; i < 100; i++)); do
      if redis_cli_pings "$port"; then
        # shellcheck disable=SC2034  # read by the scripts that source this file
        REDIS_URL_TO_USE="redis://127.0.0.1:$port"
        REDIS_SHOWN="$REDIS_URL_TO_USE"
        info "private redis-server on 127.0.0.1:$port (pid $REDIS_PID, log $dir/redis.log)"
        return 0
      fi
      kill -0 "$REDIS_PID" 2>/dev/null || break
      sleep 0.1
    done
    stop_pids "$REDIS_PID"
    REDIS_PID=""
    warn "redis-server did not start on port $port (attempt $attempt):"
    tail -n 5 "$dir/redis.log" >&2 2>/dev/null || true
  done
  die "could not start a private redis-server"
}

# ------------------------------------------------- build and shared cleanup
# For run_two.sh and run_cluster.sh, which keep their state in the globals
# BUILD_PID, BIN, LOG_PIDS, REDIS_PID and TMP_DIR.

# build_release [CARGO_ARGS...]: builds the release binary (with
# CARGO_ARGS, what they name: `--bins --example lab`) in the background, so
# that Ctrl-C or SIGTERM stops it at once (stop_build does), and sets BIN.
build_release() {
  step "Building (cargo build --release${*:+ $*}; the first build takes a minute or two)"
  cargo build --release --quiet "$@" &
  BUILD_PID=$!
  local rc=0
  wait "$BUILD_PID" || rc=$?
  BUILD_PID=""
  ((rc == 0)) || die "cargo build --release failed (status $rc)"
  BIN="$(release_binary)"
  [[ -x "$BIN" ]] || die "build finished but $BIN is missing"
}

# Stops a build in progress, cargo's rustc children too, so that no
# compiler outlives the script.
stop_build() {
  if [[ -n "${BUILD_PID:-}" ]]; then
    if have pkill; then pkill -TERM -P "$BUILD_PID" 2>/dev/null || true; fi
    stop_pids "$BUILD_PID"
  fi
}

# Stops the log prefixers, the private redis-server or Redis Cluster, and
# removes the temporary directory: the end of every script's cleanup.
stop_private_services() {
  # The prefixers end by themselves once their instance is gone.
  if ((${#LOG_PIDS[@]})); then stop_pids "${LOG_PIDS[@]}"; fi
  if [[ -n "${REDIS_PID:-}" ]]; then
    printf 'Stopping the private redis-server (pid %s)...\n' "$REDIS_PID"
    stop_pids "$REDIS_PID"
  fi
  if [[ -n "${TMP_DIR:-}" ]]; then rm -rf "$TMP_DIR"; fi
}

# start_instance ID ARGS...: starts "$BIN" as instance ID on 127.0.0.1 with
# ARGS, and records its PID in PIDS. Its output goes through a FIFO to a
# prefixer ("[ID] "), recorded in LOG_PIDS, so that both can be stopped.
start_instance() {
  local id="$1" fifo="$TMP_DIR/$1.out"
  shift
  mkfifo "$fifo"
  # It ignores Ctrl-C, so that it prints its instance's last lines; it ends
  # when the instance closes the FIFO.
  (
    trap '' INT
    prefix_lines "[$id] "
  ) <"$fifo" &
  LOG_PIDS+=("$!")
  "$BIN" --host 127.0.0.1 --instance-id "$id" "$@" </dev/null >"$fifo" 2>&1 &
  PIDS+=("$!")
}

# wait_instance_ready I PORT PATH DEADLINE: waits until instance I (PIDS[I],
# IDS[I]) answers 200 on http://127.0.0.1:PORT/PATH; dies if it exits first,
# or if $SECONDS reaches DEADLINE.
wait_instance_ready() {
  local i="$1" port="$2" path="$3" deadline="$4" rc
  until [[ "$(http_status "$port" "$path")" == 200 ]]; do
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      rc=0
      wait "${PIDS[i]}" || rc=$?
      # shellcheck disable=SC2153  # IDS is the calling script's.
      die "instance ${IDS[i]} exited (status $rc) before it was ready; see its [${IDS[i]}] lines above"
    fi
    # shellcheck disable=SC2153  # IDS is the calling script's.
    ((SECONDS < deadline)) ||
      die "instance ${IDS[i]} is not ready after 30 s (GET http://127.0.0.1:$port$path is not 200)"
    sleep 0.2
  done
}

# provide_redis SCRIPT: once the binary is built, checks that $REDIS_URL
# answers (`pubsub-chat check-redis`, which reads it from the environment,
# so that its password is on no command line, and says why not in the
# instance's own words), else falls back to a private redis-server (in
# $TMP_DIR/redis; installed first if need be, SCRIPT being the command to
# run again). Sets REDIS_URL_TO_USE, and REDIS_SHOWN: where Redis is,
# without its password.
provide_redis() {
  local script="$1" shown
  if [[ "$NEED_PRIVATE_REDIS" -eq 0 && -n "$REDIS_URL_TO_USE" ]]; then
    if shown="$(REDIS_URL="$REDIS_URL_TO_USE" "$BIN" check-redis 2>"$TMP_DIR/check-redis.err")"; then
      REDIS_SHOWN="$shown"
      step "Using REDIS_URL=$REDIS_SHOWN (it answers PING)"
      return 0
    fi
    warn "$(sed 's/^pubsub-chat check-redis: //' "$TMP_DIR/check-redis.err"); starting a private redis-server instead"
    NEED_PRIVATE_REDIS=1
    ensure_redis_server "$script"
  fi
  if [[ "$NEED_PRIVATE_REDIS" -eq 1 ]]; then
    step "Starting a private redis-server"
    start_private_redis "$TMP_DIR/redis"
  fi
}
