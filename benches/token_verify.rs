//! What checking a token costs the server: the time of one
//! `auth::Verifier::verify` (size, header, key, signature, claims) with an
//! HS256 secret and with an ES256 public key, on this machine.
//!
//! ```sh
//! cargo bench --bench token_verify [-- --rounds N --per-round M]
//! ```
//!
//! It makes its keys in a temporary directory (the ES256 pair with
//! `openssl`), mints one token per key, and verifies each `M` times per
//! round (default 2,000), `N` rounds (default 7), alternating the keys;
//! it prints each round's mean and the median of the rounds. A verify is
//! paid once per connection and once per refreshed token, never per
//! message: set these figures beside a handshake's (`cargo bench --bench
//! load -- connect`).
//!
//! `cargo bench` passes `--bench`; without it (`cargo test --benches`) the
//! binary checks one token of each kind and stops.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pubsub_chat::auth::{Claims, KeySources, SigningKey, Verifier, mint};
use pubsub_chat::protocol::Limits;

fn openssl(args: &[&str]) -> Result<(), String> {
    let status = Command::new("openssl")
        .args(args)
        .status()
        .map_err(|e| format!("openssl: {e} (apt-get install openssl)"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("openssl {args:?} failed"))
}

/// A verifier and a valid token for it.
struct Case {
    name: &'static str,
    verifier: Verifier,
    token: String,
}

fn cases(dir: &Path) -> Result<Vec<Case>, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = Claims {
        sub: "u1".into(),
        name: Some("alice".into()),
        exp: now + 3600,
        nbf: None,
        rooms: None,
    };
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let secret = dir.join("hs1.key");
    std::fs::write(&secret, "k".repeat(64)).map_err(|e| e.to_string())?;
    let hs = KeySources {
        secret_file: Some(secret),
        ..KeySources::default()
    };
    std::fs::create_dir_all(dir.join("private")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("public")).map_err(|e| e.to_string())?;
    let private = dir.join("private/es1.pem");
    let public = dir.join("public/es1.pem");
    let (private_s, public_s) = (private.display().to_string(), public.display().to_string());
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &private_s,
    ])?;
    openssl(&["pkey", "-pubout", "-in", &private_s, "-out", &public_s])?;
    let es = KeySources {
        public_key_files: vec![public],
        ..KeySources::default()
    };
    Ok(vec![
        Case {
            name: "HS256",
            token: mint(&claims, &SigningKey::Secret(hs.clone()), true)?,
            verifier: Verifier::load(&hs, 4096, Limits::default())?,
        },
        Case {
            name: "ES256",
            token: mint(&claims, &SigningKey::PrivateKeyFile(private), true)?,
            verifier: Verifier::load(&es, 4096, Limits::default())?,
        },
    ])
}

fn arg(args: &[String], flag: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == flag)
        .and_then(|at| args.get(at + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let rounds = if benching {
        arg(&args, "--rounds", 7)
    } else {
        1
    };
    let per_round = if benching {
        arg(&args, "--per-round", 2000)
    } else {
        1
    };
    let dir = std::env::temp_dir().join(format!("pubsub-chat-token-verify-{}", std::process::id()));
    let result = cases(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let cases = match result {
        Ok(cases) => cases,
        Err(e) => {
            eprintln!("token_verify: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut means: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (case, means) in cases.iter().zip(&mut means) {
            let started = Instant::now();
            for _ in 0..per_round {
                if let Err(refusal) = case.verifier.verify(&case.token, now) {
                    eprintln!(
                        "token_verify: {} refused its own token: {refusal}",
                        case.name
                    );
                    return ExitCode::FAILURE;
                }
            }
            let mean = started.elapsed() / per_round as u32;
            means.push(mean);
            if benching {
                println!(
                    "round {} {}: {:.1} µs a verify",
                    round + 1,
                    case.name,
                    mean.as_secs_f64() * 1e6
                );
            }
        }
    }
    if benching {
        println!("\nmedian of {rounds} rounds of {per_round} verifies:");
        for (case, means) in cases.iter().zip(means) {
            println!(
                "  {}: {:.1} µs a verify",
                case.name,
                median(means).as_secs_f64() * 1e6
            );
        }
    } else {
        println!(
            "token_verify: HS256 and ES256 tokens verify; run `cargo bench --bench token_verify` for figures"
        );
    }
    ExitCode::SUCCESS
}
