//! Verifies `--auth token` (docs/PROTOCOL.md, "Authentication") on real
//! instances and a real Redis, with tokens signed by keys the test makes:
//! an HS256 secret, and ES256 and RS256 key pairs from `openssl`.
//!
//! Every refusal has its own `error` code and closes with its documented
//! code, before the client is in a room or costs a Redis command; a
//! client that sends nothing is closed at the handshake deadline. A valid
//! token says who the client is (a query-string name cannot override
//! it), which rooms it may join, and how long it lasts: a fresh token
//! extends it, none closes it at `exp` (4401). Presence counts users by
//! `sub`: two users who share a name are two members, one user's tabs on
//! two instances are one. With `--auth off` an `auth` frame is refused
//! and the connection goes on.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, Instance, RedisServer, TIMEOUT, TempDir, temp_dir, unique, wait_for};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pubsub_chat::auth::{Claims, KeySources, SigningKey, mint};
use serde_json::{Value, json};
use tungstenite::Message;

/// The keys one test signs with, in a directory removed when it ends.
struct Keys {
    dir: TempDir,
    /// The HS256 secret's file (its `kid` is `hs1`).
    secret: PathBuf,
    /// ES256: the private key the "backend" signs with, and the public
    /// one the server verifies with; both named `es1`.
    es_private: PathBuf,
    es_public: PathBuf,
    rs_private: PathBuf,
    rs_public: PathBuf,
}

impl Keys {
    fn new() -> Self {
        let dir = temp_dir("auth-keys");
        for sub in ["private", "public"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let secret = dir.join("hs1.key");
        std::fs::write(&secret, format!("{}\n", "s3cr3t-".repeat(8))).unwrap();
        let keys = Keys {
            secret,
            es_private: dir.join("private/es1.pem"),
            es_public: dir.join("public/es1.pem"),
            rs_private: dir.join("private/rs1.pem"),
            rs_public: dir.join("public/rs1.pem"),
            dir,
        };
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ],
            &keys.es_private,
        );
        openssl_public(&keys.es_private, &keys.es_public);
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ],
            &keys.rs_private,
        );
        openssl_public(&keys.rs_private, &keys.rs_public);
        keys
    }

    fn secret_args(&self) -> Vec<String> {
        vec![
            "--auth".into(),
            "token".into(),
            "--auth-hs256-secret-file".into(),
            self.secret.display().to_string(),
        ]
    }

    /// A valid HS256 token for `sub`, `name`, lasting `ttl_s`.
    fn token(&self, sub: &str, name: &str, ttl_s: u64) -> String {
        self.token_with(claims(sub, name, ttl_s))
    }

    fn token_with(&self, claims: Claims) -> String {
        let signing = SigningKey::Secret(KeySources {
            secret_file: Some(self.secret.clone()),
            ..KeySources::default()
        });
        mint(&claims, &signing, true).unwrap()
    }
}

fn openssl(args: &[&str], out: &Path) {
    let status = Command::new("openssl")
        .args(args)
        .arg(out)
        .status()
        .expect("openssl is missing: run ./scripts/test.sh, or `apt-get install openssl`");
    assert!(status.success(), "openssl {args:?} failed");
}

fn openssl_public(private: &Path, public: &Path) {
    let status = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(private)
        .arg("-out")
        .arg(public)
        .status()
        .unwrap();
    assert!(status.success());
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, name: &str, ttl_s: u64) -> Claims {
    Claims {
        sub: sub.into(),
        name: Some(name.into()),
        exp: now_s() + ttl_s,
        nbf: None,
        rooms: None,
    }
}

