//! The processes a run starts (`redis-server` or a Redis Cluster's six
//! nodes, instances `a` and `b`, the worker processes), their clean-up, and
//! what `/proc` and `/metrics` say about them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster_process::{self, NodePorts};
use crate::options::{Auth, Opts, RunKeys, Scenario};
use crate::process;

/// Every child pid, so a signal can kill them all before exiting.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub fn install_signal_handler() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("load: signal {sig}: killing the servers and exiting");
                let pids = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for pid in pids {
                    // SAFETY: kill(2) on a pid this process started.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
                std::process::exit(130);
            }
        });
}

/// The server binary under test: `PUBSUB_CHAT_BIN` when set (to measure
/// another build with the same load), else this package's own.
pub fn server_bin() -> PathBuf {
    match std::env::var_os("PUBSUB_CHAT_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_pubsub-chat")),
    }
}

/// A child process (an instance, redis-server or a worker), stopped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    pub http: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    /// The admin listener: `/metrics`.
    pub admin: Option<SocketAddr>,
    tmpdir: Option<process::TempDir>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `cmd`, which dies with this process.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        process::die_with_parent(cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Proc {
            name: name.into(),
            child,
            log_tail: Arc::default(),
            http: None,
            ws: None,
            admin: None,
            tmpdir: None,
        }
    }

    /// SIGKILL, at once (presence-crash's instance b): no goodbye to Redis
    /// or to its clients.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        let pid = self.child.id();
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: SIGTERM to our own child, for a graceful shutdown.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
        // Its directory goes once it has exited.
        drop(self.tmpdir.take());
    }

    pub fn log_tail(&self) -> Vec<String> {
        self.log_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn start_redis(extra_args: &[&str]) -> (Proc, String) {
    let port = process::free_port();
    let dir = process::temp_dir("load-redis");
    if process::find_program("redis-server").is_none() {
        panic!(
            "redis-server is not installed: `apt-get install redis-server`, or pass --target-redis redis://HOST:PORT"
        );
    }
    let mut cmd = process::redis_server_command(port, &dir);
    cmd.args(["--appendonly", "no"]).args(extra_args);
    let mut proc = Proc::spawn("redis-server", &mut cmd);
    proc.name = "redis".into();
    proc.tmpdir = Some(dir);
    assert!(
        process::wait_redis(port, Duration::from_secs(10)),
        "redis-server on port {port} did not answer PING"
    );
    (proc, format!("redis://127.0.0.1:{port}"))
}

/// A private Redis Cluster: six nodes (three masters with a replica each)
/// on free loopback ports, joined with `redis-cli --cluster create`, once
/// it serves every slot; and the masters as `--redis-cluster` seeds. The
/// nodes stop with the returned processes (the last one removes their
/// directory).
pub fn start_redis_cluster() -> (Vec<Proc>, String) {
    if process::find_program("redis-server").is_none()
        || process::find_program("redis-cli").is_none()
    {
        panic!("--redis-cluster needs redis-server and redis-cli: `apt-get install redis-server`");
    }
    let dir = process::temp_dir("load-redis-cluster");
    let mut nodes = Vec::new();
    for _ in 0..cluster_process::NODES {
        let ports = NodePorts::free();
        let mut cmd = cluster_process::node_command(ports, &dir)
            .unwrap_or_else(|e| panic!("cannot create a cluster node's directory: {e}"));
        let mut proc = Proc::spawn("redis-server", &mut cmd);
        proc.name = format!("redis-{}", ports.port);
        nodes.push((ports.port, proc));
    }
    let ports: Vec<u16> = nodes.iter().map(|(port, _)| *port).collect();
    let ready = cluster_process::wait_nodes(&ports, Duration::from_secs(10))
        .and_then(|()| cluster_process::create(&ports, Duration::from_secs(60)))
        .and_then(|()| cluster_process::slots(ports[0]));
    let ranges = match ready {
        Ok(ranges) => ranges,
        Err(e) => panic!(
            "the private Redis Cluster did not start: {e}\n{}",
            cluster_process::log_tails(&dir, &ports, 10)
        ),
    };
    let seeds = cluster_process::seeds(&cluster_process::masters(&ranges));
    let mut procs: Vec<Proc> = nodes.into_iter().map(|(_, proc)| proc).collect();
    if let Some(last) = procs.last_mut() {
        last.tmpdir = Some(dir);
    }
    (procs, seeds)
}

/// The `--presence-max-members` of the scenarios with member lists (at
/// least the clients).
pub const PRESENCE_MAX_MEMBERS: usize = 10_000;

/// Instance `id` of the server under test, joined to Redis by `broker`
/// (`--redis-url URL` or `--redis-cluster SEEDS`) under `prefix`, once it
/// answers `/readyz`.
/// One run's keys for `--auth hs256|es256`, in a temporary directory of
/// their own that goes with this value (at the end of the run).
pub struct AuthKeys {
    /// Held only to be removed with this value.
    _dir: process::TempDir,
    pub keys: RunKeys,
}

impl AuthKeys {
    /// Makes the keys `auth` needs (`None` for `--auth off`): an HS256
    /// secret of 64 random hex digits (`hs1.key`), or an ES256 (P-256) key
    /// pair from `openssl`, `private/es1.pem` (PKCS#8) and `public/es1.pem`:
    /// one file stem on both sides, so the token's `kid` names the
    /// instances' key.
    pub fn make(auth: Auth) -> Option<AuthKeys> {
        if auth == Auth::Off {
            return None;
        }
        let dir = process::temp_dir("load-auth");
        let keys = match auth {
            Auth::Off => unreachable!(),
            Auth::Hs256 => {
                let mut bytes = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                    .expect("cannot read /dev/urandom");
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let secret = dir.join("hs1.key");
                std::fs::write(&secret, format!("{hex}\n"))
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", secret.display()));
                RunKeys {
                    sign: secret.clone(),
                    verify: secret,
                }
            }
            Auth::Es256 => {
                for sub in ["private", "public"] {
                    std::fs::create_dir_all(dir.join(sub))
                        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
                }
                let (private, public) = (dir.join("private/es1.pem"), dir.join("public/es1.pem"));
                openssl(
                    Command::new("openssl")
                        .args(["genpkey", "-algorithm", "EC"])
                        .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-out"])
                        .arg(&private),
                );
                openssl(
                    Command::new("openssl")
                        .args(["pkey", "-pubout", "-in"])
                        .arg(&private)
                        .arg("-out")
                        .arg(&public),
                );
                RunKeys {
                    sign: private,
                    verify: public,
                }
            }
        };
        Some(AuthKeys { _dir: dir, keys })
    }
}

fn openssl(cmd: &mut Command) {
    let status = cmd
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("--auth es256 makes its keys with openssl: {e}"));
    assert!(status.success(), "{cmd:?} failed");
}

