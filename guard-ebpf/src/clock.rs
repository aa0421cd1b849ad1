//! The clock the SYN path charges buckets with: CLOCK_MONOTONIC at tick
//! resolution (the kernel's coarse clock), read through the helper once per
//! tick per CPU.
//!
//! The coarse clock only moves when the tick advances jiffies, and
//! `bpf_jiffies64` is inlined by the verifier into one load, while every
//! helper call pays a full call and return (on hosts with return-thunk
//! mitigations, a large share of the SYN path). So each CPU keeps the last
//! coarse reading with the jiffies it was taken at and calls the helper again
//! only when jiffies moved. A reading is at most one tick stale, never goes
//! backwards, and is the coarse clock's own value (the same epoch as
//! `bpf_ktime_get_ns`, which the agent and sockops use).

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TickClock {
    jiffies: u64,
    ns: u64,
}

#[map(name = "CLOCK")]
static CLOCK: PerCpuArray<TickClock> = PerCpuArray::with_max_entries(1, 0);

/// Coarse monotonic time in ns.
#[inline(always)]
pub fn coarse_now_ns() -> u64 {
    // SAFETY: helper with no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    match CLOCK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on it while we do.
        Some(cached) => unsafe {
            if (*cached).jiffies != jiffies {
                (*cached).jiffies = jiffies;
                (*cached).ns = bpf_ktime_get_coarse_ns();
            }
            (*cached).ns
        },
        // SAFETY: helper with no preconditions.
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}
