//! The allocator's settings for thousands of threads that each allocate a
//! little, rarely (glibc only; elsewhere nothing is changed).
//!
//! - **Two arenas.** glibc gives threads up to eight malloc arenas per
//!   core, each keeping its own free memory; two hold it with less left
//!   idle in each.
//! - **No per-thread cache.** glibc keeps, in every thread, up to seven
//!   freed blocks of each small size for that thread's next allocations
//!   (the tcache). A reader thread allocates most at its start (handshake,
//!   first frames, member list) and then waits in `read()` for hours, so
//!   what it cached is never used again nor given back: measured with the
//!   `idle` benchmark, 5,000 clients in one room, about 5 KiB per client
//!   (20.6 KiB RSS per client with the cache, 15.8 without; throughput in
//!   `burst` did not move). The cache can only be sized by the
//!   `GLIBC_TUNABLES` environment variable, read when the process starts,
//!   so the instance starts itself again with it (same pid, same
//!   arguments) unless it is already set: an operator's own
//!   `glibc.malloc.tcache_count` wins.

/// The tunable that turns the per-thread cache off.
pub const TCACHE_OFF: &str = "glibc.malloc.tcache_count=0";

/// The arenas every thread shares.
const MALLOC_ARENAS: i32 = 2;

/// `GLIBC_TUNABLES` with the per-thread cache off, or `None` when it
/// already says how large the cache is.
pub fn tunables_with_tcache_off(current: Option<&str>) -> Option<String> {
    match current {
        Some(tunables) if tunables.contains("glibc.malloc.tcache_count") => None,
        Some(tunables) if !tunables.is_empty() => Some(format!("{tunables}:{TCACHE_OFF}")),
        _ => Some(TCACHE_OFF.to_string()),
    }
}

/// Sets the allocator up; called first thing in `main`, before any other
/// thread exists. Returns why the per-thread cache is still on, if it is
/// (to be logged once logging is up).
pub fn configure() -> Option<String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator settings; no other thread
        // exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
        let current = std::env::var("GLIBC_TUNABLES").ok();
        let tunables = tunables_with_tcache_off(current.as_deref())?;
        Some(restart_with(&tunables))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Replaces this process with itself, `GLIBC_TUNABLES` set; returns only
/// if that failed, with the reason.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn restart_with(tunables: &str) -> String {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    // /proc/self/exe: this very binary, even if its file was replaced or
    // removed since it started.
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    format!(
        "per-thread malloc caches stay on (could not restart with GLIBC_TUNABLES={tunables}: {error}); idle clients cost a few KiB more each"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_turned_off_unless_the_operator_sized_it() {
        assert_eq!(tunables_with_tcache_off(None).as_deref(), Some(TCACHE_OFF));
        assert_eq!(
            tunables_with_tcache_off(Some("")).as_deref(),
            Some(TCACHE_OFF)
        );
        assert_eq!(
            tunables_with_tcache_off(Some("glibc.malloc.arena_max=4")).as_deref(),
            Some("glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0")
        );
        assert_eq!(
            tunables_with_tcache_off(Some("glibc.malloc.tcache_count=3")),
            None
        );
    }
}
