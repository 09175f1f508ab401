//! Process helpers shared by the integration tests (through
//! `tests/common/mod.rs`) and the benchmarks (`benches/load/`,
//! `benches/history_joins.rs`, which include this file with `#[path]`):
//! free ports and temporary directories, a plain HTTP `GET`, a private
//! `redis-server`, the command line and "listening" line of an instance,
//! and children that die with their parent.
//!
//! The standard library, libc and socket2 only, and nothing that panics on its own:
//! the tests turn a failure into a panic with their own message, the
//! benchmarks into their own report.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A name unique to this process and call: Redis prefixes, rooms,
/// temporary directories.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes the child `cmd` starts die (SIGKILL) when this process dies,
/// however it dies: a benchmark killed mid-run leaves no server or
/// `redis-server` behind.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: between fork and exec the child only sets its own
    // parent-death signal. The signal follows the thread that forked, so
    // callers start children from a thread that lives as long as they do
    // (the benchmarks' main thread).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A loopback port where nothing listens and nothing else can start to:
/// a socket bound to it but never listening, held as long as the value
/// lives, so a connection there is refused at once. A port from
/// [`free_port`] is released, and another test's listener may take it
/// before the connection under test is made.
pub struct RefusedPort {
    pub port: u16,
    _bound: socket2::Socket,
}

pub fn refused_port() -> RefusedPort {
    let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("cannot make a socket");
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("a loopback address");
    bound
        .bind(&loopback.into())
        .expect("cannot bind a loopback port");
    let port = bound
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("a bound socket has a port");
    RefusedPort {
        port,
        _bound: bound,
    }
}

/// A free loopback port (bound, read back, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free loopback port")
}

/// A new directory `pubsub-chat-<label>-<pid>-<n>` under the system's
/// temporary directory, removed with everything in it when the value is
/// dropped (a test that panics included): a run leaves nothing behind.
pub fn temp_dir(label: &str) -> TempDir {
    let dir = std::env::temp_dir().join(unique(&format!("pubsub-chat-{label}")));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    TempDir(dir)
}

/// A directory of [`temp_dir`]'s, used as a path.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where `program` is on the `PATH`, if it is.
pub fn find_program(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(program))
        .find(|p| p.is_file())
}

/// `GET path` over plain HTTP/1.0 (so the body is never chunked):
/// (status, body). `timeout` bounds the connect and each read.
pub fn try_http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    try_http(addr, "GET", path, timeout)
}

/// `method path` with no body over plain HTTP/1.0: (status, body).
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    try_http_with(addr, method, path, &[], timeout)
}

/// [`try_http`] with extra request headers.
pub fn try_http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad HTTP response: {response:?}"),
            )
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `redis-server` on `port` of the loopback interface, with no snapshots,
/// its files and `redis.log` in `dir`, and no output of its own. The
/// caller adds its own arguments (persistence, ...) and spawns it.
pub fn redis_server_command(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", ""])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Whether a Redis on the loopback `port` answers `PING` with `+PONG`, or
/// with `-NOAUTH` (it is up, and wants a password first).
pub fn redis_pings(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"PING\r\n")?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf)?;
            Ok(buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
        })
        .unwrap_or(false)
}

/// Polls [`redis_pings`] until it is true (true) or `timeout` has passed
/// (false).
pub fn wait_redis(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if redis_pings(port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The server binary `bin` as instance `id` on ephemeral ports, with the
/// per-client rate limit out of the way (tests and load send far faster
/// than a person; explicit flags still win), stdout discarded and stderr
/// piped: read it with [`watch_stderr`] for the listening line. The caller
/// adds the broker options and `RUST_LOG`, and spawns it.
pub fn instance_command(bin: &Path, id: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["--port", "0", "--instance-id", id])
        .env("RATE_BURST", "1000000")
        .env("RATE_PER_SEC", "1000000")
        // Tests open hundreds of clients from one address; the tests of
        // the per-address limit set it with the flag.
        .env("MAX_CLIENTS_PER_IP", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Where an instance listens, from its listening line.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// The public HTTP port: the page.
    pub http: SocketAddr,
    pub ws: SocketAddr,
    /// The admin listener (`--admin-addr`), unless it is off.
    pub admin: Option<SocketAddr>,
}

/// The addresses of an instance's listening line:
/// `instance a listening: page http://127.0.0.1:H/ websocket ws://127.0.0.1:W/ws admin http://127.0.0.1:A/`.
/// The server logs it at `info` from its `server` module.
pub fn parse_listening(line: &str) -> Option<Listening> {
    let rest = line.split(" listening: page http://").nth(1)?;
    let (http, rest) = rest.split_once("/ websocket ws://")?;
    let ws = rest.split('/').next()?;
    let admin = rest
        .split(" admin http://")
        .nth(1)
        .and_then(|admin| admin.split('/').next()?.parse().ok());
    Some(Listening {
        http: http.parse().ok()?,
        ws: ws.parse().ok()?,
        admin,
    })
}

/// Drains an instance's stderr on a thread named `thread_name` for the
/// process's whole life (so it never blocks on a full pipe), hands every
/// line to `on_line`, and sends the listening line's addresses on the
/// returned channel.
pub fn watch_stderr(
    stderr: ChildStderr,
    thread_name: String,
    mut on_line: impl FnMut(String) + Send + 'static,
) -> mpsc::Receiver<Listening> {
    let (addr_tx, addr_rx) = mpsc::channel();
    thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addrs) = parse_listening(&line) {
                    let _ = addr_tx.send(addrs);
                }
                on_line(line);
            }
        })
        .expect("cannot start a thread to read an instance's stderr");
    addr_rx
}