/// base64url without padding (RFC 7515 2).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| (n << 8) | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Signs arbitrary claims (missing ones included) with HS256 and `secret`.
fn hs256(claims: &Value, secret: &[u8], kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn secret_bytes(keys: &Keys) -> Vec<u8> {
    std::fs::read(&keys.secret)
        .unwrap()
        .trim_ascii_end()
        .to_vec()
}

/// Connects, sends `auth` with `token` as its first frame, and reads the
/// welcome.
fn join(ws: SocketAddr, query: &str, token: &str) -> Client {
    let mut client = Client::connect_raw(ws, query);
    auth(&mut client, token);
    let welcome = client.recv();
    assert_eq!(welcome["type"], "welcome", "not welcomed: {welcome}");
    client.welcome = welcome;
    client
}

/// The next frame that is not `status`: a client that joins while its
/// instance is just linked to Redis may get an `up` it never needed
/// (docs/PROTOCOL.md: "apply them as states").
fn next_frame(client: &mut Client) -> Value {
    loop {
        let frame = client.recv();
        if frame["type"] != "status" {
            return frame;
        }
    }
}

fn auth(client: &mut Client, token: &str) {
    let frame = json!({"type": "auth", "token": token});
    client.send_raw(Message::text(frame.to_string()));
}

/// What a refused client gets: its `error` frame's code, then the Close
/// frame's code and reason.
fn refusal(client: &mut Client) -> (String, u16, String) {
    let mut code = String::new();
    loop {
        match client.socket.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["type"], "error", "expected a refusal, got {frame}");
                assert!(
                    !frame["message"].as_str().unwrap().contains("eyJ"),
                    "the refusal quotes the token: {frame}"
                );
                code = frame["code"].as_str().unwrap().to_string();
            }
            Ok(Message::Close(Some(close))) => {
                return (code, u16::from(close.code), close.reason.to_string());
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("expected an error and a Close, got {other:?}"),
        }
    }
}

fn refused_with(ws: SocketAddr, room: &str, token: &str) -> (String, u16, String) {
    let mut client = Client::connect_raw(ws, &format!("room={room}"));
    auth(&mut client, token);
    refusal(&mut client)
}

/// What every test here starts from: its keys, its Redis, its key prefix.
struct Setup {
    keys: Keys,
    redis: RedisServer,
    prefix: String,
}

impl Setup {
    fn new() -> Self {
        Setup {
            keys: Keys::new(),
            redis: RedisServer::start(),
            prefix: unique("auth"),
        }
    }
}

/// One instance with `--auth token` and the given keys, on `redis`.
fn instance(id: &str, redis: &RedisServer, prefix: &str, args: &[String]) -> Instance {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let instance = Instance::redis_with(id, &redis.url(), prefix, &args);
    instance.wait_ready();
    instance
}

/// Nothing of `room` reached Redis: no presence, no history, no
/// subscriber on its channel.
fn assert_room_untouched(redis: &RedisServer, prefix: &str, room: &str) {
    let mut conn = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*{room}*"))
        .query(&mut conn)
        .unwrap();
    assert!(keys.is_empty(), "a refused client left keys: {keys:?}");
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("*{room}*"))
        .query(&mut conn)
        .unwrap();
    assert!(
        channels.is_empty(),
        "a refused client subscribed: {channels:?}"
    );
}

