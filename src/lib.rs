//! pubsub-chat: a WebSocket chat server that scales out, one instance per
//! process, the instances joined by Redis Pub/Sub.
//!
//! # Layout
//!
//! - [`config`]: every option, its default and its environment variable.
//! - [`redis_url`]: a Redis URL checked at start and shown without its
//!   password.
//! - [`server`]: wiring: listeners, broker, named threads, shutdown.
//! - [`http`]: the page, `/config.json`, `/healthz`, `/readyz` on the public
//!   port; `/metrics`, `/stats` and the fault panel on the admin listener.
//! - [`session`]: one WebSocket client's reader and writer threads.
//! - [`hub`]: local clients by room, and the never-blocking delivery.
//! - [`fanout`]: the thread between the Redis subscriber and the hub, that
//!   batches deliveries under load.
//! - [`direct`]: how a deliverer writes to an idle client's socket itself,
//!   sparing the writer thread a wake-up.
//! - [`broker`]: Redis Pub/Sub (and a Redis Stream of history per room), or
//!   the local, single-instance twin.
//! - [`protocol`]: the wire types and their only encoding and validation.
//! - [`auth`]: `--auth token`: the signed token (JWT) a client sends
//!   first, verified with pinned algorithms and keys; minting one for
//!   development.
//! - [`rate_limit`], [`origin`], [`per_address`], [`liveness`]: the
//!   defences: a token bucket per client, the Origin check, clients per
//!   address, and the pinger that finds dead peers.
//! - [`metrics`], [`backoff`], [`stack`], [`allocator`], [`random`]:
//!   counters, reconnection waits, giving back the stack pages an idle
//!   reader no longer needs, malloc set up for thousands of threads, and
//!   random tags and tokens.
//!
//! # The path of one message
//!
//! 1. A client's **reader thread** ([`session`]) reads a text frame,
//!    validates it ([`protocol`]) and asks the [`broker`] to publish it. It
//!    sends nothing to local clients itself.
//! 2. Redis runs the accept script: the message gets the next id, goes into
//!    the room's history and is published on the channel, in one step.
//! 3. On every instance, the **subscriber thread** receives it and passes
//!    it to the **fan-out thread** ([`fanout`]), which hands it (with any
//!    others that arrived meanwhile) to the [`hub`]: framed once, the same
//!    bytes queued to each local client of the room, never waiting on any.
//! 4. For a client whose **writer thread** is idle, the fan-out writes the
//!    bytes to the socket itself ([`direct`]); otherwise the writer takes
//!    them from its queue and writes them. The sender gets its own copy
//!    this way too: that is its receipt, and everyone sees the same order.

pub mod allocator;
pub mod auth;
pub mod backoff;
pub mod broker;
pub mod clock;
pub mod config;
pub mod demo;
pub mod fanout;
pub mod faults;
pub mod flusher;
pub mod http;
pub mod hub;
pub mod liveness;
pub mod metrics;
pub mod origin;
pub mod per_address;
pub mod presence;
pub mod protocol;
pub mod random;
pub mod rate_limit;
pub mod redis_url;
pub mod server;
pub mod session;
pub mod stack;
pub mod stats;
pub mod supervisor;
pub mod sync;
