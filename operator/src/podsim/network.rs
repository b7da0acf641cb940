//! Loopback addresses and mapped ports for pods that are local processes.
//!
//! Each pod, known by its DNS identity (namespace, subdomain, hostname), gets a loopback
//! address `127.A.B.C` and one host port that stands in for its contract port. The contract
//! env names pods as `<host>.<subdomain>.<ns>.svc:<port>`; [`PodNetwork::rewrite`] turns
//! each such name into the pod's address, and `:<contract port>` behind it into the mapped
//! port. A program therefore binds and dials the mapped port, whichever address it binds.
//!
//! Ports come from below the kernel's ephemeral range, where no outgoing connection is
//! ever given one, and each is checked free when it is handed out. An address is fixed at
//! the first sight of its name, in a pod or in an env value, so a pod may start before the
//! peers it names exist.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A pod's DNS identity: (namespace, subdomain, hostname).
pub type DnsKey = (String, String, String);

/// Where a pod lives on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodAddress {
    /// Its own loopback address, reported as `status.podIP`.
    pub ip: Ipv4Addr,
    /// The host port its contract port is mapped to: the port its program listens on.
    pub port: u16,
}

/// The addresses handed out so far, stable for the network's life.
#[derive(Debug)]
pub struct PodNetwork {
    contract_port: u16,
    by_name: HashMap<DnsKey, PodAddress>,
}

/// Process-wide, so that several networks in one process (tests run many) never hand out
/// the same port; addresses come from `kubetrain_trainer::loopback`, process-wide too.
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
/// Port offset from the PID: separates processes running side by side.
static PROCESS_SLOT: LazyLock<u32> = LazyLock::new(|| std::process::id() % 254);

/// Host ports are taken from `[PORT_FLOOR, ephemeral start)`.
const PORT_FLOOR: u16 = 12000;

impl PodNetwork {
    /// A network whose pods' contract port (in their env and container ports) is
    /// `contract_port`.
    pub fn new(contract_port: u16) -> Self {
        Self {
            contract_port,
            by_name: HashMap::new(),
        }
    }

    /// The contract port that addresses are mapped from.
    pub fn contract_port(&self) -> u16 {
        self.contract_port
    }

    /// The address of the pod with this DNS identity, allocated at first sight.
    pub fn address(&mut self, key: &DnsKey) -> PodAddress {
        *self
            .by_name
            .entry(key.clone())
            .or_insert_with(|| PodAddress {
                ip: kubetrain_trainer::loopback::next_ip(),
                port: allocate_port(),
            })
    }

    /// Replaces pod DNS names in `value` by the pods' addresses, and the contract port
    /// right after such a name by the pod's mapped port.
    pub fn rewrite(&mut self, value: &str, ctx: &DnsContext<'_>) -> String {
        let contract_port = self.contract_port;
        rewrite_dns_names(value, ctx, contract_port, &mut |key| self.address(key))
    }
}

/// The first port at or after this process's next candidate that nothing listens on.
fn allocate_port() -> u16 {
    let ceiling = ephemeral_start().max(PORT_FLOOR + 1000);
    // Each process starts in its own stretch of the range, then walks it.
    let start = *PROCESS_SLOT * 97;
    let next = || start + NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    pick_port(PORT_FLOOR..ceiling, next, port_is_free)
}

/// The first candidate in `range` (from `next`, taken modulo the range) that `is_free`; the
/// last one tried if the whole range is taken, so that the program's bind names the port.
fn pick_port(
    range: std::ops::Range<u16>,
    mut next: impl FnMut() -> u32,
    is_free: impl Fn(u16) -> bool,
) -> u16 {
    let span = u32::from(range.end - range.start);
    let mut last = range.start;
    for _ in 0..span {
        last = range.start + u16::try_from(next() % span).unwrap_or(0);
        if is_free(last) {
            return last;
        }
    }
    last
}

/// Whether a wildcard listener could take `port` now, as TensorFlow's servers do.
fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// The pod whose env is being rewritten: its namespace and subdomain decide which short
/// names resolve.
#[derive(Clone, Copy, Debug)]
pub struct DnsContext<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's subdomain (the job's headless Service), if it has one.
    pub subdomain: Option<&'a str>,
}

/// Replaces pod DNS names in `value` by the pods' addresses from `resolve`.
///
/// Recognised, per maximal run of `[A-Za-z0-9.-]`:
/// `h.s.ns.svc.cluster.local`, `h.s.ns.svc`, `h.s.<own ns>`, `h.<own subdomain>`.
/// A name followed by `:<contract_port>` gets the mapped port instead. Anything else (file
/// names, versions, URLs' other parts) is left alone.
pub fn rewrite_dns_names(
    value: &str,
    ctx: &DnsContext<'_>,
    contract_port: u16,
    resolve: &mut impl FnMut(&DnsKey) -> PodAddress,
) -> String {
    let is_dns = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    let contract_suffix = format!(":{contract_port}");
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while !rest.is_empty() {
        let start = rest.find(is_dns).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(|c| !is_dns(c)).unwrap_or(rest.len());
        let token = &rest[..end];
        rest = &rest[end..];
        // A sentence-ending dot is not part of the name.
        let trimmed = token.trim_end_matches('.');
        let Some(key) = pod_dns_key(trimmed, ctx) else {
            out.push_str(token);
            continue;
        };
        let address = resolve(&key);
        out.push_str(&address.ip.to_string());
        let dots = &token[trimmed.len()..];
        out.push_str(dots);
        let port_follows = dots.is_empty()
            && rest.starts_with(&contract_suffix)
            && !rest[contract_suffix.len()..].starts_with(|c: char| c.is_ascii_digit());
        if port_follows {
            out.push_str(&format!(":{}", address.port));
            rest = &rest[contract_suffix.len()..];
        }
    }
    out
}

