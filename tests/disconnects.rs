//! Verifies that every way a client can leave (a close frame, a dropped
//! TCP connection, a connection cut in the middle of a frame) leaves no
//! thread, hub entry or connected-client count behind, as `/metrics` shows;
//! and that a SIGTERM closes every client with 1001 and exits promptly.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::{Instance, RedisServer, unique, wait_for};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;

fn assert_nothing_left(instance: &Instance, baseline_threads: f64) {
    instance.wait_metric("chat_clients_connected", 0.0);
    instance.wait_metric("chat_session_threads", 0.0);
    instance.wait_metric("chat_hub_members", 0.0);
    wait_for("the process thread count to return to its baseline", || {
        instance.metric("chat_process_threads") <= baseline_threads
    });
}

#[test]
fn every_way_of_leaving_frees_the_clients_threads_and_hub_entry() {
    let redis = RedisServer::start();
    let a = Instance::redis("leave", &redis.url(), &unique("leave"));
    a.wait_ready();
    let baseline = a.metric("chat_process_threads");

    // A close frame: the server answers it, and the client sees a clean close.
    let mut polite = a.client("polite", "lobby");
    assert_eq!(
        a.metric("chat_session_threads"),
        1.0,
        "one thread per client: its reader"
    );
    polite.socket.close(None).unwrap();
    loop {
        match polite.socket.read() {
            Ok(Message::Close(_)) | Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("expected a clean close, got {e}"),
        }
    }
    assert_nothing_left(&a, baseline);

    // A dropped TCP connection, no close frame.
    let rude = a.client("rude", "lobby");
    let MaybeTlsStream::Plain(stream) = rude.socket.get_ref() else {
        unreachable!()
    };
    stream.shutdown(Shutdown::Both).unwrap();
    drop(rude);
    assert_nothing_left(&a, baseline);

    // Cut in the middle of a frame: a masked text frame announcing 100
    // bytes, of which only 10 arrive.
    let mut cut = a.client("cut", "lobby");
    let MaybeTlsStream::Plain(stream) = cut.socket.get_mut() else {
        unreachable!()
    };
    stream.write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4]).unwrap();
    stream.write_all(&[b'x'; 10]).unwrap();
    stream.shutdown(Shutdown::Both).unwrap();
    drop(cut);
    assert_nothing_left(&a, baseline);

    // Many at once, in a room with traffic.
    let mut talker = a.client("talker", "busy");
    let crowd: Vec<_> = (0..20)
        .map(|n| a.client(&format!("c{n}"), "busy"))
        .collect();
    talker.send("bye all", "b1");
    talker.recv_messages(1);
    drop(crowd);
    drop(talker);
    assert_nothing_left(&a, baseline);
    assert_eq!(a.get("/healthz").0, 200);
}

#[test]
fn sigterm_closes_every_client_with_going_away_and_exits_within_two_seconds() {
    let redis = RedisServer::start();
    let mut a = Instance::redis("term", &redis.url(), &unique("term"));
    a.wait_ready();
    let mut clients: Vec<_> = (0..10)
        .map(|n| a.client(&format!("c{n}"), "lobby"))
        .collect();

    // The budget is the 2 s an orchestrator usually allows; half of it is
    // the margin left for a loaded machine.
    let took = a.terminate();
    assert!(
        took < Duration::from_secs(1),
        "shutdown took {took:?}: it must leave half of the 2 s budget"
    );
    for client in &mut clients {
        let close = loop {
            match client.socket.read() {
                Ok(Message::Close(frame)) => break frame,
                Ok(_) => continue,
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        };
        let close = close.expect("the close frame carries a code");
        assert_eq!(close.code, CloseCode::Away);
    }
}
