//! Verifies that a name cannot cheaply pass for another: characters that
//! are invisible or turn the text's direction are refused, one spelling
//! of a name is one name whatever the Unicode composition, and guests get
//! names that no other instance, and no earlier run, gives.

mod common;

use std::collections::HashSet;

use common::{Client, Instance};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

fn expect_policy_close(client: &mut Client) {
    loop {
        match client.socket.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Policy);
                return;
            }
            Ok(_) => continue,
            Err(e) => panic!("expected a 1008 close, got {e}"),
        }
    }
}

#[test]
fn names_with_invisible_or_direction_changing_characters_are_refused_with_the_reason() {
    let solo = Instance::local("names");
    for (query, what) in [
        ("name=ali%E2%80%8Bce", "U+200B zero width space"),
        ("name=%E2%80%AEecila", "U+202E right-to-left override"),
        ("name=al%E2%81%A6ice", "U+2066 left-to-right isolate"),
        ("name=%EF%BB%BFalice", "U+FEFF byte order mark"),
        ("name=al%C2%ADice", "U+00AD soft hyphen"),
        ("name=al%E2%80%8Eice", "U+200E left-to-right mark"),
    ] {
        let mut client = Client::connect_raw(solo.ws, query);
        let error = client.recv();
        assert_eq!(error["type"], "error", "{what}: {error}");
        assert_eq!(error["code"], "bad_request", "{what}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&what[..6]),
            "{what}: the refusal names the character: {error}"
        );
        expect_policy_close(&mut client);
    }
    // Letters of any script, and spaces inside, are still names.
    for name in ["Zoë", "Ἀλέξανδρος", "李小龙", "ann marie", "سارا"] {
        let query = format!(
            "name={}",
            form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
        );
        let client = Client::connect(solo.ws, &query);
        assert_eq!(client.welcome["name"], name);
    }
}

#[test]
fn a_name_is_taken_in_its_composed_form_so_one_spelling_is_one_name() {
    let solo = Instance::local("nfc");
    // "élise" typed as e + U+0301 (combining acute accent).
    let decomposed = Client::connect(solo.ws, "name=e%CC%81lise&room=lobby");
    assert_eq!(decomposed.welcome["name"], "\u{e9}lise");
    let composed = Client::connect(solo.ws, "name=%C3%A9lise&room=lobby");
    assert_eq!(composed.welcome["name"], decomposed.welcome["name"]);
}

#[test]
fn guests_get_names_no_other_instance_and_no_earlier_run_gives() {
    let mut seen = HashSet::new();
    let mut first_guests = Vec::new();
    for run in 0..2 {
        for id in ["a", "b"] {
            let instance = Instance::local(id);
            let guests: Vec<Client> = (0..3)
                .map(|_| Client::connect(instance.ws, "room=lobby"))
                .collect();
            for guest in &guests {
                let name = guest.welcome["name"].as_str().unwrap().to_string();
                assert!(name.starts_with("guest-"), "{name}");
                assert!(
                    seen.insert(name.clone()),
                    "{name} given twice (instance {id}, run {run}); given before: {seen:?}"
                );
            }
            if run == 0 {
                first_guests.push(guests[0].welcome["name"].clone());
            }
        }
    }
    assert_ne!(first_guests[0], first_guests[1]);
}