fn pod_dns_key(name: &str, ctx: &DnsContext<'_>) -> Option<DnsKey> {
    let labels: Vec<&str> = name.split('.').collect();
    if labels.iter().any(|l| !is_dns_label(l)) {
        return None;
    }
    let key = |h: &str, s: &str, ns: &str| Some((ns.to_string(), s.to_string(), h.to_string()));
    match labels.as_slice() {
        [h, s, ns, "svc", "cluster", "local"] | [h, s, ns, "svc"] => key(h, s, ns),
        [h, s, ns] if *ns == ctx.namespace => key(h, s, ns),
        [h, s] if Some(*s) == ctx.subdomain => key(h, s, ctx.namespace),
        _ => None,
    }
}

fn is_dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(value: &str) -> (String, Vec<DnsKey>) {
        let ctx = DnsContext {
            namespace: "ns1",
            subdomain: Some("digits"),
        };
        let mut seen = Vec::new();
        let out = rewrite_dns_names(value, &ctx, 2222, &mut |k: &DnsKey| {
            seen.push(k.clone());
            let n = u8::try_from(seen.len()).unwrap();
            PodAddress {
                ip: Ipv4Addr::new(127, 9, 0, n),
                port: 20000 + u16::from(n),
            }
        });
        (out, seen)
    }

    #[test]
    fn rewrites_every_pod_dns_form_and_maps_the_contract_port() {
        let (out, seen) = rewrite(
            r#"{"ps":["digits-ps-0.digits.ns1.svc:2222"],"worker":["digits-worker-0.digits.ns1.svc.cluster.local:2222","digits-worker-1.digits:2222","digits-worker-2.digits.ns1:2222"]}"#,
        );
        assert_eq!(
            out,
            r#"{"ps":["127.9.0.1:20001"],"worker":["127.9.0.2:20002","127.9.0.3:20003","127.9.0.4:20004"]}"#
        );
        assert_eq!(
            seen[0],
            ("ns1".into(), "digits".into(), "digits-ps-0".into())
        );
        assert_eq!(seen[2].2, "digits-worker-1");
    }

    #[test]
    fn other_ports_and_bare_names_keep_their_port() {
        let (out, _) = rewrite("http://w-0.digits:9090/metrics w-1.digits w-2.digits:22220");
        assert_eq!(
            out,
            "http://127.9.0.1:9090/metrics 127.9.0.2 127.9.0.3:22220"
        );
    }

    #[test]
    fn leaves_other_dotted_words_alone() {
        for v in [
            "model.bin",
            "/data/train.csv",
            "v1.2.3",
            "example.com",
            "a.b.other-ns",
            "http://10.0.0.1:80/x",
        ] {
            assert_eq!(rewrite(v).0, v, "{v}");
        }
    }

    #[test]
    fn keeps_sentence_dot_and_other_namespaces() {
        let (out, seen) = rewrite("peer is w-0.job.other.svc.");
        assert_eq!(out, "peer is 127.9.0.1.");
        assert_eq!(seen[0].0, "other");
    }

    #[test]
    fn addresses_are_stable_distinct_and_free() {
        let mut network = PodNetwork::new(2222);
        let a = ("n".to_string(), "s".to_string(), "a".to_string());
        let b = ("n".to_string(), "s".to_string(), "b".to_string());
        let first = network.address(&a);
        assert_eq!(network.address(&a), first);
        let second = network.address(&b);
        assert_ne!(second.ip, first.ip);
        assert_ne!(second.port, first.port);
        assert!(first.ip.is_loopback());
        assert!(first.port >= PORT_FLOOR && first.port < ephemeral_start().max(PORT_FLOOR + 1000));
        // The port was free when handed out: a wildcard listener can take it, as
        // TensorFlow's server does.
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, second.port));
        assert!(listener.is_ok(), "port {} is taken", second.port);
    }

    #[test]
    fn taken_ports_are_skipped_and_the_range_wraps() {
        let mut n = 8u32;
        let taken = [20008, 20009];
        let port = pick_port(
            20000..20010,
            || {
                n += 1;
                n - 1
            },
            |p| !taken.contains(&p),
        );
        assert_eq!(
            port, 20000,
            "20008 and 20009 are taken, so the walk wraps to 20000"
        );
        let all_taken = pick_port(20000..20003, || 0, |_| false);
        assert_eq!(all_taken, 20000);
    }

    #[test]
    fn rewrite_uses_the_networks_own_addresses() {
        let mut network = PodNetwork::new(2222);
        let ctx = DnsContext {
            namespace: "ns",
            subdomain: Some("job"),
        };
        let out = network.rewrite("job-ps-0.job.ns.svc:2222", &ctx);
        let address = network.address(&("ns".into(), "job".into(), "job-ps-0".into()));
        assert_eq!(out, format!("{}:{}", address.ip, address.port));
    }
}
