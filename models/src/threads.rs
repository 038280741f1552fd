//! How a Hearth process sets up the CPU thread pools it computes on.

/// The barrier-pool spin candle's element-wise operations use in a Hearth
/// process (candle's own default is 25 000). After each parallel
/// element-wise op candle's pool worker spins this many rounds before it
/// parks; on a machine with few cores that spinning takes a core from the
/// matrix products running next (a fifth of a training step's samples on
/// 2 cores), while parking and waking costs microseconds.
pub const BARRIER_POOL_SPIN: u32 = 1000;

/// Sets, where the environment does not already, `RAYON_NUM_THREADS` to
/// the cores this process may use (candle otherwise re-reads
/// `/proc/cpuinfo` for every matrix product) and
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`BARRIER_POOL_SPIN`].
///
/// # Safety
/// Call it first in `main`, before any other thread exists (it writes the
/// process environment).
pub unsafe fn configure_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe {
            std::env::set_var(
                "CANDLE_BARRIER_POOL_SPIN_LIMIT",
                BARRIER_POOL_SPIN.to_string(),
            )
        };
    }
}
