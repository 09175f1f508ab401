//! Verifies what a client that does not wait for the server's `101` gets:
//! a first frame sent right behind the handshake request, in the same TCP
//! segment, is read and answered like any other.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use common::{Instance, TIMEOUT};
use serde_json::Value;
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

/// A masked client text frame (RFC 6455 5.3), short enough for a one-byte
/// length.
fn masked_text_frame(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    assert!(text.len() < 126);
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads the HTTP response head; returns it and the bytes that came after.
fn read_response_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let deadline = Instant::now() + TIMEOUT;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
            return (head, bytes[end + 4..].to_vec());
        }
        assert!(Instant::now() < deadline, "no response head");
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "the server closed the connection after {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no response: {e}"),
        }
    }
}

#[test]
fn a_frame_sent_before_the_101_is_kept_and_answered() {
    let a = Instance::local("eager");
    let mut stream = TcpStream::connect_timeout(&a.ws, TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut bytes = format!(
        "GET /ws?name=eager&room=lobby HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        a.ws
    )
    .into_bytes();
    bytes.extend(masked_text_frame(
        r#"{"type":"message","text":"too eager","cid":"e1"}"#,
    ));
    stream.write_all(&bytes).unwrap();

    let (head, tail) = read_response_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut socket = WebSocket::from_partially_read(stream, tail, Role::Client, None);
    let mut frames = Vec::new();
    let own = loop {
        let frame: Value = match socket.read() {
            Ok(Message::Text(text)) => serde_json::from_str(&text).unwrap(),
            Ok(_) => continue,
            Err(e) => panic!("connection lost after {frames:?}: {e}\n{}", a.log()),
        };
        if frame["type"] == "message" {
            break frame;
        }
        assert_ne!(frame["type"], "error", "{frame}");
        frames.push(frame);
    };
    assert_eq!(frames[0]["type"], "welcome", "{frames:?}");
    assert_eq!(own["text"], "too eager");
    assert_eq!(own["cid"], "e1");

    // And the connection goes on as usual.
    socket
        .send(Message::text(
            r#"{"type":"message","text":"then","cid":"e2"}"#,
        ))
        .unwrap();
    loop {
        match socket.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "message" {
                    assert_eq!(frame["cid"], "e2", "{frame}");
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("connection lost: {e}"),
        }
    }
}
