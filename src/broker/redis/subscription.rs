//! A subscribed Redis connection, split in two: the subscriber thread
//! blocks reading it, and any thread asks for `SUBSCRIBE`, `UNSUBSCRIBE`
//! or `PING` on it without waiting.
//!
//! This is the second lesson of the blocking-subscription pitfall. The
//! subscriber thread spends its life blocked in a read, so it cannot be
//! asked to subscribe to a new room: a client joining room `x` would wait
//! until some message, on some other room, happened to wake it. Giving the
//! read a timeout would turn it into a polling loop. Instead the socket is
//! split: a session that needs a room queues `SUBSCRIBE chat:room:{x}`, a
//! small writer thread of the connection writes it while the subscriber
//! keeps reading, and Redis's answer arrives on the read half, in order
//! with the messages. Nothing polls, nobody holds a lock while the bytes
//! go out, and the commands reach Redis in the order they were asked for.
//!
//! Every command names **one** channel, and gets exactly one answer: a
//! confirmation naming the channel, or an error. So the read half can tell
//! which command Redis refused: it keeps the commands written, in order,
//! and matches each answer to the oldest. (One `SSUBSCRIBE` naming rooms of
//! two hash slots is refused whole with `CROSSSLOT`: per channel, that
//! cannot happen.)
//!
//! A link can die without a reset (a host lost, a NAT entry dropped): the
//! read then waits for ever. So the read half stamps everything it hears,
//! and the watcher ([`super::health`]) sends a `PING` (allowed in
//! subscribed mode) when Redis is quiet and shuts the connection down when
//! even the `PING` goes unanswered.
//!
//! redis-rs's `PubSub` owns its connection and cannot be split this way, so
//! this file speaks RESP on a `TcpStream` of its own, with redis-rs's
//! parser and command encoder. A plain socket is split with `try_clone`;
//! over TLS (`rediss://`) the two halves share one TLS session (see
//! [`super::tls`]).

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};
use log::debug;
use redis::{ConnectionAddr, ConnectionInfo, Parser, RedisError, ServerError, Value};

use super::connect::tcp_keepalive;
use super::tls::{self, RedisTls};
use crate::clock;
use crate::sync::{Mutex, lock};

/// Stack of a connection's writer thread: it only copies bytes.
const WRITER_STACK: usize = 64 * 1024;

/// What the read half delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Push {
    /// A message published on a channel.
    Message { channel: String, payload: Vec<u8> },
    /// Redis confirmed a subscription.
    Subscribed(String),
    /// A subscription ended: `asked` by this instance, or by Redis itself
    /// (a Redis Cluster moved the channel's slot to another master).
    Unsubscribed { channel: String, asked: bool },
    /// Redis refused to subscribe to `channel` (`MOVED` when a cluster
    /// master does not serve its slot, `NOPERM`, ...), in its own words.
    Refused { channel: String, error: ServerError },
    /// The answer to a `PING`.
    Pong,
}

/// A command written on the connection and not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Subscribe(String),
    Unsubscribe(String),
    Ping,
}

/// What both halves share.
struct Shared {
    /// Commands written, oldest first: each answer is the oldest's.
    unanswered: Mutex<VecDeque<Request>>,
    /// When the read half last heard from Redis ([`clock::mono_millis`]).
    heard_at: AtomicU64,
    /// The subscriber thread is handling a push, not waiting on Redis:
    /// silence then means a busy instance, not a dead link.
    busy: AtomicBool,
    /// For [`Subscription::shutdown`]: a handle on the socket.
    socket: TcpStream,
    sharded: bool,
}

/// The connection as any thread sees it: commands are queued, never
/// waited on, and written by the connection's writer thread in order.
pub struct Subscription {
    requests_tx: Sender<Request>,
    shared: Arc<Shared>,
}

/// The read half, owned by the subscriber thread.
pub struct SubscriptionReader {
    reader: BufReader<Box<dyn Read + Send>>,
    parser: Parser,
    shared: Arc<Shared>,
}

