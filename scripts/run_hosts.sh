#!/usr/bin/env bash
# A multi-host rehearsal on one Linux machine: Redis, instance a and
# instance b on three "hosts" (network namespaces joined by veth pairs),
# the load generator's clients on a fourth (this machine's own namespace),
# and faults on the links between them. Needs root. See --help.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: sudo ./scripts/run_hosts.sh [--short] [--cases LIST] [--runs N]

Puts Redis, instance a and instance b on three hosts, each a Linux network
namespace with its own address, and runs the load generator (cargo bench
--bench load) from this machine's own namespace against them, once per case.
Everything it makes (namespaces, veth pairs, iptables rules and tc qdiscs
inside them, processes, a temporary directory) is removed on exit, also on
Ctrl-C and on failure.

  clients (root ns) --10.77.1.0/30-- pc-a (instance a, 10.77.1.2) --10.77.3.0/30--+
                    --10.77.2.0/30-- pc-b (instance b, 10.77.2.2) --10.77.4.0/30--+- pc-redis
                                                                                     10.77.9.1
  pc-redis: redis-server on 10.77.9.1:6380 (direct), and the harness's fault
  proxy (examples/fault_proxy.rs) on 10.77.9.1:6379 in front of it.
  Each instance has two links: one to its clients, one to Redis; cutting
  the second leaves the first up.

Cases (--cases baseline,proxy,delay,loss,tbf,partition; all by default):
  baseline   no fault; the instances use Redis directly (port 6380)
  proxy      through the fault proxy (port 6379) with no fault: what the
             proxy itself adds, for the next two cases
  delay      through the proxy: 1 ms each way on every instance<->Redis
             connection (each chunk is held 1 ms, in both directions),
             plus up to 0.2 ms of jitter
  loss       the same proxy, and 1 % of the packets dropped each way on
             both instance<->Redis links (iptables -m statistic in pc-redis:
             real packet loss, which TCP retransmits)
  tbf        no proxy; both instance<->Redis links capped with tc tbf
             (2 Mbit/s each way; TBF_RATE=1mbit for another cap, in tc's
             units) while the senders send 500 msg/s
  partition  one sender on a and one on b; b's link to Redis is taken down
             (ip link set down) for a few seconds and brought back, while
             b's clients keep their own link. Asserted: every client of b
             was told `status` down and none was left down, and every
             message not refused reached every client exactly once and in
             order (nothing acknowledged is lost). Shown: how many of b's
             sends were refused `unavailable` (never sent) or answered
             `outcome_unknown`.

Each case fails on any lost, duplicated or reordered delivery, any failed or
dropped client, any error frame (the load generator's smoke checks). The
script prints a table (cross-instance latency p50/p99, deliveries) and exits
non-zero if a case failed.

Options:
  --short       A CI run: 3 s of sending per case, shorter partition
                (well under 2 minutes once built)
  --cases LIST  Comma-separated cases to run (default: all)
  --runs N      Runs of each case; the table shows each figure's median
                (default 3; 1 with --short)
  -h, --help    Show this help.

Needs: root, ip and tc (iproute2), iptables (installed with apt-get when
missing), redis-server (likewise), cargo. The kernel needs no netem: delay
and jitter come from the fault proxy, loss from iptables' statistic match,
bandwidth from tbf, the partition from a link taken down.
EOF
}

ORIG_ARGS="$*"
SHORT=0
RUNS=""
CASES="baseline,proxy,delay,loss,tbf,partition"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --short) SHORT=1 ;;
    --cases)
      need_value "$@"
      CASES="$2"
      shift
      ;;
    --cases=*) CASES="${1#--cases=}" ;;
    --runs)
      need_value "$@"
      RUNS="$2"
      shift
      ;;
    --runs=*) RUNS="${1#--runs=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) bad_argument "$1" ;;
  esac
  shift
