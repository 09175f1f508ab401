//! A subscribed Redis connection shared by two kinds of thread: the
//! subscriber thread blocks reading it, and any thread writes `SUBSCRIBE`
//! and `UNSUBSCRIBE` to it.
//!
//! This is the second lesson of the blocking-subscription pitfall. The
//! subscriber thread spends its life blocked in a read, so it cannot be
//! asked to subscribe to a new room: a client joining room `x` would wait
//! until some message, on some other room, happened to wake it. Giving the
//! read a timeout would turn it into a polling loop. Instead the socket is
//! split: a session that needs a room writes `SUBSCRIBE chat:room:{x}`
//! itself, on the write half, while the subscriber keeps reading; Redis's
//! confirmation arrives on the read half, in order with the messages, and
//! the subscriber thread passes it on. Nothing polls, and a room change
//! costs one command written and one confirmation read.
//!
//! redis-rs's `PubSub` owns its connection and cannot be split this way, so
//! this file speaks RESP on a `TcpStream` of its own, with redis-rs's
//! parser and command encoder.

use std::io::{self, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, Parser, RedisError, Value};

use crate::sync::{Mutex, lock};

/// What the read half delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A message published on a channel.
    Message { channel: String, payload: Vec<u8> },
    /// Redis confirmed a subscription.
    Subscribed(String),
    /// Redis confirmed the end of a subscription.
    Unsubscribed(String),
}

/// The write half: any thread may (un)subscribe.
pub struct SubscriptionWriter {
    stream: Mutex<TcpStream>,
    /// Sharded Pub/Sub (`SSUBSCRIBE`, Redis Cluster) or plain.
    sharded: bool,
}

/// The read half, owned by the subscriber thread.
pub struct SubscriptionReader {
    reader: BufReader<TcpStream>,
    parser: Parser,
}

/// Opens a connection, authenticates and names it, and splits it.
/// `sharded`: the channels are Redis Cluster shard channels.
pub fn open(
    info: &ConnectionInfo,
    name: &str,
    sharded: bool,
    timeout: Duration,
) -> Result<(SubscriptionReader, SubscriptionWriter), RedisError> {
    let ConnectionAddr::Tcp(host, port) = info.addr() else {
        return Err(io::Error::other("only plain TCP connections to Redis are supported").into());
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))?
        .next()
        .ok_or_else(|| io::Error::other(format!("{host} has no address")))?;
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = SubscriptionReader {
        reader: BufReader::new(stream.try_clone()?),
        parser: Parser::new(),
    };
    let writer = SubscriptionWriter {
        stream: Mutex::new(stream),
        sharded,
    };
    let settings = info.redis_settings();
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
        writer.send(&auth)?;
        reader.expect_ok()?;
    }
    writer.send(redis::cmd("CLIENT").arg("SETNAME").arg(name))?;
    reader.expect_ok()?;
    // Subscribed, the connection waits for messages for ever.
    reader.reader.get_ref().set_read_timeout(None)?;
    Ok((reader, writer))
}

impl SubscriptionWriter {
    fn send(&self, command: &redis::Cmd) -> io::Result<()> {
        lock(&self.stream).write_all(&command.get_packed_command())
    }

    pub fn subscribe(&self, channels: &[String]) -> io::Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let command = if self.sharded {
            "SSUBSCRIBE"
        } else {
            "SUBSCRIBE"
        };
        self.send(redis::cmd(command).arg(channels))
    }

    pub fn unsubscribe(&self, channels: &[String]) -> io::Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let command = if self.sharded {
            "SUNSUBSCRIBE"
        } else {
            "UNSUBSCRIBE"
        };
        self.send(redis::cmd(command).arg(channels))
    }

    /// Ends the connection, which wakes its reader with an error.
    pub fn shutdown(&self) {
        let _ = lock(&self.stream).shutdown(std::net::Shutdown::Both);
    }
}

impl SubscriptionReader {
    /// The next push; blocks until one arrives.
    pub fn next_push(&mut self) -> Result<Push, RedisError> {
        loop {
            let value = self.parser.parse_value(&mut self.reader)?;
            if let Value::ServerError(error) = value {
                return Err(error.into());
            }
            if let Some(push) = push_of(value) {
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

/// Reads a RESP2 pub/sub reply: `[kind, channel, payload-or-count]`, plain
/// or sharded.
fn push_of(value: Value) -> Option<Push> {
    let Value::Array(items) = value else {
        return None;
    };
    let mut items = items.into_iter();
    let kind = bytes_of(items.next()?)?;
    let channel = String::from_utf8(bytes_of(items.next()?)?).ok()?;
    match kind.as_slice() {
        b"message" | b"smessage" => Some(Push::Message {
            channel,
            payload: bytes_of(items.next()?)?,
        }),
        b"subscribe" | b"ssubscribe" => Some(Push::Subscribed(channel)),
        b"unsubscribe" | b"sunsubscribe" => Some(Push::Unsubscribed(channel)),
        _ => None,
    }
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
    fn pushes_are_read_from_resp2_replies() {
        let message = Value::Array(vec![bulk("message"), bulk("chat:room:{a}"), bulk("{}")]);
        assert_eq!(
            push_of(message),
            Some(Push::Message {
                channel: "chat:room:{a}".into(),
                payload: b"{}".to_vec()
            })
        );
        let confirmed = Value::Array(vec![bulk("subscribe"), bulk("c"), Value::Int(1)]);
        assert_eq!(push_of(confirmed), Some(Push::Subscribed("c".into())));
        assert_eq!(push_of(Value::Okay), None);
    }
}
