//! Addresses for running several trainer processes (or other servers) on one machine,
//! each on a loopback address of its own: tests, benchmarks, and the pod simulator.
//!
//! Each call hands out a fresh `127.A.B.C`, so a server can bind a fixed, well-known port
//! on it with no port to pick. Picking a "free" port instead (bind port 0, read it, close,
//! let the child bind it) races: between the close and the child's bind, the kernel may
//! give that port, an ephemeral one, to any outgoing connection on the machine.

use std::net::Ipv4Addr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Process-wide, so every caller in a process (tests run many) gets another address.
static NEXT: AtomicU32 = AtomicU32::new(0);
/// The second octet from the PID: processes running side by side use distinct /16s.
static PROCESS_SLOT: LazyLock<u32> = LazyLock::new(|| std::process::id() % 254);

/// A loopback address no other caller in this process has been given.
pub fn next_ip() -> Ipv4Addr {
    ip_for(*PROCESS_SLOT, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The `n`th address of process slot `slot`: `127.(1 + slot).x.y`, the last octet in
/// 2..=251 (clear of .0, .1 and .255), 250 × 256 addresses per process before it wraps.
fn ip_for(slot: u32, n: u32) -> Ipv4Addr {
    let second = u8::try_from(1 + slot % 254).unwrap_or(1);
    let third = u8::try_from((n / 250) % 256).unwrap_or(0);
    let fourth = u8::try_from(n % 250 + 2).unwrap_or(2);
    Ipv4Addr::new(127, second, third, fourth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_distinct_and_clear_of_special_octets() {
        let all: Vec<_> = (0..250 * 256).map(|n| ip_for(253, n)).collect();
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        for ip in &all {
            assert!(ip.is_loopback(), "{ip}");
            assert_eq!(ip.octets()[1], 254);
            assert!((2..=251).contains(&ip.octets()[3]), "{ip}");
        }
        assert_eq!(ip_for(0, 0), Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(ip_for(0, 250), Ipv4Addr::new(127, 1, 1, 2));
    }

    #[test]
    fn a_server_binds_a_fixed_port_on_each_address() {
        let (a, b) = (next_ip(), next_ip());
        assert_ne!(a, b);
        let _first = std::net::TcpListener::bind((a, 2222)).unwrap();
        let _second = std::net::TcpListener::bind((b, 2222)).unwrap();
    }
}
