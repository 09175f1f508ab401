//! Who a client is, when the server checks (`--auth token`): a short-lived
//! token (a JWT) that the application's backend signed, verified here with
//! the verification key alone. The chat server never sees a password and
//! never issues a token (but for [`mint`], the development helper).
//!
//! What is checked, after RFC 8725 (JWT best practices), and in this order,
//! so that each refusal costs as little as it can:
//!
//! 1. the token's size, against `--auth-max-token-bytes`, before anything
//!    is decoded;
//! 2. its algorithm: exactly those of the configured keys (HS256 for a
//!    secret, RS256 or ES256 for a public key), never `none`; a token
//!    signed with HS256 is not checked against a public key, so the
//!    "public key used as an HMAC secret" confusion cannot arise;
//! 3. its key: the `kid` header names a configured key (a key is named by
//!    its file's stem), or, without `kid`, exactly one key has the token's
//!    algorithm;
//! 4. its signature, then `exp` (required), `nbf` (if present), and the
//!    claims `sub`, `name` and (optional) `rooms`.
//!
//! Rejected: accepting the token in the WebSocket URL (proxies and access
//! logs keep URLs; it comes in the first frame instead), and a leeway on
//! `exp` (a token is refused, and a connection closed, at its `exp`).

use std::fmt;
use std::path::{Path, PathBuf};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::{
    ErrorCode, Limits, normalize_name, validate_name, validate_room, validate_user,
};

