//! The tests' fault proxy (`tests/common/fault_proxy.rs`) as a program, to
//! put on the path between two hosts: `scripts/run_hosts.sh` runs it in the
//! Redis "host" (a network namespace), in front of `redis-server`.
//!
//! ```sh
//! cargo run --release --example fault_proxy -- --listen 10.77.9.1:6379 \
//!     --upstream 127.0.0.1:6380 [--delay-ms 1] [--jitter-ms 0.5] [--bandwidth BYTES_PER_S]
//! ```
//!
//! Every connection accepted on `--listen` is forwarded to `--upstream`;
//! each chunk read (either way) is held `--delay-ms`, plus a random share
//! of `--jitter-ms` (order kept), and at most `--bandwidth` bytes a second
//! go each way. It is a TCP proxy: it delays and throttles a byte stream,
//! it cannot lose a packet (`run_hosts.sh` drops packets with iptables).
//! It prints one line once it listens, and runs until killed.

#[allow(dead_code)]
#[path = "../tests/common/fault_proxy.rs"]
mod fault_proxy;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use fault_proxy::{Fault, FaultProxy, Scope, Select};

const USAGE: &str = "usage: fault_proxy --listen ADDR:PORT --upstream ADDR:PORT \
[--delay-ms MS] [--jitter-ms MS] [--bandwidth BYTES_PER_S]";

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    delay: Duration,
    jitter: Duration,
    bandwidth: Option<u64>,
}

fn parse() -> Result<Option<Args>, String> {
    let mut listen = None;
    let mut upstream = None;
    let (mut delay, mut jitter, mut bandwidth) = (Duration::ZERO, Duration::ZERO, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let ms = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(|x| Duration::from_secs_f64(x / 1000.0))
                .ok_or_else(|| format!("{flag}: {v:?} is not a number of milliseconds"))
        };
        let addr = |v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{flag}: {v:?}: {e}"))
        };
        match flag.as_str() {
            "--listen" => listen = Some(addr(&value)?),
            "--upstream" => upstream = Some(addr(&value)?),
            "--delay-ms" => delay = ms(&value)?,
            "--jitter-ms" => jitter = ms(&value)?,
            "--bandwidth" => {
                bandwidth = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("--bandwidth: {value:?} is not bytes per second"))?,
                )
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    match (listen, upstream) {
        (Some(listen), Some(upstream)) => Ok(Some(Args {
            listen,
            upstream,
            delay,
            jitter,
            bandwidth,
        })),
        _ => Err(format!("--listen and --upstream are needed\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fault_proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let proxy = match FaultProxy::bind(args.listen, args.upstream) {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("fault_proxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let mut faults = Vec::new();
    if !args.delay.is_zero() {
        faults.push(Fault::Latency(args.delay));
    }
    if !args.jitter.is_zero() {
        faults.push(Fault::Jitter(args.jitter));
    }
    if let Some(rate) = args.bandwidth {
        faults.push(Fault::Bandwidth(rate));
    }
    for fault in &faults {
        proxy.inject(Select::All, *fault, Scope::AlsoNew);
    }
    println!(
        "fault_proxy listening on {}:{} -> {} (delay {:?}, jitter up to {:?}, bandwidth {})",
        args.listen.ip(),
        proxy.port(),
        args.upstream,
        args.delay,
        args.jitter,
        args.bandwidth
            .map_or("unlimited".to_string(), |b| format!("{b} B/s")),
    );
    loop {
        std::thread::park();
    }
}