/// Opens a connection, authenticates and names it (`name`), and splits
/// it; its writer thread is named `writer_thread`. `sharded`: the channels
/// are Redis Cluster shard channels. `timeout` bounds the connect, the TLS
/// handshake, every write, and each answer until it is subscribed (then
/// the watcher takes over). `tls`: how to speak TLS to a `rediss://` node.
pub fn open(
    info: &ConnectionInfo,
    tls: Option<&RedisTls>,
    name: &str,
    writer_thread: &str,
    sharded: bool,
    timeout: Duration,
) -> Result<(SubscriptionReader, Arc<Subscription>), RedisError> {
    let (host, port, tls) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => (host, port, None),
        ConnectionAddr::TcpTls { host, port, .. } => {
            let tls = tls.ok_or_else(|| io::Error::other("rediss:// without TLS settings"))?;
            (host, port, Some(tls))
        }
        _ => {
            return Err(io::Error::other("only TCP connections to Redis are supported").into());
        }
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))?
        .next()
        .ok_or_else(|| io::Error::other(format!("{host} has no address")))?;
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    socket2::SockRef::from(&stream).set_tcp_keepalive(&tcp_keepalive())?;
    let socket = stream.try_clone()?;
    let (read_half, mut writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match tls {
        None => (Box::new(stream.try_clone()?), Box::new(stream)),
        Some(tls) => {
            let (read_half, write_half) = tls::handshake(tls, host, stream)?;
            (Box::new(read_half), Box::new(write_half))
        }
    };
    let mut reader = SubscriptionReader {
        reader: BufReader::new(read_half),
        parser: Parser::new(),
        shared: Arc::new(Shared {
            unanswered: Mutex::default(),
            heard_at: AtomicU64::new(clock::mono_millis()),
            busy: AtomicBool::new(false),
            socket,
            sharded,
        }),
    };
    let settings = info.redis_settings();
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
        writer.write_all(&auth.get_packed_command())?;
        reader.expect_ok()?;
    }
    if settings.db() != 0 {
        // Pub/Sub ignores databases, but a database Redis does not have
        // is a wrong URL, to be told here as on every other connection.
        writer.write_all(&redis::cmd("SELECT").arg(settings.db()).get_packed_command())?;
        reader.expect_ok()?;
    }
    writer.write_all(
        &redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .get_packed_command(),
    )?;
    reader.expect_ok()?;
    // Subscribed, the connection waits for messages for ever; the watcher
    // tells a quiet link from a dead one.
    reader.shared.socket.set_read_timeout(None)?;
    let (requests_tx, requests_rx) = unbounded();
    let shared = reader.shared.clone();
    thread::Builder::new()
        .name(writer_thread.to_string())
        .stack_size(WRITER_STACK)
        .spawn(move || write_requests(writer, &requests_rx, &shared))?;
    let subscription = Subscription {
        requests_tx,
        shared: reader.shared.clone(),
    };
    Ok((reader, Arc::new(subscription)))
}

/// The writer thread: writes each request in the order asked, after noting
/// it as unanswered (its answer may come the moment it is written). Ends
/// when nobody can ask any more, or the connection breaks.
fn write_requests(
    mut stream: Box<dyn Write + Send>,
    requests_rx: &Receiver<Request>,
    shared: &Shared,
) {
    for request in requests_rx {
        let (name, channel) = match &request {
            Request::Subscribe(channel) if shared.sharded => ("SSUBSCRIBE", Some(channel)),
            Request::Subscribe(channel) => ("SUBSCRIBE", Some(channel)),
            Request::Unsubscribe(channel) if shared.sharded => ("SUNSUBSCRIBE", Some(channel)),
            Request::Unsubscribe(channel) => ("UNSUBSCRIBE", Some(channel)),
            Request::Ping => ("PING", None),
        };
        let mut command = redis::cmd(name);
        if let Some(channel) = channel {
            command.arg(channel);
        }
        let command = command.get_packed_command();
        lock(&shared.unanswered).push_back(request);
        if let Err(e) = stream.write_all(&command) {
            debug!("redis subscription: write failed ({e}); closing the connection");
            let _ = shared.socket.shutdown(Shutdown::Both);
            return;
        }
    }
}

impl Subscription {
    fn request(&self, request: Request) {
        // Fails only once the writer thread ended with a broken link, which
        // the read half sees too.
        let _ = self.requests_tx.send(request);
    }

    pub fn subscribe(&self, channel: &str) {
        self.request(Request::Subscribe(channel.to_string()));
    }