#[test]
fn every_bad_token_is_refused_with_its_own_code_before_it_costs_anything() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let a = instance("a", &redis, &prefix, &keys.secret_args());
    // The classic confusion: a server that verifies RS256 with a public
    // key, and a token that says HS256, "signed" with that public key as
    // an HMAC secret.
    let rs_only: Vec<String> = vec![
        "--auth".into(),
        "token".into(),
        "--auth-public-key-file".into(),
        keys.rs_public.display().to_string(),
    ];
    let r = instance("r", &redis, &prefix, &rs_only);
    let room = "refusals";
    let secret = secret_bytes(&keys);
    let now = now_s();
    let good = json!({"sub": "u1", "name": "alice", "exp": now + 600});

    let other_secret = hs256(&good, &[7u8; 40], Some("hs1"));
    let rs_pem = std::fs::read(&keys.rs_public).unwrap();
    let confused = hs256(&good, &rs_pem, None);
    let confused_kid = hs256(&good, &rs_pem, Some("rs1"));
    let rs256 = mint(
        &claims("u1", "alice", 600),
        &SigningKey::PrivateKeyFile(keys.rs_private.clone()),
        true,
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(good.to_string().as_bytes())
    );
    let expired = hs256(
        &json!({"sub": "u1", "name": "alice", "exp": now - 10}),
        &secret,
        None,
    );
    let early = hs256(
        &json!({"sub": "u1", "name": "alice", "exp": now + 600, "nbf": now + 300}),
        &secret,
        None,
    );
    let no_sub = hs256(&json!({"name": "alice", "exp": now + 600}), &secret, None);
    let no_exp = hs256(&json!({"sub": "u1", "name": "alice"}), &secret, None);
    let no_name = hs256(&json!({"sub": "u1", "exp": now + 600}), &secret, None);
    let oversized = hs256(
        &json!({"sub": "u1", "name": "alice", "exp": now + 600, "pad": "x".repeat(5000)}),
        &secret,
        None,
    );
    let unknown_kid = hs256(&good, &secret, Some("retired-2025"));
    let malformed = "not.a.token".to_string();

    for (what, token) in [
        ("HS/RS confusion", &confused),
        ("with the RS key's kid", &confused_kid),
    ] {
        let (code, close, _) = refused_with(r.ws, room, token);
        assert_eq!((code.as_str(), close), ("token_algorithm", 4401), "{what}");
    }
    let cases = [
        ("bad signature", other_secret, "token_signature"),
        (
            "RS256 where only HS256 is verified",
            rs256,
            "token_algorithm",
        ),
        ("alg none", none, "token_algorithm"),
        ("expired", expired, "token_expired"),
        ("not yet valid", early, "token_not_yet_valid"),
        ("no sub", no_sub, "token_claims"),
        ("no exp", no_exp, "token_claims"),
        ("no name", no_name, "token_claims"),
        ("oversized", oversized, "token_too_large"),
        ("unknown kid", unknown_kid, "token_unknown_key"),
        ("malformed", malformed, "token_malformed"),
    ];
    for (what, token, expected) in &cases {
        let (code, close, reason) = refused_with(a.ws, room, token);
        assert_eq!(&code, expected, "{what}");
        assert_eq!(close, 4401, "{what}: closed with {close} {reason:?}");
    }
    // A frame other than `auth` first.
    let mut client = Client::connect_raw(a.ws, &format!("room={room}"));
    client.send("hello", "c1");
    let (code, close, _) = refusal(&mut client);
    assert_eq!((code.as_str(), close), ("auth_required", 4401));

    assert_room_untouched(&redis, &prefix, room);
    assert_eq!(
        a.metric("chat_auth_refused_total"),
        cases.len() as f64 + 1.0
    );
    assert_eq!(r.metric("chat_auth_refused_total"), 2.0);
    for instance in [&a, &r] {
        assert!(!instance.log().contains("eyJ"), "a token reached the log");
        wait_for("every refused session's thread to end", || {
            instance.metric("chat_session_threads") == 0.0
        });
    }
}

#[test]
fn a_client_that_sends_no_token_is_closed_at_the_handshake_deadline() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let mut args = keys.secret_args();
    args.extend(["--handshake-timeout-ms".into(), "1500".into()]);
    let a = instance("a", &redis, &prefix, &args);
    let started = Instant::now();
    let mut client = Client::connect_raw(a.ws, "room=silent");
    let (code, close, reason) = refusal(&mut client);
    let took = started.elapsed();
    assert_eq!((code.as_str(), close), ("auth_required", 4408), "{reason}");
    assert!(took < Duration::from_millis(3000), "closed after {took:?}");
    wait_for("the silent session's thread to end", || {
        a.metric("chat_session_threads") == 0.0
    });
    assert_room_untouched(&redis, &prefix, "silent");
}

#[test]
fn es256_and_rs256_tokens_verify_with_the_public_keys_alone() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let public = format!("{},{}", keys.es_public.display(), keys.rs_public.display());
    let args: Vec<String> = vec![
        "--auth".into(),
        "token".into(),
        "--auth-public-key-file".into(),
        public,
    ];
    let a = instance("a", &redis, &prefix, &args);
    for private in [&keys.es_private, &keys.rs_private] {
        let signing = SigningKey::PrivateKeyFile(private.clone());
        let token = mint(&claims("u9", "nine", 600), &signing, true).unwrap();
        let client = join(a.ws, "room=keys", &token);
        assert_eq!(client.welcome["user"], "u9");
    }
    // An HS256 token is refused where no secret is configured, whatever
    // it is signed with.
    let token = keys.token("u9", "nine", 600);
    let (code, _, _) = refused_with(a.ws, "keys", &token);
    assert_eq!(code, "token_algorithm");
}

