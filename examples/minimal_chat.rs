//! The fix at its smallest: a chat whose instances are joined by Redis
//! Pub/Sub, without the four mistakes that `./scripts/pitfall.sh` shows
//! (examples/pitfall_*.rs), and without anything else. The README says what
//! the full server adds to it, and why.
//!
//! ```text
//!   client ──> reader thread ──PUBLISH──> publishing connection ──> Redis
//!                                                                     │
//!   client <── writer thread <── its channel <── subscriber thread <──┘
//!                                                (subscribed connection)
//! ```
//!
//! Two instances on one Redis are one chat (one room, one channel):
//! `cargo run --release --example minimal_chat -- --port 8000 --ws-port 8001`
//! `cargo run --release --example minimal_chat -- --port 8002 --ws-port 8003`
//! then open http://127.0.0.1:8000/ and http://127.0.0.1:8002/.

use std::collections::HashMap;
use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use clap::Parser;
use crossbeam_channel::{Receiver, Sender};
use redis::Commands;
use serde_json::{Value, json};
use tungstenite::handshake::server::{Request, Response};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role};
use tungstenite::{Message, WebSocket};

/// How many messages a client may be behind. One this far behind has
/// stopped reading, and waiting for it would make everyone wait.
const BEHIND: usize = 1024;
/// How long one write to a client may block: past that, it is gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
struct Args {
    /// The Redis that joins the instances.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// HTTP port: the page and /healthz.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// WebSocket port. A listener of its own, because a stream that
    /// tiny_http has upgraded cannot be split into a reader and a writer.
    #[arg(long, default_value_t = 8001)]
    ws_port: u16,
    /// The channel every instance publishes on and subscribes to.
    #[arg(long, default_value = "minimal:chat")]
    channel: String,
}

/// What the client threads share.
struct Instance {
    /// Every local client's channel, by client number.
    clients: Mutex<HashMap<usize, Sender<Message>>>,
    /// The publishing connection, one for all the clients: a PUBLISH holds
    /// it for a round trip to Redis, far less than people take to type, and
    /// Redis sees one connection per instance instead of one per client.
    publisher: Mutex<redis::Connection>,
    channel: String,
}

type Failure = Box<dyn Error + Send + Sync>;

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    let redis = redis::Client::open(args.redis.as_str())?;
    // Two connections, because one that has sent SUBSCRIBE refuses PUBLISH
    // (pitfall 1).
    let mut subscribed = connect(&redis, format!("minimal:{}:sub", args.ws_port))?;
    let publisher = connect(&redis, format!("minimal:{}:pub", args.ws_port))?;
    let mut subscription = subscribed.as_pubsub();
    subscription.subscribe(&args.channel)?;

    // Listening only once subscribed: a client that gets in gets every
    // message published from then on.
    let http = tiny_http::Server::http((args.host.as_str(), args.port))?;
    let page = PAGE.replace("WS_PORT", &args.ws_port.to_string());
    thread::spawn(move || serve_http(&http, &page));
    let listener = TcpListener::bind((args.host.as_str(), args.ws_port))?;
    let instance = Arc::new(Instance {
        clients: Mutex::default(),
        publisher: Mutex::new(publisher),
        channel: args.channel.clone(),
    });
    let accepting = Arc::clone(&instance);
    thread::spawn(move || {
        for (id, stream) in listener.incoming().flatten().enumerate() {
            let instance = Arc::clone(&accepting);
            thread::spawn(move || {
                if let Err(e) = serve_client(stream, id, &instance) {
                    eprintln!("client {id}: {e}");
                }
            });
        }
    });
    println!("http://{}:{}/ on {}", args.host, args.port, args.channel);

    // This thread is the subscriber. It reads the subscription and hands
    // each message on, and does nothing else: it serves no request
    // (pitfall 2), never waits for a client (pitfall 3), and publishes
    // nothing (pitfall 4: every instance, the sender's included, already
    // got the message). If Redis goes away, the process ends.
    loop {
        let payload: String = subscription.get_message()?.get_payload()?;
        fan_out(&instance, payload);
    }
}

/// A connection that `CLIENT LIST` names, so that one sees which does what.
fn connect(redis: &redis::Client, name: String) -> redis::RedisResult<redis::Connection> {
    let mut connection = redis.get_connection()?;
    connection.client_setname::<_, ()>(name)?;
    Ok(connection)
}

/// Hands a message from Redis to every local client without ever waiting.
/// A client whose channel is full is dropped: its writer sends what was
/// queued, then closes it with 1008. Waiting for it instead would stall
/// every other client, then Redis would cut the subscription (pitfall 3).
fn fan_out(instance: &Instance, payload: String) {
    let frame = Message::text(payload); // its clones share the bytes
    let mut clients = instance.clients.lock().unwrap();
    clients.retain(|_, queue| queue.try_send(frame.clone()).is_ok());
}

