//! Fault injection for the tests, compiled into debug builds only.
//!
//! Some defences can only be shown by making an internal thread fail: that
//! a session's panic leaks nothing, that a dead fan-out makes the instance
//! unready and exit. With `CHAT_FAULTS=reader,fan-out,subscriber` (any of
//! them), the named thread panics when it handles a message whose text is
//! exactly [`TRIGGER`]. Release builds contain none of this: [`inject`] is
//! empty there, and the variable is ignored.

/// The message text that sets off an armed fault (read by nothing in a
/// release build).
#[cfg_attr(not(debug_assertions), allow(dead_code))]
pub const TRIGGER: &str = "panic!";

/// Panics if `point` is armed and `text` is the trigger (debug builds).
#[inline]
pub fn inject(point: &str, text: &str) {
    #[cfg(debug_assertions)]
    if text == TRIGGER && armed(point) {
        panic!("fault injected at {point} (CHAT_FAULTS)");
    }
    #[cfg(not(debug_assertions))]
    let _ = (point, text);
}

#[cfg(debug_assertions)]
fn armed(point: &str) -> bool {
    static ARMED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("CHAT_FAULTS")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|armed| armed == point)
}