#[test]
fn the_token_says_who_and_a_query_name_cannot_override_it() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let a = instance("a", &redis, &prefix, &keys.secret_args());
    let token = keys.token("u1", "alice", 600);
    // The message is sent right behind the auth frame: nothing the client
    // sends after its token is lost.
    let mut client = Client::connect_raw(a.ws, "room=who&name=mallory");
    auth(&mut client, &token);
    client.send("first words", "c1");
    let welcome = client.recv();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["name"], "alice");
    assert_eq!(welcome["user"], "u1");
    assert!(welcome["expires"].as_u64().unwrap() > now_s());
    let message = next_frame(&mut client);
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["text"], "first words");
    assert_eq!(message["from"], "alice");
    assert_eq!(message["user"], "u1");
}

#[test]
fn the_rooms_claim_is_enforced() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let a = instance("a", &redis, &prefix, &keys.secret_args());
    let token = keys.token_with(Claims {
        rooms: Some(vec!["team-1".into(), "team-2".into()]),
        ..claims("u1", "alice", 600)
    });
    join(a.ws, "room=team-2", &token);
    let (code, close, reason) = refused_with(a.ws, "elsewhere", &token);
    assert_eq!((code.as_str(), close), ("room_forbidden", 4403), "{reason}");
    assert_room_untouched(&redis, &prefix, "elsewhere");
}

#[test]
fn a_fresh_token_keeps_the_session_and_none_closes_it_at_exp() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let a = instance("a", &redis, &prefix, &keys.secret_args());

    let mut kept = join(a.ws, "room=refresh", &keys.token("u1", "alice", 3));
    let mut lapsed = join(a.ws, "room=refresh", &keys.token("u2", "bob", 3));
    // Another user's token is no refresh.
    auth(&mut kept, &keys.token("u2", "bob", 600));
    let refused = next_frame(&mut kept);
    assert_eq!(refused["code"], "token_claims", "{refused}");
    auth(&mut kept, &keys.token("u1", "alice", 600));
    let accepted = next_frame(&mut kept);
    assert_eq!(accepted["type"], "authenticated", "{accepted}");
    assert_eq!(accepted["user"], "u1");
    let expires = accepted["expires"].as_u64().unwrap();
    assert!(expires >= now_s() + 590);

    // bob's token lapses: closed with 4401 within a second or so of exp.
    let exp = lapsed.welcome["expires"].as_u64().unwrap();
    let closed = loop {
        match lapsed.socket.read() {
            Ok(Message::Close(Some(close))) => break close,
            Ok(_) => {}
            Err(e) => panic!("no Close frame for an expired token: {e}"),
        }
    };
    let at = now_s();
    assert_eq!(u16::from(closed.code), 4401);
    assert_eq!(closed.reason, "token expired");
    assert!(at >= exp && at <= exp + 2, "closed at {at}, exp {exp}");

    // alice, refreshed, is still served past her first token's exp.
    kept.send("still here", "c2");
    let message = next_frame(&mut kept);
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["text"], "still here");
    assert_eq!(a.metric("chat_tokens_expired_total"), 1.0);
}

/// One presence frame of `room` with `count` members, within [`TIMEOUT`].
fn members_when(client: &mut Client, count: u64) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    let mut members: Vec<Value> = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "never saw {count} members: {members:?}"
        );
        client.set_read_timeout(deadline.saturating_duration_since(Instant::now()));
        let Ok(Message::Text(text)) = client.socket.read() else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        match frame["type"].as_str() {
            Some("presence") => {
                members = frame["members"].as_array().unwrap().clone();
            }
            Some("presence_diff") => {
                for join in frame["joins"].as_array().into_iter().flatten() {
                    members.push(join.clone());
                }
                for changed in frame["changed"].as_array().into_iter().flatten() {
                    members.retain(|m| {
                        (&m["name"], &m["user"]) != (&changed["name"], &changed["user"])
                    });
                    members.push(changed.clone());
                }
                for leave in frame["leaves"].as_array().into_iter().flatten() {
                    members
                        .retain(|m| (&m["name"], &m["user"]) != (&leave["name"], &leave["user"]));
                }
            }
            _ => continue,
        }
        if members.len() as u64 == count {
            members.sort_by_key(|m| m["user"].as_str().unwrap().to_string());
            return members;
        }
    }
}