/// One client, on its own thread: the handshake, then its writer thread,
/// then reading and publishing until it leaves.
fn serve_client(stream: TcpStream, id: usize, instance: &Instance) -> Result<(), Failure> {
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    let mut name = "guest".to_string();
    #[allow(clippy::result_large_err)] // the callback type is tungstenite's
    let note_name = |request: &Request, response: Response| {
        let query = request.uri().query().unwrap_or("").as_bytes();
        if let Some((_, value)) = form_urlencoded::parse(query).find(|(key, _)| key == "name") {
            name = value.into_owned();
        }
        Ok(response)
    };
    let ws = tungstenite::accept_hdr(stream, note_name).map_err(|e| e.to_string())?;
    let socket = ReadOnly(ws.get_ref().try_clone()?);
    let mut reader = WebSocket::from_raw_socket(socket, Role::Server, None);
    // The welcome first, then into the map: once the client has read its
    // welcome, it gets every message.
    let (queue, queued) = crossbeam_channel::bounded(BEHIND);
    let welcome = json!({"type": "welcome", "name": name}).to_string();
    queue.try_send(Message::text(welcome))?;
    instance.clients.lock().unwrap().insert(id, queue);
    let left = Arc::new(AtomicBool::new(false));
    let writer_left = Arc::clone(&left);
    thread::spawn(move || write_queued(ws, &queued, &writer_left));

    while let Ok(frame) = reader.read() {
        match frame {
            Message::Text(text) => publish(instance, &name, &text),
            Message::Close(_) => break,
            _ => {}
        }
    }
    // Out of the map: its channel closes, and its writer ends.
    left.store(true, Ordering::Relaxed);
    instance.clients.lock().unwrap().remove(&id);
    Ok(())
}

/// Publishes a client's message once. Nobody here is shown it yet: it
/// comes back through Redis to every instance, this one included, and the
/// sender sees its own message arrive like everyone else's.
fn publish(instance: &Instance, name: &str, frame: &str) {
    let frame: Value = serde_json::from_str(frame).unwrap_or_default();
    let Some(text) = frame["text"].as_str() else {
        return;
    };
    let message = json!({"type": "message", "from": name, "text": text, "cid": frame["cid"]});
    let mut publisher = instance.publisher.lock().unwrap();
    let sent = publisher.publish::<_, _, ()>(&instance.channel, message.to_string());
    if let Err(e) = sent {
        eprintln!("PUBLISH failed, message lost: {e}");
    }
}

/// A client's writer, the only thread that writes to its socket. It may
/// block on a client that reads slowly: only that client waits.
fn write_queued(mut ws: WebSocket<TcpStream>, queued: &Receiver<Message>, left: &AtomicBool) {
    for frame in queued.iter() {
        if ws.send(frame).is_err() {
            break;
        }
    }
    // The channel is closed and empty: the client left (this answers its
    // Close), or the subscriber dropped it for being too far behind.
    let slow = !left.load(Ordering::Relaxed);
    let _ = ws.close(slow.then(|| CloseFrame {
        code: CloseCode::Policy,
        reason: "too slow: messages were dropped".into(),
    }));
    let _ = ws.flush();
    // Wakes the reader up, should the client still be there.
    let _ = ws.get_ref().shutdown(Shutdown::Both);
}

/// The reader's side of the socket. Tungstenite answers pings and the
/// client's Close on its own, writing from the thread that reads; those
/// writes are dropped here, so that the writer is the only thread that
/// writes (two could interleave their frames' bytes). The writer answers
/// the Close; pings go unanswered (browsers send none).
struct ReadOnly(TcpStream);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The page and /healthz, on a thread of their own that never waits on
/// Redis or on a client: /healthz answers whatever the chat does.
fn serve_http(server: &tiny_http::Server, page: &str) {
    let html = tiny_http::Header::from_bytes("Content-Type", "text/html; charset=utf-8").unwrap();
    for request in server.incoming_requests() {
        let response = match request.url().split('?').next() {
            Some("/healthz") => tiny_http::Response::from_string("ok"),
            Some("/") => tiny_http::Response::from_string(page).with_header(html.clone()),
            _ => tiny_http::Response::from_string("no page here").with_status_code(404),
        };
        let _ = request.respond(response);
    }
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>minimal chat</title>
<ul id="log"></ul>
<form id="form"><input id="text" autocomplete="off" autofocus> <button>send</button></form>
<script>
const name = prompt("Your name?") || "guest";
const ws = new WebSocket(`ws://${location.hostname}:WS_PORT/ws?name=${encodeURIComponent(name)}`);
const show = (line) => (log.appendChild(document.createElement("li")).textContent = line);
ws.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  if (frame.type === "message") show(`${frame.from}: ${frame.text}`);
};
ws.onclose = (event) => show(`(disconnected: ${event.code} ${event.reason})`);
form.onsubmit = (event) => {
  event.preventDefault();
  ws.send(JSON.stringify({ type: "message", text: text.value }));
  text.value = "";
};
</script>
"#;
