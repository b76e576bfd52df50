//! The allocator of dongbo's binaries (feature `allocator`): mimalloc, tuned to keep resident
//! memory near what is in use.
//!
//! Why not glibc's malloc: rows are allocated by one task (a source's reader, the hub's decoder)
//! and freed by another on another thread (the spool writer, the apply). Under that pattern
//! glibc's per-thread arenas fragment and grow (the agent passed 60 MiB under a MariaDB backlog,
//! its budget is 50) and its threads serialise on arena locks (capture ran at half the speed).
//!
//! mimalloc's defaults commit whole arenas eagerly and keep freed pages for 10 ms, which doubled
//! the agent's peak RSS under a backlog. The agent turns both off before its first allocation
//! ([`tune_small_footprint`], from its own `.init_array`); the hub keeps the defaults, because
//! giving every freed page back at once cost it a page fault per reuse (a tenth of its CPU in
//! an initial snapshot) and its memory is not the budget.

/// The process's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in the `mi_option_e` of the pinned
/// libmimalloc-sys 0.1.49 (`c_src/mimalloc/v3/include/mimalloc.h`).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Commit arenas as their pages are needed, give freed pages back at once. For a binary's
/// `.init_array`, which runs before the Rust runtime's first allocation creates an arena, so the
/// options hold from the start (set from `main`, the first arena was already committed whole).
pub extern "C" fn tune_small_footprint() {
    // SAFETY: runs single-threaded before main; mimalloc's option setters take plain integers.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

/// Says so in the log if the options did not take (the linker dropped the `.init_array` entry):
/// the process then runs with mimalloc's defaults, a larger footprint. Also keeps this module's
/// object in every binary that calls it.
pub fn warn_if_untuned() {
    if !tuned() {
        tracing::warn!("mimalloc's options were not set before its first allocation: memory use will be higher");
    }
}

/// Whether the options took.
pub fn tuned() -> bool {
    // SAFETY: reads two options; no other effect.
    unsafe {
        libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) == 0
            && libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 0
    }
}
