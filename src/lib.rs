//! pubsub-chat: a WebSocket chat server that scales out, one instance per
//! process, the instances joined by Redis Pub/Sub.
//!
//! # The path of one message
//!
//! Three places answer "where is it published, received, handed to the
//! local clients":
//!
//! 1. **Published.** A client's session thread reads a text frame
//!    ([`session::reader::read_until_closed`]), checks it ([`protocol`]),
//!    and publishes it ([`session::reader::publish`], through the
//!    [`broker::Broker`] seam) by [`broker::redis::publisher::Publisher::publish`]:
//!    Redis runs the accept script, which gives the message the room's next
//!    id, appends it to the room's history (a Redis Stream) and `PUBLISH`es
//!    it on the room's channel, in one step. The session hands nothing to
//!    local clients itself, and no instance ever publishes what it
//!    received.
//! 2. **Received.** On every instance, a subscriber thread, blocked on its
//!    own subscribed connection and doing nothing else (the
//!    blocking-subscription pitfall), receives it
//!    ([`broker::redis::subscriber::Subscriber::subscribe_and_receive`])
//!    and forwards it as a [`broker::BrokerEvent`] into the fan-out's
//!    channel, in order. It holds no publishing connection: nothing
//!    received is published again.
//! 3. **Handed to the local clients.** The fan-out thread, the one reader
//!    of that channel, delivers it ([`delivery::fanout::Fanout::deliver`]): looks the
//!    room up in the [`hub`](delivery::hub) (a registry that writes to no socket), frames
//!    the message once, and hands the same bytes to each local client's
//!    outbox ([`delivery::outbox::Outbox::deliver`]), which writes them to the
//!    socket at once if it takes them, or queues them for a [`flusher`](delivery::flusher)
//!    thread. The sender gets its own copy this way too: that is its
//!    receipt, and every client sees one order.
//!
//! # The parts
//!
//! - Starting and stopping: [`config`] (every option, its default and its
//!   environment variable), [`redis_url`] (a Redis URL checked, shown
//!   without its password), [`server`] (the wiring: listeners, broker,
//!   threads, shutdown), [`supervisor`] (the instance's own threads,
//!   started and watched), [`drain`] (shutdown waits for the last
//!   client's guard).
//! - Clients: [`session`] (one thread per WebSocket client: handshake,
//!   identity, reader), [`auth`] (`--auth token`: signed tokens),
//!   [`http`] (the page and the endpoints, on tiny_http), [`protocol`] (the
//!   wire types: their only encoding and validation).
//! - Between instances: [`broker`] (Redis Pub/Sub and history, or the
//!   local, single-instance twin), [`presence`] (who is in each room),
//!   [`stats`] (the instances view behind `/stats`).
//! - Delivery on this instance, [`delivery`]: the fan-out, the hub, each
//!   client's outbox, the flushers, the X-ray's frames. The session and
//!   presence depend on it, never the reverse; no two modules import each
//!   other, even through others (`tests/module_graph.rs` checks it).
//! - Defences: [`rate_limit`] (a token bucket per client), [`origin`] (the
//!   Origin check), [`per_address`] (clients per address), [`liveness`]
//!   (the pinger that finds dead peers).
//! - The lesson: [`xray`](delivery::xray) (a message's path, for the clients that ask),
//!   [`demo`] (the fault panel), [`faults`] (faults the tests inject,
//!   debug builds only).
//! - Plumbing: [`metrics`] (`/metrics`), [`backoff`] (reconnection waits),
//!   [`clock`] (the wall and monotonic clocks), [`sync`] (the delivery
//!   path's lock, switchable to loom's), [`stack`] (giving back an idle
//!   reader's stack pages), [`allocator`] (malloc for thousands of
//!   threads), [`random`] (tags and tokens).
//!
//! Public are only the modules the binary, the tests and the benchmarks
//! use ([`server`], [`config`], [`auth`], [`protocol`], [`clock`],
//! [`allocator`]); the rest is private to the crate, and `cargo doc
//! --document-private-items` shows it.
//!
//! Words keep one meaning each: a session *publishes*, a subscriber
//! *receives* and *forwards* to the fan-out, the fan-out *delivers* to
//! outboxes, an outbox *writes* to its socket; *link status* is whether
//! the Redis links work. docs/ARCHITECTURE.md tells the same path with the
//! threads and their queues; docs/PROTOCOL.md is the wire.

// This map links the functions that do each step, most of them private to
// the crate: the documentation is built with `--document-private-items`
// (and checked so, with `-D warnings`, in .ci/run), where those links
// resolve; broken links still fail.
#![allow(rustdoc::private_intra_doc_links)]

pub mod allocator;
pub mod auth;
mod backoff;
mod broker;
pub mod clock;
pub mod config;
mod delivery;
mod demo;
mod drain;
mod faults;
mod http;
mod liveness;
mod metrics;
mod origin;
mod per_address;
mod presence;
pub mod protocol;
mod random;
mod rate_limit;
mod redis_url;
pub mod server;
mod session;
mod stack;
mod stats;
mod supervisor;
mod sync;