done
IFS=',' read -r -a CASE_LIST <<<"$CASES"
for c in "${CASE_LIST[@]}"; do
  case "$c" in
    baseline | proxy | delay | loss | tbf | partition) ;;
    *) die "unknown case '$c' (baseline, proxy, delay, loss, tbf, partition)" ;;
  esac
done

[[ "$(uname -s)" == Linux ]] || die "network namespaces are Linux's: this runs on Linux only"
if [[ "$(id -u)" -ne 0 ]]; then
  die "this makes network namespaces, veth pairs, iptables rules and tc qdiscs: run it as root (sudo ./scripts/run_hosts.sh${ORIG_ARGS:+ $ORIG_ARGS})"
fi

cd "$REPO_ROOT"

# ------------------------------------------------------------------ setup

# The hosts' names and addresses (fixed: a second run at once is refused).
NS_REDIS=pc-redis
NS_A=pc-a
NS_B=pc-b
REDIS_ADDR=10.77.9.1
A_ADDR=10.77.1.2
B_ADDR=10.77.2.2
DIRECT_PORT=6380
PROXY_PORT=6379
# The tbf case's cap on each Redis link, each way (tc's units).
TBF_RATE="${TBF_RATE:-2mbit}"

if [[ -z "$RUNS" ]]; then
  RUNS=$((SHORT ? 1 : 3))
fi
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs $RUNS: a whole number from 1"
if [[ "$SHORT" -eq 1 ]]; then
  DURATION=3
  PART_AFTER=0.5
  PART_FOR=4
  PART_DURATION=6
else
  DURATION=15
  PART_AFTER=2
  PART_FOR=6
  PART_DURATION=12
fi

