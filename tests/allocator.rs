//! The instance runs without glibc's per-thread malloc cache (see
//! `src/allocator.rs`): it restarts itself once with `GLIBC_TUNABLES`
//! set, keeping its pid and arguments. (How it composes an operator's own
//! `GLIBC_TUNABLES` is a unit test in `src/allocator.rs`: glibc 2.36 cuts
//! the variable as `/proc/<pid>/environ` shows it after its first tunable,
//! so from outside only a lone tunable can be read back.)

mod common;

use common::Instance;

/// The running instance's `GLIBC_TUNABLES`, as the kernel has it.
fn tunables_of(instance: &Instance) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{}/environ", instance.pid())).expect("environ");
    environ
        .split(|&b| b == 0)
        .filter_map(|var| std::str::from_utf8(var).ok())
        .find_map(|var| var.strip_prefix("GLIBC_TUNABLES=").map(str::to_string))
}

#[test]
fn an_instance_runs_without_per_thread_malloc_caches_under_its_own_pid() {
    let instance = Instance::local("a");
    assert_eq!(
        tunables_of(&instance).as_deref(),
        Some(pubsub_chat::allocator::TCACHE_OFF),
        "{}",
        instance.log()
    );
    // Same pid as spawned, and serving: the restart kept the process.
    let (status, body) = instance.get("/healthz");
    assert_eq!(status, 200, "{body}");
}
