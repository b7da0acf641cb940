//! How many threads a worker's (and a pipeline stage's) matrix products use: as many as
//! the pod has CPUs, read from its cgroup quota by `std::thread::available_parallelism`,
//! unless `--compute-threads` / `KUBETRAIN_COMPUTE_THREADS` says otherwise.
//!
//! The products are ndarray's, computed by matrixmultiply with its `threading` feature
//! (chosen by measurement: docs/trainer-benchmarks.md §8). matrixmultiply takes its thread
//! count from `MATMUL_NUM_THREADS`, read once, and without it counts the machine's physical
//! cores, which in a pod with a CPU limit would be far too many. Setting an environment
//! variable inside a running process needs `unsafe`, so the trainer re-executes itself
//! once with the variable set: the same PID, arguments and open files.

use std::num::NonZeroUsize;

/// The variable matrixmultiply reads.
const GEMM_THREADS: &str = "MATMUL_NUM_THREADS";

/// `requested` (the flag or env), else the CPUs this process may use.
pub fn wanted(requested: Option<NonZeroUsize>) -> NonZeroUsize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
}

/// Whether the GEMM library already runs with `threads`, given its variable's value.
fn in_effect(current: Option<&str>, threads: NonZeroUsize) -> bool {
    current.and_then(|v| v.trim().parse::<usize>().ok()) == Some(threads.get())
}

/// Makes the matrix products use `threads`: returns at once if they already do, and
/// otherwise replaces this process with itself, `MATMUL_NUM_THREADS` set. Returns only if
/// that fails, with the error; the products then use matrixmultiply's own count.
pub fn ensure(threads: NonZeroUsize) -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    if in_effect(std::env::var(GEMM_THREADS).ok().as_deref(), threads) {
        return None;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => return Some(error),
    };
    Some(
        std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(GEMM_THREADS, threads.get().to_string())
            .exec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_and_the_default_is_the_cpus_this_process_may_use() {
        let three = NonZeroUsize::new(3).unwrap();
        assert_eq!(wanted(Some(three)), three);
        assert_eq!(wanted(None), std::thread::available_parallelism().unwrap());
    }

    #[test]
    fn only_the_same_count_counts_as_in_effect() {
        let two = NonZeroUsize::new(2).unwrap();
        assert!(in_effect(Some("2"), two));
        assert!(in_effect(Some(" 2\n"), two));
        assert!(!in_effect(Some("4"), two));
        assert!(!in_effect(Some("two"), two));
        assert!(!in_effect(None, two));
    }
}
