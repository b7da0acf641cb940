//! What a `kubetrain operator` process tells in its log that a test needs: the port it
//! serves metrics and probes on, when it was started with `--metrics-port 0`.
//!
//! Port 0 and reading the bound port back is the one way to give it a port without a
//! race: a port picked free here and released for it could meanwhile go to any other
//! socket on the machine.

use std::path::Path;

/// The message of the operator's log line that names its bound address (`metrics::serve`).
const SERVING: &str = "serving metrics and probes";

/// The port in the "serving metrics and probes" line of `log`, in either log format:
/// text (`... serving metrics and probes addr=0.0.0.0:41235`) or JSON
/// (`"fields":{"message":"serving metrics and probes","addr":"0.0.0.0:41235"}`).
pub fn bound_metrics_port(log: &str) -> Option<u16> {
    log.lines()
        .filter(|line| line.contains(SERVING))
        .find_map(|line| {
            let line = &without_colours(line);
            let addr = match serde_json::from_str::<serde_json::Value>(line) {
                Ok(json) => json.pointer("/fields/addr")?.as_str()?.to_string(),
                Err(_) => {
                    let rest = &line[line.find("addr=")? + "addr=".len()..];
                    rest.split_whitespace().next()?.to_string()
                }
            };
            addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
        })
}

/// `line` without ANSI colour sequences (`ESC [ ... m`), which the text format writes
/// even to a file.
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits until the operator logging to `log` names its metrics port.
pub async fn wait_for_metrics_port(log: &Path) -> u16 {
    crate::operator::wait_until("the operator to name its metrics port", || async {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bound_metrics_port(&text).ok_or_else(|| format!("not yet; log:\n{text}"))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_in_text_and_json_logs() {
        let text = "2026-12-05T06:00:00Z  INFO kubetrain_operator::metrics: serving metrics and probes addr=0.0.0.0:41235\n";
        assert_eq!(bound_metrics_port(text), Some(41235));
        let coloured = "\u{1b}[32m INFO\u{1b}[0m serving metrics and probes \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m0.0.0.0:5555\n";
        assert_eq!(bound_metrics_port(coloured), Some(5555));
        let json = r#"{"timestamp":"x","level":"INFO","fields":{"message":"serving metrics and probes","addr":"0.0.0.0:8181"},"target":"kubetrain_operator::metrics"}"#;
        assert_eq!(bound_metrics_port(json), Some(8181));
        assert_eq!(bound_metrics_port("INFO other line addr=0.0.0.0:1\n"), None);
        assert_eq!(bound_metrics_port(""), None);
    }
}