/// The instances' `--auth` flags for this run's keys (none for `--auth
/// off`).
fn auth_args(auth: Auth, keys: Option<&RunKeys>) -> Vec<String> {
    let flag = match auth {
        Auth::Off => return Vec::new(),
        Auth::Hs256 => "--auth-hs256-secret-file",
        Auth::Es256 => "--auth-public-key-file",
    };
    let keys = keys.expect("the run's keys are made before the instances start");
    let path: &Path = &keys.verify;
    vec![
        "--auth".into(),
        "token".into(),
        flag.into(),
        path.display().to_string(),
    ]
}

pub fn start_instance(id: &str, broker: &[String], prefix: &str, opts: &Opts) -> Proc {
    // Big enough never to be the limit. For max-clients, this instance's
    // half of the target and some spare: what the load looks for is where
    // the machine (or the server) gives out first. A `--max-clients` in
    // `--server-args` wins.
    let max_clients = if opts.scenario == Scenario::MaxClients {
        opts.clients.div_ceil(2) + 1000
    } else {
        opts.clients.max(5000)
    }
    .to_string();
    let mut cmd = process::instance_command(&server_bin(), id);
    cmd.args(broker).args(["--redis-prefix", prefix]);
    if !opts
        .server_args
        .iter()
        .any(|a| a.starts_with("--max-clients"))
    {
        cmd.args(["--max-clients", &max_clients]);
    }
    // A server from before `presence_diff` sends the whole list in its
    // snapshot, as far as this goes (the default, 1000, would leave the
    // rest out); to the current one it is only the largest window a
    // client may ask for. One in `--server-args` wins.
    if opts.scenario.keeps_member_lists()
        && !opts
            .server_args
            .iter()
            .any(|a| a.starts_with("--presence-max-members"))
    {
        let most = opts.clients.max(PRESENCE_MAX_MEMBERS).to_string();
        cmd.args(["--presence-max-members", &most]);
    }
    cmd.args(auth_args(opts.auth, opts.keys.as_ref()));
    let which = usize::from(id == "b");
    cmd.args(&opts.server_args)
        .args(&opts.inst_args[which])
        // The listening line is logged at info by the server module.
        .env("RUST_LOG", "warn,pubsub_chat::server=info");
    let mut cmd = wrapped(cmd, &opts.wrap[which]);
    let mut proc = Proc::spawn(id, &mut cmd);
    let stderr = proc.child.stderr.take().expect("piped stderr");
    let tail = proc.log_tail.clone();
    // Keeps the last lines for the report.
    let rx = process::watch_stderr(stderr, format!("stderr-{id}"), move |line| {
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= 20 {
            t.pop_front();
        }
        t.push_back(line);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(listening) => {
            proc.http = Some(listening.http);
            proc.ws = Some(listening.ws);
            proc.admin = listening.admin;
        }
        Err(_) => panic!(
            "instance {id} did not log its listening line:\n{}",
            proc.log_tail().join("\n")
        ),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(proc.http.unwrap(), "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "instance {id} is not ready:\n{}",
            proc.log_tail().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// `cmd` run under `wrap` (`--wrap-a "ip netns exec pc-a"`): the same
/// arguments and environment, after the wrapper's words; `cmd` itself when
/// there is no wrapper.
fn wrapped(cmd: Command, wrap: &[String]) -> Command {
    let Some((program, wrap_args)) = wrap.split_first() else {
        return cmd;
    };
    let mut outer = Command::new(program);
    outer
        .args(wrap_args)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    outer
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    process::try_http_get(addr, path, Duration::from_secs(5)).ok()
}

/// The numeric `chat_*` series of an instance's `/metrics`.
pub fn metrics(addr: SocketAddr) -> Vec<(String, f64)> {
    let Some((200, body)) = http_get(addr, "/metrics") else {
        return Vec::new();
    };
    body.lines()
        .filter(|l| l.starts_with("chat_"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[derive(Clone, Copy, Default, Debug)]
pub struct Sample {
    pub rss_kib: u64,
    pub threads: u64,
    pub cpu_ticks: u64,
    pub sys_ticks: u64,
}

/// VmRSS and Threads from /proc/PID/status, utime+stime from /proc/PID/stat.
pub fn sample(pid: u32) -> Sample {
    let mut s = Sample::default();
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            let num = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("VmRSS:") {
                s.rss_kib = num(line);
            } else if line.starts_with("Threads:") {
                s.threads = num(line);
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after the ")" closing the command name: state is field 3,
        // utime 14 and stime 15.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.cpu_ticks = get(11) + get(12);
            s.sys_ticks = get(12);
        }
    }
    s
}

/// CPU ticks and context switches of a process's threads, grouped by
/// thread name without its number (`ws-write-17` counts as `ws-write`).
#[derive(Clone, Default, Debug)]
pub struct Groups(pub HashMap<String, (u64, u64, u64)>);

fn sample_groups(pid: u32) -> Groups {
    let mut g = Groups::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return g;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let name = comm.trim_end_matches(|c: char| c.is_ascii_digit());
        let name = name.strip_suffix('-').unwrap_or(name).to_string();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let cpu = get(11) + get(12);
        let mut switches = (0, 0);
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for line in status.lines() {
                let num = || {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("voluntary_ctxt_switches:") {
                    switches.0 = num();
                } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                    switches.1 = num();
                }
            }
        }
        let e = g.0.entry(name).or_default();
        e.0 += cpu;
        e.1 += switches.0;
        e.2 += switches.1;
    }
    g
}

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// What a run samples: each entry a name, its pids (the load generator is
/// this process and its workers, summed) and whether it is an instance.
pub struct Procs {
    pub list: Vec<(String, Vec<u32>, bool)>,
}

impl Procs {
    pub fn sample(&self) -> Vec<Sample> {
        self.list
            .iter()
            .map(|(_, pids, _)| {
                pids.iter()
                    .map(|p| sample(*p))
                    .fold(Sample::default(), |a, s| Sample {
                        rss_kib: a.rss_kib + s.rss_kib,
                        threads: a.threads + s.threads,
                        cpu_ticks: a.cpu_ticks + s.cpu_ticks,
                        sys_ticks: a.sys_ticks + s.sys_ticks,
                    })
            })
            .collect()
    }

    /// Thread groups of the two instances.
    pub fn groups(&self) -> Vec<Groups> {
        self.list
            .iter()
            .filter(|p| p.2)
            .map(|(_, pids, _)| sample_groups(pids[0]))
            .collect()
    }
}

/// What Redis has done so far, summed over its nodes (one, or a cluster's
/// masters).
#[derive(Clone, Default, Debug)]
pub struct RedisCounts {
    /// Calls by command (`INFO commandstats`: those a script runs count
    /// too), the bench's own `INFO` left out.
    pub calls: BTreeMap<String, u64>,
    /// `used_cpu_user` + `used_cpu_sys` (`INFO cpu`), in seconds.
    pub cpu_s: f64,
}

impl RedisCounts {
    pub fn total(&self) -> u64 {
        self.calls.values().sum()
    }

    /// What happened between `before` and `self`, by command (those with
    /// calls only).
    pub fn since(&self, before: &RedisCounts) -> RedisCounts {
        let calls = self
            .calls
            .iter()
            .map(|(c, n)| {
                (
                    c.clone(),
                    n.saturating_sub(*before.calls.get(c).unwrap_or(&0)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        RedisCounts {
            calls,
            cpu_s: (self.cpu_s - before.cpu_s).max(0.0),
        }
    }
}

/// Connections to the Redis the instances use, to read its counters.
pub struct RedisWatch {
    conns: Vec<redis::Connection>,
}

impl RedisWatch {
    /// One connection per node: the URLs of `--redis-url` or
    /// `--redis-cluster` (its masters). Opened once, so that their own
    /// set-up commands come before the first reading.
    pub fn open(broker: &[String]) -> Result<RedisWatch, String> {
        let urls: Vec<&str> = broker
            .get(1)
            .map(|v| v.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let mut conns = Vec::new();
        for url in urls {
            let loopback = url
                .strip_prefix("redis://127.0.0.1:")
                .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
            let conn = match loopback {
                Some(port) => cluster_process::connect(port),
                None => redis::Client::open(url)
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1))),
            }
            .map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
            conns.push(conn);
        }
        Ok(RedisWatch { conns })
    }

    /// The length of hash `key` (summed over the nodes: in a cluster, the
    /// ones that do not hold it answer with an error, taken as 0).
    pub fn hlen(&mut self, key: &str) -> u64 {
        self.conns
            .iter_mut()
            .filter_map(|c| redis::cmd("HLEN").arg(key).query::<u64>(c).ok())
            .sum()
    }

    /// `MEMORY USAGE key` and the key's length (stream entries, hash
    /// fields), from the first node that has it; zeros when none has.
    pub fn memory_usage(&mut self, key: &str) -> (u64, u64) {
        for conn in &mut self.conns {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0)
                .query(conn)
                .ok()
                .flatten();
            if let Some(bytes) = bytes {
                let kind: String = redis::cmd("TYPE").arg(key).query(conn).unwrap_or_default();
                let len_command = if kind == "stream" { "XLEN" } else { "HLEN" };
                let len = redis::cmd(len_command).arg(key).query(conn).unwrap_or(0);
                return (bytes, len);
            }
        }
        (0, 0)
    }

    /// `used_memory` of `INFO memory`, summed over the nodes.
    pub fn used_memory(&mut self) -> u64 {
        self.info_field("memory", "used_memory")
    }

    /// A numeric field of an `INFO` section, summed over the nodes.
    pub fn info_field(&mut self, section: &str, field: &str) -> u64 {
        let prefix = format!("{field}:");
        self.conns
            .iter_mut()
            .filter_map(|c| redis::cmd("INFO").arg(section).query::<String>(c).ok())
            .filter_map(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix(prefix.as_str()))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// `INFO commandstats` and `INFO cpu`, summed over the nodes.
    pub fn read(&mut self) -> Result<RedisCounts, String> {
        let mut counts = RedisCounts::default();
        for conn in &mut self.conns {
            // One section a call: Redis 6 takes no more.
            let mut info = String::new();
            for section in ["commandstats", "cpu"] {
                let part: String = redis::cmd("INFO")
                    .arg(section)
                    .query(conn)
                    .map_err(|e| format!("INFO {section}: {e}"))?;
                info += &part;
            }
            for line in info.lines() {
                if let Some(rest) = line.strip_prefix("cmdstat_") {
                    // cmdstat_evalsha:calls=12,usec=...
                    let Some((command, fields)) = rest.split_once(':') else {
                        continue;
                    };
                    let calls = fields
                        .split(',')
                        .find_map(|f| f.strip_prefix("calls="))
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                    if command != "info" {
                        *counts.calls.entry(command.to_string()).or_default() += calls;
                    }
                } else if let Some((key, value)) = line.split_once(':')
                    && (key == "used_cpu_user" || key == "used_cpu_sys")
                {
                    counts.cpu_s += value.trim().parse::<f64>().unwrap_or(0.0);
                }
            }
        }
        Ok(counts)
    }
}