    pub fn unsubscribe(&self, channel: &str) {
        self.request(Request::Unsubscribe(channel.to_string()));
    }

    /// Asks Redis for a sign of life.
    pub fn ping(&self) {
        self.request(Request::Ping);
    }

    /// How long Redis has been silent while the subscriber waited for it;
    /// `None` while the subscriber is busy with what it heard.
    pub fn silence(&self) -> Option<Duration> {
        if self.shared.busy.load(Ordering::Relaxed) {
            return None;
        }
        let heard_at = self.shared.heard_at.load(Ordering::Relaxed);
        Some(Duration::from_millis(
            clock::mono_millis().saturating_sub(heard_at),
        ))
    }

    /// The address of the Redis it is connected to.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.shared.socket.peer_addr().ok()
    }

    /// Ends the connection, which wakes its reader with an error.
    pub fn shutdown(&self) {
        let _ = self.shared.socket.shutdown(Shutdown::Both);
    }
}

impl SubscriptionReader {
    /// The next push; blocks until one arrives.
    pub fn next_push(&mut self) -> Result<Push, RedisError> {
        loop {
            self.shared.busy.store(false, Ordering::Relaxed);
            let value = self.parser.parse_value(&mut self.reader);
            self.shared.busy.store(true, Ordering::Relaxed);
            self.shared
                .heard_at
                .store(clock::mono_millis(), Ordering::Relaxed);
            let push = answer(&mut lock(&self.shared.unanswered), value?)?;
            if let Some(push) = push {
                return Ok(push);
            }
        }
    }

    fn expect_ok(&mut self) -> Result<(), RedisError> {
        match self.parser.parse_value(&mut self.reader)? {
            Value::ServerError(error) => Err(error.into()),
            _ => Ok(()),
        }
    }
}

/// What one value read means, matched against the oldest unanswered
/// command when it is an answer; `None` for a value that means nothing
/// here.
fn answer(unanswered: &mut VecDeque<Request>, value: Value) -> Result<Option<Push>, RedisError> {
    if let Value::ServerError(error) = value {
        return match unanswered.pop_front() {
            Some(Request::Subscribe(channel)) => Ok(Some(Push::Refused { channel, error })),
            _ => Err(error.into()),
        };
    }
    // Before its first subscription the connection answers `PING` as any
    // other does: `+PONG`, not `[pong, ""]`.
    if matches!(&value, Value::SimpleString(text) if text.eq_ignore_ascii_case("pong")) {
        if unanswered.front() != Some(&Request::Ping) {
            return Err(out_of_step(b"PONG", "", unanswered.front()));
        }
        unanswered.pop_front();
        return Ok(Some(Push::Pong));
    }
    let Some((kind, channel, payload)) = parts_of(value) else {
        return Ok(None);
    };
    let push = match kind.as_slice() {
        b"message" | b"smessage" => Push::Message {
            channel,
            payload: payload.unwrap_or_default(),
        },
        b"subscribe" | b"ssubscribe" => {
            if unanswered.front() != Some(&Request::Subscribe(channel.clone())) {
                return Err(out_of_step(&kind, &channel, unanswered.front()));
            }
            unanswered.pop_front();
            Push::Subscribed(channel)
        }
        b"unsubscribe" | b"sunsubscribe" => {
            let asked = unanswered.front() == Some(&Request::Unsubscribe(channel.clone()));
            if asked {
                unanswered.pop_front();
            }
            Push::Unsubscribed { channel, asked }
        }
        b"pong" => {
            if unanswered.front() != Some(&Request::Ping) {
                return Err(out_of_step(&kind, &channel, unanswered.front()));
            }
            unanswered.pop_front();
            Push::Pong
        }
        _ => return Ok(None),
    };
    Ok(Some(push))
}

/// An answer that is not the one the oldest command expects: the two
/// halves disagree about the connection, which is then not to be trusted.
fn out_of_step(kind: &[u8], channel: &str, expected: Option<&Request>) -> RedisError {
    io::Error::other(format!(
        "redis answered {} {channel:?} where {expected:?} was expected",
        String::from_utf8_lossy(kind)
    ))
    .into()
}

