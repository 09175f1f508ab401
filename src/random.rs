//! Random identifiers: a guest's name tag, the fault panel's token.
//!
//! From the standard library's randomly keyed hasher (its keys come from
//! the operating system's random source once per process): enough to tell
//! runs apart and to make a per-run token unguessable to a web page, with
//! no dependency for it. Not for long-lived secrets.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// 64 random bits.
pub fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(crate::clock::wall_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// `chars` random characters of `0-9a-z`.
pub fn random_base36(chars: usize) -> String {
    let mut bits = random_u64();
    let mut left = 12; // digits of 36 a u64 still holds
    (0..chars)
        .map(|_| {
            if left == 0 {
                bits = random_u64();
                left = 12;
            }
            let digit = (bits % 36) as u32;
            bits /= 36;
            left -= 1;
            char::from_digit(digit, 36).expect("a digit below 36")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_differ_and_have_the_length_asked() {
        let (a, b) = (random_base36(32), random_base36(32));
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
        assert_ne!(a, b);
    }
}