step "Tools"
have cargo || die "cargo is not installed: install Rust from https://rustup.rs, then run this again"
have ip || die "ip (iproute2) is not installed: apt-get install iproute2"
have tc || die "tc (iproute2) is not installed: apt-get install iproute2"
missing=()
have iptables || missing+=(iptables)
have redis-server || missing+=(redis-server)
if ((${#missing[@]})); then
  can_apt_install || die "missing: ${missing[*]}; install them (apt-get install ${missing[*]})"
  apt_install "${missing[@]}"
fi
info "$(ip -V)"
info "$(iptables -V)"
info "$(redis-server --version | cut -d' ' -f1-3)"

for ns in "$NS_REDIS" "$NS_A" "$NS_B"; do
  if [[ -e "/var/run/netns/$ns" ]]; then
    die "network namespace $ns exists already: another run_hosts.sh is running, or one was killed with SIGKILL (then: ip netns del $ns)"
  fi
done
for dev in pcc-a pcc-b; do
  ip link show "$dev" >/dev/null 2>&1 && die "interface $dev exists already (another run_hosts.sh?); remove it with: ip link del $dev"
done
if [[ "$(ip route show)" == *10.77.* ]]; then
  die "this machine already routes 10.77.x.x (ip route show); run_hosts.sh uses 10.77.0.0/16"
fi

TMP_DIR=""
MADE_NS=()
SERVICE_PIDS=() # redis-server and the proxy
LOAD_PID=""

# Every process still in one of our namespaces is ours: they go first.
kill_ns_processes() {
  local ns pids
  for ns in "${MADE_NS[@]}"; do
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    # shellcheck disable=SC2086  # a list of pids
    [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
  done
}

cleanup() {
  local rc=$?
  trap '' INT TERM HUP PIPE
  set +e
  if [[ -n "$LOAD_PID" ]]; then
    # Its own process group (setsid): cargo, the load generator, its workers
    # and the instances it started.
    kill -TERM -- "-$LOAD_PID" 2>/dev/null
    stop_pids "$LOAD_PID"
  fi
  if ((${#SERVICE_PIDS[@]})); then stop_pids "${SERVICE_PIDS[@]}"; fi
  kill_ns_processes
  # The root ends of the veth pairs first: a namespace's links go some
  # time after `ip netns del`, these go now.
  ip link del pcc-a 2>/dev/null
  ip link del pcc-b 2>/dev/null
  local ns
  for ns in "${MADE_NS[@]}"; do
    ip netns del "$ns" 2>/dev/null
  done
  [[ -z "$TMP_DIR" ]] || rm -rf "$TMP_DIR"
  if ((${#MADE_NS[@]})); then printf 'Removed namespaces %s and their links.\n' "${MADE_NS[*]}"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 1' HUP PIPE

step "Building (cargo build --release: the server, the fault proxy; the load generator)"
cargo build --release --quiet --bin pubsub-chat --example fault_proxy
cargo bench --bench load --no-run --quiet
PROXY_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/fault_proxy"
[[ -x "$PROXY_BIN" ]] || die "the build finished but $PROXY_BIN is missing"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-chat-hosts.XXXXXX")"

step "Hosts: namespaces $NS_REDIS, $NS_A, $NS_B and their links"
for ns in "$NS_REDIS" "$NS_A" "$NS_B"; do
  ip netns add "$ns"
  MADE_NS+=("$ns")
  ip -n "$ns" link set lo up
done
# Clients (this namespace) to each instance: one /30 each.
ip link add pcc-a type veth peer name eth-c netns "$NS_A"
ip link add pcc-b type veth peer name eth-c netns "$NS_B"
ip addr add 10.77.1.1/30 dev pcc-a
ip addr add 10.77.2.1/30 dev pcc-b
ip -n "$NS_A" addr add "$A_ADDR/30" dev eth-c
ip -n "$NS_B" addr add "$B_ADDR/30" dev eth-c
# Each instance to Redis: a /30 of its own, its eth-r.
ip -n "$NS_A" link add eth-r type veth peer name eth-a netns "$NS_REDIS"
ip -n "$NS_B" link add eth-r type veth peer name eth-b netns "$NS_REDIS"
ip -n "$NS_A" addr add 10.77.3.2/30 dev eth-r
ip -n "$NS_B" addr add 10.77.4.2/30 dev eth-r
ip -n "$NS_REDIS" addr add 10.77.3.1/30 dev eth-a
ip -n "$NS_REDIS" addr add 10.77.4.1/30 dev eth-b
# Redis's address, reached by each instance over its own link.
ip -n "$NS_REDIS" addr add "$REDIS_ADDR/32" dev lo
for dev in pcc-a pcc-b; do ip link set "$dev" up; done
for ns in "$NS_A" "$NS_B"; do
  ip -n "$ns" link set eth-c up
  ip -n "$ns" link set eth-r up
done
ip -n "$NS_REDIS" link set eth-a up
ip -n "$NS_REDIS" link set eth-b up
ip -n "$NS_A" route add "$REDIS_ADDR/32" via 10.77.3.1 dev eth-r
ip -n "$NS_B" route add "$REDIS_ADDR/32" via 10.77.4.1 dev eth-r
info "clients 10.77.1.1 -> a $A_ADDR, clients 10.77.2.1 -> b $B_ADDR"
info "a 10.77.3.2 -> redis $REDIS_ADDR via 10.77.3.1, b 10.77.4.2 -> redis via 10.77.4.1"

step "Redis host: redis-server on $REDIS_ADDR:$DIRECT_PORT"
mkdir -p "$TMP_DIR/redis"
ip netns exec "$NS_REDIS" redis-server --bind "$REDIS_ADDR" 127.0.0.1 --port "$DIRECT_PORT" --protected-mode no \
  --save "" --appendonly no --dir "$TMP_DIR/redis" --logfile "$TMP_DIR/redis/redis.log" \
  --daemonize no </dev/null >/dev/null 2>&1 &
SERVICE_PIDS+=("$!")
for ((i = 0; i < 100; i++)); do
  if ip netns exec "$NS_REDIS" redis-cli -h 127.0.0.1 -p "$DIRECT_PORT" PING 2>/dev/null | grep -q PONG; then
    break
  fi
  ((i < 99)) || die "redis-server did not answer PING in $NS_REDIS (log: $TMP_DIR/redis/redis.log)"
  sleep 0.1
done
# Each instance reaches it across its link (the path, not just the process).
for ns in "$NS_A" "$NS_B"; do
  ip netns exec "$ns" redis-cli -h "$REDIS_ADDR" -p "$DIRECT_PORT" PING 2>/dev/null | grep -q PONG ||
    die "$ns cannot reach redis at $REDIS_ADDR:$DIRECT_PORT"
done
info "reachable from $NS_A and $NS_B"

PROXY_PID=""
# start_proxy ARGS...: the fault proxy in the Redis host, in front of redis.
start_proxy() {
  stop_proxy
  ip netns exec "$NS_REDIS" "$PROXY_BIN" --listen "$REDIS_ADDR:$PROXY_PORT" \
    --upstream "127.0.0.1:$DIRECT_PORT" "$@" >"$TMP_DIR/proxy.log" 2>&1 &
  PROXY_PID=$!
  SERVICE_PIDS+=("$PROXY_PID")
  local i
  for ((i = 0; i < 50; i++)); do
    grep -q listening "$TMP_DIR/proxy.log" && break
    kill -0 "$PROXY_PID" 2>/dev/null || die "the fault proxy exited: $(cat "$TMP_DIR/proxy.log")"
    sleep 0.1
  done
  info "$(cat "$TMP_DIR/proxy.log")"
}
stop_proxy() {
  if [[ -n "$PROXY_PID" ]]; then
    stop_pids "$PROXY_PID"
    local kept=() pid
    for pid in "${SERVICE_PIDS[@]}"; do [[ "$pid" == "$PROXY_PID" ]] || kept+=("$pid"); done
    SERVICE_PIDS=("${kept[@]}")
    PROXY_PID=""
  fi
}

# Loss on both instance<->Redis links, each way (iptables of pc-redis only).
LOSS_RULES=(
  "INPUT -i eth-a" "OUTPUT -o eth-a" "INPUT -i eth-b" "OUTPUT -o eth-b"
)
add_loss() {
  local rule
  for rule in "${LOSS_RULES[@]}"; do
    # shellcheck disable=SC2086  # the chain and its interface match
    ip netns exec "$NS_REDIS" iptables -A $rule -p tcp -m statistic --mode random \
      --probability "$1" -j DROP
  done
}
remove_loss() {
  ip netns exec "$NS_REDIS" iptables -F INPUT
  ip netns exec "$NS_REDIS" iptables -F OUTPUT
}
# Packets dropped by those rules (their counters summed).
loss_dropped() {
  ip netns exec "$NS_REDIS" iptables -L -v -n -x 2>/dev/null |
    awk '$3 == "DROP" { n += $1 } END { print n + 0 }'
}

# A rate cap with tbf, on both ends of both Redis links (each way).
TBF_LINKS=("$NS_A eth-r" "$NS_B eth-r" "$NS_REDIS eth-a" "$NS_REDIS eth-b")
add_tbf() {
  local link ns dev
  for link in "${TBF_LINKS[@]}"; do
    read -r ns dev <<<"$link"
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "$1" burst 8kb latency 500ms
  done
}
remove_tbf() {
  local link ns dev
  for link in "${TBF_LINKS[@]}"; do
    read -r ns dev <<<"$link"
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
  done
}
# Bytes b's Redis link has received and sent: "RX TX" (the tbf case's note).
redis_link_bytes() {
  ip -n "$NS_B" -s link show eth-r | awk '/RX:/ { getline; rx = $1 } /TX:/ { getline; tx = $1 } END { print rx, tx }'
}

# figure NAME FILE: the value of one figure of the load generator's report.
figure() {
  awk -v n="$1" 'substr($0, 1, length(n) + 3) == "  " n " " { v = $NF } END { print (v == "" ? "-" : v) }' "$2"
}

RESULTS=()
FAILED=()

# run_load CASE URL [LOAD OPTIONS...]: the load generator across the hosts.
run_load() {
  local name="$1" url="$2" log rc=0
  shift 2
  log="$TMP_DIR/$name.log"
  local cmd=(cargo bench --quiet --bench load -- smoke --runs "$RUNS" --clients 20
    --target-redis "$url"
    --wrap-a "ip netns exec $NS_A" --wrap-b "ip netns exec $NS_B"
    --args-a "--host $A_ADDR --admin-addr $A_ADDR:0"
    --args-b "--host $B_ADDR --admin-addr $B_ADDR:0"
    "$@")
  info "$(printf '%q ' "${cmd[@]}")"
  # A process group of its own, so that the cleanup can stop it whole.
  setsid "${cmd[@]}" >"$log" 2>&1 &
  LOAD_PID=$!
  wait "$LOAD_PID" || rc=$?
  LOAD_PID=""
  local lost dup ooo delivered expected p50 p99 max verdict
  lost="$(figure lost "$log")"
  dup="$(figure duplicated "$log")"
  ooo="$(figure 'out of order' "$log")"
  delivered="$(figure 'deliveries received' "$log")"
  expected="$(figure 'deliveries expected' "$log")"
  p50="$(figure 'cross-instance p50 (ms)' "$log")"
  p99="$(figure 'cross-instance p99 (ms)' "$log")"
  max="$(figure 'latency max (ms)' "$log")"
  verdict=ok
  if ((rc != 0)); then
    verdict=FAIL
    FAILED+=("$name")
    sed -n '/RESULT: FAIL/,$p' "$log" | prefix_lines "    $name: " >&2
    grep -E '^  note:|panicked' "$log" | head -n 8 | prefix_lines "    $name: " >&2 || true
    [[ -s "$log" ]] && ! grep -q 'RESULT:' "$log" && tail -n 20 "$log" | prefix_lines "    $name: " >&2
  fi
  info "$name: cross-instance p50 $p50 ms, p99 $p99 ms (slowest delivery $max ms); deliveries $delivered of $expected (lost $lost, duplicated $dup, out of order $ooo): $verdict"
  RESULTS+=("$(printf '%-10s %8s %8s %9s %10s %10s %5s %5s %5s  %s' "$name" "$p50" "$p99" "$max" \
    "$delivered" "$expected" "$lost" "$dup" "$ooo" "$verdict")")
  LAST_LOG="$log"
}

LAST_LOG=""
LOAD_ARGS=(--senders 2 --rate 100 --duration-s "$DURATION")
DIRECT_URL="redis://$REDIS_ADDR:$DIRECT_PORT"
PROXY_URL="redis://$REDIS_ADDR:$PROXY_PORT"

for c in "${CASE_LIST[@]}"; do
  case "$c" in
    baseline)
      step "Case baseline: no fault, Redis direct"
      run_load baseline "$DIRECT_URL" "${LOAD_ARGS[@]}"
      ;;
    proxy)
      step "Case proxy: through the fault proxy, no fault"
      start_proxy
      run_load proxy "$PROXY_URL" "${LOAD_ARGS[@]}"
      stop_proxy
      ;;
    delay)
      step "Case delay: 1 ms each way on instance<->Redis (fault proxy), jitter up to 0.2 ms"
      start_proxy --delay-ms 1 --jitter-ms 0.2
      run_load delay "$PROXY_URL" "${LOAD_ARGS[@]}"
      stop_proxy
      ;;
    loss)
      step "Case loss: 1 ms each way (fault proxy) and 1 % packet loss each way (iptables)"
      start_proxy --delay-ms 1 --jitter-ms 0.2
      add_loss 0.01
      run_load loss "$PROXY_URL" "${LOAD_ARGS[@]}"
      dropped="$(loss_dropped)"
      info "packets dropped on the Redis links: $dropped"
      RESULTS[-1]="${RESULTS[-1]} ($dropped packets dropped)"
      remove_loss
      stop_proxy
      ;;
    tbf)
      step "Case tbf: both Redis links capped at $TBF_RATE each way (tc tbf), 500 msg/s"
      add_tbf "$TBF_RATE"
      read -r rx0 tx0 <<<"$(redis_link_bytes)"
      run_load tbf "$DIRECT_URL" --senders 2 --rate 500 --duration-s "$DURATION"
      read -r rx1 tx1 <<<"$(redis_link_bytes)"
      # Over the sending time: the rest of the run (connect, drain) is quiet.
      sending=$((DURATION * RUNS))
      info "b's Redis link over the $RUNS run(s): $(((rx1 - rx0) / 1024)) KiB from Redis, $(((tx1 - tx0) / 1024)) KiB to it" \
        "(on average $(((rx1 - rx0) * 8 / 1000 / sending)) and $(((tx1 - tx0) * 8 / 1000 / sending)) kbit/s over the $sending s of sending)"
      remove_tbf
      ;;
    partition)
      step "Case partition: b cut from Redis for $PART_FOR s (its link down), then healed"
      heal_cmd="ip -n $NS_B link set eth-r up && ip -n $NS_B route replace $REDIS_ADDR/32 via 10.77.4.1 dev eth-r"
      fault="sleep $PART_AFTER; echo '  partition: b eth-r down'; ip -n $NS_B link set eth-r down; \
sleep $PART_FOR; echo '  partition: healing'; $heal_cmd"
      # Two senders: client 0 on a, client 1 on b (cut off).
      run_load partition "$DIRECT_URL" --senders 2 --rate 100 --duration-s "$PART_DURATION" \
        --fault-cmd "$fault"
      # Mend it even if the run was cut short.
      eval "$heal_cmd" 2>/dev/null || true
      on_b="$(figure 'clients on b at end' "$LAST_LOG")"
      saw="$(figure 'b: clients that saw status down' "$LAST_LOG")"
      left="$(figure 'clients left with status down' "$LAST_LOG")"
      refused="$(figure 'sends refused (unavailable)' "$LAST_LOG")"
      in_doubt="$(figure 'sends in doubt (outcome_unknown)' "$LAST_LOG")"
      info "clients of b: $on_b; told status down: $saw; left down at the end: $left"
      info "sends refused unavailable (never sent): $refused; answered outcome_unknown: $in_doubt"
      if [[ "$saw" != "$on_b" || "$on_b" == "-" || "$on_b" == 0 || "$left" != 0 ]]; then
        warn "partition: every client of b should have been told down ($saw of $on_b) and none left down ($left)"
        RESULTS[-1]="${RESULTS[-1]/ ok/ FAIL}"
        [[ " ${FAILED[*]} " == *" partition "* ]] || FAILED+=(partition)
      fi
      RESULTS[-1]="${RESULTS[-1]} (b's clients told down: $saw of $on_b, left down: $left; sends refused: $refused, in doubt: $in_doubt)"
      ;;
  esac
done

step "Across hosts: cross-instance latency and deliveries"
printf '    %-10s %8s %8s %9s %10s %10s %5s %5s %5s  %s\n' case "p50 ms" "p99 ms" "max ms" \
  delivered expected lost dup ooo verdict
for r in "${RESULTS[@]}"; do printf '    %s\n' "$r"; done
info "p50, p99: cross-instance (sender on one instance, receiver on the other); max: the slowest"
info "delivery of the case, same-instance ones included; each the median of $RUNS run(s)"
if ((${#FAILED[@]})); then
  die "failed: ${FAILED[*]} (logs were in $TMP_DIR, removed on exit; run again without --short for longer runs)"
fi
step "All cases passed"