/// Reads a RESP2 pub/sub reply: `[kind, channel, payload-or-count]`, plain
/// or sharded (`pong` comes as `[pong, ""]`).
fn parts_of(value: Value) -> Option<(Vec<u8>, String, Option<Vec<u8>>)> {
    let Value::Array(items) = value else {
        return None;
    };
    let mut items = items.into_iter();
    let kind = bytes_of(items.next()?)?;
    let channel = String::from_utf8(bytes_of(items.next()?)?).ok()?;
    let payload = items.next().and_then(bytes_of);
    Some((kind, channel, payload))
}

fn bytes_of(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn pub_sub_replies_are_read_into_their_parts() {
        let message = Value::Array(vec![bulk("message"), bulk("chat:room:{a}"), bulk("{}")]);
        assert_eq!(
            parts_of(message),
            Some((
                b"message".to_vec(),
                "chat:room:{a}".into(),
                Some(b"{}".to_vec())
            ))
        );
        let confirmed = Value::Array(vec![bulk("subscribe"), bulk("c"), Value::Int(1)]);
        assert_eq!(
            parts_of(confirmed),
            Some((b"subscribe".to_vec(), "c".into(), None))
        );
        assert_eq!(parts_of(Value::Okay), None);
    }

    /// A server error as Redis sends it (`-MOVED 42 ...`).
    fn server_error(line: &str) -> Value {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap()
    }

    fn reply(kind: &str, channel: &str) -> Value {
        Value::Array(vec![bulk(kind), bulk(channel), Value::Int(1)])
    }

    #[test]
    fn each_answer_is_matched_to_the_command_it_answers() {
        let mut unanswered = VecDeque::from([
            Request::Subscribe("a".into()),
            Request::Subscribe("b".into()),
            Request::Ping,
            Request::Unsubscribe("a".into()),
        ]);
        assert_eq!(
            answer(&mut unanswered, reply("ssubscribe", "a")).unwrap(),
            Some(Push::Subscribed("a".into()))
        );
        // A message between two answers answers nothing.
        let message = Value::Array(vec![bulk("smessage"), bulk("a"), bulk("{}")]);
        assert!(matches!(
            answer(&mut unanswered, message).unwrap(),
            Some(Push::Message { .. })
        ));
        let Some(Push::Refused { channel, error }) =
            answer(&mut unanswered, server_error("MOVED 42 127.0.0.1:7001")).unwrap()
        else {
            panic!("a refused subscribe is reported with its channel");
        };
        assert_eq!((channel.as_str(), error.code()), ("b", "MOVED"));
        assert_eq!(
            answer(&mut unanswered, Value::Array(vec![bulk("pong"), bulk("")])).unwrap(),
            Some(Push::Pong)
        );
        // Redis ends another subscription on its own (a slot moved), then
        // answers the one asked for.
        assert_eq!(
            answer(&mut unanswered, reply("sunsubscribe", "z")).unwrap(),
            Some(Push::Unsubscribed {
                channel: "z".into(),
                asked: false
            })
        );
        assert_eq!(
            answer(&mut unanswered, reply("sunsubscribe", "a")).unwrap(),
            Some(Push::Unsubscribed {
                channel: "a".into(),
                asked: true
            })
        );
        assert!(unanswered.is_empty());
    }

    #[test]
    fn a_ping_before_any_subscription_is_answered_as_a_plain_pong() {
        let mut unanswered = VecDeque::from([Request::Ping, Request::Subscribe("a".into())]);
        assert_eq!(
            answer(&mut unanswered, Value::SimpleString("PONG".into())).unwrap(),
            Some(Push::Pong)
        );
        assert_eq!(
            answer(&mut unanswered, reply("subscribe", "a")).unwrap(),
            Some(Push::Subscribed("a".into()))
        );
    }

    #[test]
    fn an_answer_out_of_step_breaks_the_connection() {
        let mut unanswered = VecDeque::from([Request::Subscribe("a".into())]);
        assert!(answer(&mut unanswered, reply("subscribe", "b")).is_err());
        let mut unanswered = VecDeque::from([Request::Subscribe("a".into())]);
        assert!(answer(&mut unanswered, Value::Array(vec![bulk("pong"), bulk("")])).is_err());
        let mut unanswered = VecDeque::from([Request::Ping]);
        assert!(
            answer(
                &mut unanswered,
                server_error("NOAUTH Authentication required.")
            )
            .is_err(),
            "only a subscribe may be refused without breaking the link"
        );
    }
}
