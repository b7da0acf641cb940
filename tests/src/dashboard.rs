//! The shipped Grafana dashboard (`charts/kubetrain/dashboards/kubetrain.json`) as the
//! PromQL it sends: its panel and variable queries, and Grafana's substitution of the
//! template variables into them.

use crate::envtest::workspace_root;

/// The dashboard file, relative to the workspace root.
pub const PATH: &str = "charts/kubetrain/dashboards/kubetrain.json";

/// Every query of the shipped dashboard: panel `expr`s and the variables' `definition`s
/// and `query`s (those that name a kubetrain metric), in file order.
pub fn queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        ("query", serde_json::Value::String(s)) if s.contains("kubetrain_") => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let path = workspace_root().join(PATH);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// `query` with Grafana's variables replaced as Grafana does for one selected value each:
/// `$__rate_interval` by `rate_interval` (a duration like `4s`), `$namespace` and `$job`
/// by the regex-escaped namespace and TrainingJob name.
pub fn substitute(query: &str, rate_interval: &str, namespace: &str, job: &str) -> String {
    query
        .replace("$__rate_interval", rate_interval)
        .replace("$namespace", &regex_escape(namespace))
        .replace("$job", &regex_escape(job))
}

/// What Grafana's `label_values(<selector>, <label>)` variable query asks for, if `query`
/// is one: `(selector, label)`.
pub fn label_values(query: &str) -> Option<(&str, &str)> {
    let inner = query.strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim(), label.trim()))
}

/// Grafana's `$__rate_interval` for a panel of resolution `step_s` on a target scraped
/// every `scrape_s` seconds: `max($__interval + scrape interval, 4 × scrape interval)`.
pub fn rate_interval_seconds(step_s: u64, scrape_s: u64) -> u64 {
    (step_s + scrape_s).max(4 * scrape_s)
}

fn regex_escape(value: &str) -> String {
    value
        .chars()
        .flat_map(|c| {
            let special = r"\.+*?()|[]{}^$".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_substituted_as_grafana_does() {
        let q = r#"sum by (job_name) (rate(x{namespace=~"$namespace", job_name=~"$job"}[$__rate_interval]))"#;
        assert_eq!(
            substitute(q, "4s", "prom-1", "a.b"),
            r#"sum by (job_name) (rate(x{namespace=~"prom-1", job_name=~"a\.b"}[4s]))"#
        );
        assert_eq!(
            label_values(r#"label_values(kubetrain_job_step{namespace=~"ns"}, job)"#),
            Some((r#"kubetrain_job_step{namespace=~"ns"}"#, "job"))
        );
        assert_eq!(label_values("sum(x)"), None);
        assert_eq!(rate_interval_seconds(1, 1), 4);
        assert_eq!(rate_interval_seconds(15, 30), 120);
        assert_eq!(rate_interval_seconds(60, 1), 61);
    }

    #[test]
    fn the_shipped_dashboard_has_queries() {
        assert!(queries().len() >= 10);
    }
}