/// The environment variable that may hold the HS256 secret itself (an
/// option would show it in `ps`).
pub const SECRET_ENV: &str = "AUTH_HS256_SECRET";
/// The shortest HS256 secret accepted: 256 bits, as RFC 7518 3.2 requires.
const MIN_SECRET_BYTES: usize = 32;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`: the user id. Presence counts members by it.
    pub user: String,
    /// `name`: the display name, normalized like a typed one.
    pub name: String,
    /// `exp`, in seconds since the Unix epoch.
    pub expires: u64,
    /// `rooms`: the rooms the token may join; `None`: any room.
    pub rooms: Option<Vec<String>>,
}

impl Identity {
    /// Whether the token lets its holder into `room`.
    pub fn allows(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room))
    }
}

/// The claims a token carries, as signed. `Serialize` for [`mint`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// Why a token was refused: each kind its own `error` code
/// (`docs/PROTOCOL.md`, "Authentication"). The message never quotes the
/// token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TooLarge { bytes: usize, max: usize },
    Malformed(String),
    Algorithm(String),
    UnknownKey(String),
    Signature,
    Expired,
    NotYetValid,
    Claims(String),
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::TooLarge { .. } => ErrorCode::TokenTooLarge,
            Refusal::Malformed(_) => ErrorCode::TokenMalformed,
            Refusal::Algorithm(_) => ErrorCode::TokenAlgorithm,
            Refusal::UnknownKey(_) => ErrorCode::TokenUnknownKey,
            Refusal::Signature => ErrorCode::TokenSignature,
            Refusal::Expired => ErrorCode::TokenExpired,
            Refusal::NotYetValid => ErrorCode::TokenNotYetValid,
            Refusal::Claims(_) => ErrorCode::TokenClaims,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooLarge { bytes, max } => write!(
                f,
                "the token is {bytes} bytes; the limit is {max} (--auth-max-token-bytes)"
            ),
            Refusal::Malformed(why) => write!(f, "the token is not a JWT: {why}"),
            Refusal::Algorithm(why) | Refusal::UnknownKey(why) | Refusal::Claims(why) => {
                f.write_str(why)
            }
            Refusal::Signature => f.write_str("the token's signature does not verify"),
            Refusal::Expired => f.write_str("the token has expired (exp)"),
            Refusal::NotYetValid => f.write_str("the token is not valid yet (nbf)"),
        }
    }
}

/// One verification key, by name.
struct NamedKey {
    /// The `kid` that selects it: its file's stem.
    kid: String,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Checks tokens against the configured keys. Cheap to share: it holds
/// the parsed keys, nothing mutable.
pub struct Verifier {
    keys: Vec<NamedKey>,
    max_token_bytes: usize,
    limits: Limits,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier({})", self.describe())
    }
}

/// Where the verification keys come from (see `config.rs`).
#[derive(Debug, Clone, Default)]
pub struct KeySources {
    /// `--auth-hs256-secret-file`.
    pub secret_file: Option<PathBuf>,
    /// [`SECRET_ENV`], if set.
    pub secret: Option<String>,
    /// `--auth-public-key-file`, each an RS256 or ES256 public key (PEM).
    pub public_key_files: Vec<PathBuf>,
}

impl Verifier {
    /// Reads the keys; an error names the file and what is wrong with it.
    pub fn load(
        sources: &KeySources,
        max_token_bytes: usize,
        limits: Limits,
    ) -> Result<Self, String> {
        let mut keys = Vec::new();
        if let Some(secret) = read_secret(sources)? {
            keys.push(NamedKey {
                kid: secret.kid,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(&secret.bytes),
            });
        }
        for path in &sources.public_key_files {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--auth-public-key-file {}: {e}", path.display()))?;
            let (algorithm, key) =
                from_pem(&pem, DecodingKey::from_ec_pem, DecodingKey::from_rsa_pem).ok_or_else(
                    || {
                        format!(
                            "--auth-public-key-file {}: not an EC (P-256) or RSA public key in PEM",
                            path.display()
                        )
                    },
                )?;
            keys.push(NamedKey {
                kid: key_id(path),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err(format!(
                "--auth token needs a key: --auth-hs256-secret-file, {SECRET_ENV} or \
                 --auth-public-key-file"
            ));
        }
        Ok(Verifier {
            keys,
            max_token_bytes,
            limits,
        })
    }

    /// The algorithms this server accepts, for its log line.
    pub fn describe(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{:?} (kid {:?})", k.algorithm, k.kid))
            .collect();
        keys.join(", ")
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Identity, Refusal> {
        if token.len() > self.max_token_bytes {
            return Err(Refusal::TooLarge {
                bytes: token.len(),
                max: self.max_token_bytes,
            });
        }
        let header = jsonwebtoken::decode_header(token).map_err(header_refusal)?;
        let key = self.key_for(&header)?;
        // jsonwebtoken checks the signature and that `exp` and `sub` are
        // there; the times are checked here, against `now`, with no
        // leeway: the pinger closes a connection at `exp`, so a token is
        // refused from then on too.
        let mut validation = Validation::new(key.algorithm);
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| claims_refusal(e.into_kind()))?
            .claims;
        if claims.exp <= now {
            return Err(Refusal::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now) {
            return Err(Refusal::NotYetValid);
        }
        self.identity(claims)
    }

    fn key_for(&self, header: &Header) -> Result<&NamedKey, Refusal> {
        let algorithm = header.alg;
        let fitting = || self.keys.iter().filter(move |k| k.algorithm == algorithm);
        if fitting().next().is_none() {
            let accepted: Vec<String> = self
                .keys
                .iter()
                .map(|k| format!("{:?}", k.algorithm))
                .collect();
            return Err(Refusal::Algorithm(format!(
                "tokens signed with {algorithm:?} are not accepted here; this server verifies {}",
                accepted.join(", ")
            )));
        }
        match &header.kid {
            Some(kid) => fitting().find(|k| &k.kid == kid).ok_or_else(|| {
                Refusal::UnknownKey(format!(
                    "the token names key {:?}, which this server does not have for {algorithm:?}",
                    kid.chars().take(64).collect::<String>()
                ))
            }),
            None => {
                let mut keys = fitting();
                match (keys.next(), keys.next()) {
                    (Some(key), None) => Ok(key),
                    _ => Err(Refusal::UnknownKey(format!(
                        "the token names no key (kid), and several {algorithm:?} keys could verify it"
                    ))),
                }
            }
        }
    }

    fn identity(&self, claims: Claims) -> Result<Identity, Refusal> {
        validate_user(&claims.sub).map_err(|e| Refusal::Claims(format!("sub: {e}")))?;
        let name = claims
            .name
            .as_deref()
            .map(normalize_name)
            .ok_or_else(|| Refusal::Claims("the token has no \"name\" claim".into()))?;
        validate_name(&name, &self.limits).map_err(|e| Refusal::Claims(format!("name: {e}")))?;
        if let Some(rooms) = &claims.rooms {
            for room in rooms {
                validate_room(room, &self.limits)
                    .map_err(|e| Refusal::Claims(format!("rooms: {e}")))?;
            }
        }
        Ok(Identity {
            user: claims.sub,
            name,
            expires: claims.exp,
            rooms: claims.rooms,
        })
    }
}

/// Why a header was refused. jsonwebtoken reads `alg` into its enum of
/// known algorithms, so `none` (and any unknown one) fails there, as a
/// JSON error that names the variant.
fn header_refusal(error: jsonwebtoken::errors::Error) -> Refusal {
    match error.into_kind() {
        ErrorKind::Json(e) if e.to_string().contains("unknown variant") => Refusal::Algorithm(
            format!("the token's algorithm is not one this server accepts ({e}); never \"none\""),
        ),
        ErrorKind::Json(e) => Refusal::Malformed(format!("its header: {e}")),
        kind => Refusal::Malformed(format!("{kind:?}")),
    }
}

fn claims_refusal(kind: ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::Crypto(_) => Refusal::Signature,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            Refusal::Algorithm("the token's algorithm does not match its key".into())
        }
        // RFC 7519 4.1.3: a token meant for an audience this server does
        // not identify itself with must be refused.
        ErrorKind::InvalidAudience => Refusal::Claims(
            "the token names an audience (aud) this server is not; leave aud out of chat tokens"
                .into(),
        ),
        ErrorKind::MissingRequiredClaim(claim) => {
            Refusal::Claims(format!("the token has no {claim:?} claim"))
        }
        ErrorKind::Json(e) => Refusal::Claims(format!("its claims: {e}")),
        kind => Refusal::Malformed(format!("{kind:?}")),
    }
}

/// A PEM key and its algorithm: an EC key is ES256, an RSA key RS256.
fn from_pem<K>(
    pem: &[u8],
    ec: impl Fn(&[u8]) -> jsonwebtoken::errors::Result<K>,
    rsa: impl Fn(&[u8]) -> jsonwebtoken::errors::Result<K>,
) -> Option<(Algorithm, K)> {
    ec(pem)
        .map(|key| (Algorithm::ES256, key))
        .or_else(|_| rsa(pem).map(|key| (Algorithm::RS256, key)))
        .ok()
}

/// A key's name: its file's stem (`keys/2026-12.pem` is `2026-12`).
fn key_id(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Secret {
    kid: String,
    bytes: Vec<u8>,
}

/// The HS256 secret, from its file (trailing whitespace dropped: editors
/// add a newline) or the environment; at least [`MIN_SECRET_BYTES`].
fn read_secret(sources: &KeySources) -> Result<Option<Secret>, String> {
    let (kid, bytes, from) = match (&sources.secret_file, &sources.secret) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "--auth-hs256-secret-file and {SECRET_ENV} both give a secret; keep one"
            ));
        }
        (Some(path), None) => {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("--auth-hs256-secret-file {}: {e}", path.display()))?;
            let from = format!("--auth-hs256-secret-file {}", path.display());
            (key_id(path), bytes, from)
        }
        (None, Some(secret)) => (
            "env".to_string(),
            secret.as_bytes().to_vec(),
            SECRET_ENV.to_string(),
        ),
        (None, None) => return Ok(None),
    };
    let trimmed = bytes.trim_ascii_end().to_vec();
    if trimmed.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{from}: the secret is {} bytes; HS256 needs at least {MIN_SECRET_BYTES} \
             (try `openssl rand -hex 32`)",
            trimmed.len()
        ));
    }
    Ok(Some(Secret {
        kid,
        bytes: trimmed,
    }))
}

/// What [`mint`] signs with.
pub enum SigningKey {
    /// The HS256 secret, as the server reads it.
    Secret(KeySources),
    /// An RS256 or ES256 private key (PEM), named by its file's stem.
    PrivateKeyFile(PathBuf),
}

/// Makes a token, for development and tests (`pubsub-chat token`): an
/// application's backend does this with its own JWT library
/// (docs/OPERATIONS.md).
pub fn mint(claims: &Claims, signing: &SigningKey, with_kid: bool) -> Result<String, String> {
    let (mut header, key) = match signing {
        SigningKey::Secret(sources) => {
            let secret = read_secret(sources)?.ok_or_else(|| {
                format!("no secret: give --auth-hs256-secret-file or {SECRET_ENV}")
            })?;
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(secret.kid);
            (header, EncodingKey::from_secret(&secret.bytes))
        }
        SigningKey::PrivateKeyFile(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let (algorithm, key) =
                from_pem(&pem, EncodingKey::from_ec_pem, EncodingKey::from_rsa_pem).ok_or_else(
                    || {
                        format!(
                            "{}: not an EC (P-256, PKCS#8) or RSA private key in PEM",
                            path.display()
                        )
                    },
                )?;
            let mut header = Header::new(algorithm);
            header.kid = Some(key_id(path));
            (header, key)
        }
    };
    if !with_kid {
        header.kid = None;
    }
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| format!("cannot sign: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, secret).unwrap();
        path
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            name: Some("alice".into()),
            exp,
            nbf: None,
            rooms: None,
        }
    }

    #[test]
    fn a_secret_shorter_than_256_bits_is_refused_at_start() {
        let dir = std::env::temp_dir().join(format!("auth-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = secret_file(&dir, "short.key", "too-short\n");
        let sources = KeySources {
            secret_file: Some(short),
            ..KeySources::default()
        };
        let error = Verifier::load(&sources, 4096, Limits::default())
            .err()
            .unwrap();
        assert!(error.contains("at least 32"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_minted_token_verifies_and_says_who() {
        let sources = KeySources {
            secret: Some("k".repeat(40)),
            ..KeySources::default()
        };
        let verifier = Verifier::load(&sources, 4096, Limits::default()).unwrap();
        let token = mint(&claims(2_000), &SigningKey::Secret(sources), false).unwrap();
        let identity = verifier.verify(&token, 1_000).unwrap();
        assert_eq!(identity.user, "u1");
        assert_eq!(identity.name, "alice");
        assert!(identity.allows("anywhere"));
        assert_eq!(verifier.verify(&token, 2_000), Err(Refusal::Expired));
    }

    #[test]
    fn a_token_for_an_audience_is_refused_with_a_reason() {
        let secret = "k".repeat(40);
        let sources = KeySources {
            secret: Some(secret.clone()),
            ..KeySources::default()
        };
        let verifier = Verifier::load(&sources, 4096, Limits::default()).unwrap();
        let claims = serde_json::json!({"sub": "u1", "name": "al", "exp": 2_000, "aud": "billing"});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        match verifier.verify(&token, 1_000) {
            Err(Refusal::Claims(why)) => assert!(why.contains("aud"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
