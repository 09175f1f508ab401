//! Delivery on this instance: from the fan-out's channel to the bytes on
//! each local client's socket. The session depends on it (a joining
//! client registers its outbox with the hub); nothing here depends on the
//! session.
//!
//! - [`fanout`]: the one reader of the broker's events; frames each message
//!   once and delivers it to the outboxes of the room's local clients.
//! - [`hub`]: this instance's local clients by room: a registry that writes
//!   to no socket.
//! - [`outbox`]: one client's outbox: every byte to one socket, in one
//!   order, under one small lock; writes at once when the socket takes it.
//! - [`flusher`]: the threads that finish what full sockets could not take.
//! - [`pause`]: delivery held on purpose (the fault panel's pause).
//! - [`xray`]: a message's path, for the clients that ask (`trace=1`): their
//!   frames are made for them alone.
//! - [`view`]: a client's window on its room's member list, which presence
//!   keeps up to date.

pub mod fanout;
pub mod flusher;
pub mod hub;
pub mod outbox;
pub mod pause;
pub mod view;
pub mod xray;