#[test]
fn presence_counts_users_by_sub_across_two_instances() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let args = keys.secret_args();
    let a = instance("a", &redis, &prefix, &args);
    let b = instance("b", &redis, &prefix, &args);

    // Two users named alice: two members, told apart by `user`.
    let mut first = join(a.ws, "room=twins", &keys.token("u1", "alice", 600));
    let _second = join(b.ws, "room=twins", &keys.token("u2", "alice", 600));
    let members = members_when(&mut first, 2);
    assert_eq!(members[0]["name"], "alice");
    assert_eq!(members[0]["user"], "u1");
    assert_eq!(members[1]["name"], "alice");
    assert_eq!(members[1]["user"], "u2");

    // One user, a tab on each instance: one member, two connections.
    let mut tab_a = join(a.ws, "room=tabs", &keys.token("u3", "carol", 600));
    let _tab_b = join(b.ws, "room=tabs", &keys.token("u3", "carol", 600));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let members = members_when(&mut tab_a, 1);
        if members[0]["connections"] == 2 {
            assert_eq!(members[0]["user"], "u3");
            assert_eq!(members[0]["instances"], json!(["a", "b"]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol's two tabs never showed: {members:?}"
        );
    }
}

#[test]
fn with_auth_off_an_auth_frame_is_refused_and_the_session_goes_on() {
    let redis = RedisServer::start();
    let prefix = unique("auth");
    let a = instance("a", &redis, &prefix, &[]);
    let mut client = Client::connect(a.ws, "room=open&name=dora");
    assert_eq!(client.welcome["name"], "dora");
    assert!(client.welcome.get("user").is_none(), "{}", client.welcome);
    auth(&mut client, "eyJhbGciOiJIUzI1NiJ9.e30.x");
    let refused = next_frame(&mut client);
    assert_eq!(refused["code"], "bad_request", "{refused}");
    client.send("still open", "c1");
    let message = next_frame(&mut client);
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["from"], "dora");
    assert!(message.get("user").is_none(), "{message}");
}

#[test]
fn the_server_will_not_start_with_a_weak_secret_or_keys_and_auth_off() {
    let keys = Keys::new();
    let weak = keys.dir.join("weak.key");
    std::fs::write(&weak, "short").unwrap();
    let bin = env!("CARGO_BIN_EXE_pubsub-chat");
    let run = |args: &[&str]| {
        let output = Command::new(bin)
            .args(["--broker", "local", "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let weak = weak.display().to_string();
    assert!(run(&["--auth", "token", "--auth-hs256-secret-file", &weak]).contains("at least 32"));
    assert!(run(&["--auth", "token"]).contains("needs a key"));
    let secret = keys.secret.display().to_string();
    assert!(run(&["--auth-hs256-secret-file", &secret]).contains("--auth token"));
}

#[test]
fn the_token_command_mints_what_the_server_accepts() {
    let Setup {
        keys,
        redis,
        prefix,
    } = Setup::new();
    let a = instance("a", &redis, &prefix, &keys.secret_args());
    let output = Command::new(env!("CARGO_BIN_EXE_pubsub-chat"))
        .args([
            "token", "--sub", "u7", "--name", "grace", "--ttl", "10m", "--rooms", "cli",
        ])
        .arg("--auth-hs256-secret-file")
        .arg(&keys.secret)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let client = join(a.ws, "room=cli", token.trim());
    assert_eq!(client.welcome["name"], "grace");
    let expires = client.welcome["expires"].as_u64().unwrap();
    assert!((now_s() + 590..=now_s() + 600).contains(&expires));
    let (code, _, _) = refused_with(a.ws, "not-cli", token.trim());
    assert_eq!(code, "room_forbidden");
}
