//! Reading Prometheus' text exposition format, as the operator's `/metrics` serves it:
//! the samples, and the per-verb API request breakdown the scale bench prints.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric name, with its `_total`/`_sum`/`_count`/`_bucket` suffix.
    pub name: String,
    /// The labels.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Every sample of `text`; comments and unreadable lines are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(sample).collect()
}

fn sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y"`; the operator's label values never hold quotes or commas.
fn labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=')?;
        out.insert(key.to_string(), value.trim_matches('"').to_string());
    }
    Some(out)
}

/// The sum of every sample named `name` whose labels include all of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The value of the one sample of `text` named `name` whose labels are exactly `labels`.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}

/// API requests of one verb on one resource, between two scrapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiRequests {
    /// `list`, `apply`, ...
    pub verb: String,
    /// `pods`, `trainingjobs/status`, ...
    pub resource: String,
    /// How many were sent.
    pub calls: f64,
    /// Their total time until the response head, in seconds.
    pub seconds: f64,
}

/// What the operator did between scrapes `before` and `after`: API requests by verb and
/// resource (most time first), reconciles, and the time spent in them.
#[derive(Clone, Debug, PartialEq)]
pub struct Breakdown {
    /// Per verb and resource.
    pub requests: Vec<ApiRequests>,
    /// Reconciles run.
    pub reconciles: f64,
    /// Their summed duration, in seconds (reconciles overlap, so this can exceed wall time).
    pub reconcile_seconds: f64,
}

impl Breakdown {
    /// The difference between two scrapes of the operator's `/metrics`.
    pub fn between(before: &str, after: &str) -> Self {
        let (before, after) = (samples(before), samples(after));
        let delta =
            |name: &str, with: &[(&str, &str)]| sum(&after, name, with) - sum(&before, name, with);
        let mut pairs: Vec<(String, String)> = after
            .iter()
            .filter(|s| s.name == "kubetrain_api_request_duration_seconds_count")
            .filter_map(|s| {
                Some((
                    s.labels.get("verb")?.clone(),
                    s.labels.get("resource")?.clone(),
                ))
            })
            .collect();
        pairs.sort();
        pairs.dedup();
        let mut requests: Vec<ApiRequests> = pairs
            .into_iter()
            .map(|(verb, resource)| {
                let with = [("verb", verb.as_str()), ("resource", resource.as_str())];
                ApiRequests {
                    calls: delta("kubetrain_api_request_duration_seconds_count", &with),
                    seconds: delta("kubetrain_api_request_duration_seconds_sum", &with),
                    verb,
                    resource,
                }
            })
            .filter(|r| r.calls > 0.0)
            .collect();
        requests.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Self {
            requests,
            reconciles: delta("kubetrain_reconciles_total", &[]),
            reconcile_seconds: delta("kubetrain_reconcile_duration_seconds_sum", &[]),
        }
    }

    /// Requests of `verb` on `resource`.
    pub fn calls(&self, verb: &str, resource: &str) -> f64 {
        self.requests
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .map(|r| r.calls)
            .sum()
    }

    /// Time in requests other than watches (a watch's time is only its opening), seconds.
    pub fn api_seconds(&self) -> f64 {
        self.requests
            .iter()
            .filter(|r| r.verb != "watch")
            .map(|r| r.seconds)
            .sum()
    }

    /// A markdown table: one row per verb and resource, then the reconcile totals.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| verb | resource | calls | mean latency | total time |\n|---|---|---|---|---|\n",
        );
        for r in &self.requests {
            out.push_str(&format!(
                "| {} | {} | {:.0} | {:.1} ms | {:.1} s |\n",
                r.verb,
                r.resource,
                r.calls,
                1000.0 * r.seconds / r.calls,
                r.seconds
            ));
        }
        // A reconcile applies its pods in parallel, so request time can exceed it.
        out.push_str(&format!(
            "| reconciles | | {:.0} | {:.1} ms | {:.1} s (API requests, overlapping: {:.1} s) |\n",
            self.reconciles,
            1000.0 * self.reconcile_seconds / self.reconciles.max(1.0),
            self.reconcile_seconds,
            self.api_seconds()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# HELP kubetrain_reconciles Reconciles.
kubetrain_reconciles_total 2
kubetrain_reconcile_duration_seconds_sum 0.5
kubetrain_api_request_duration_seconds_sum{verb=\"list\",resource=\"pods\"} 1.0
kubetrain_api_request_duration_seconds_count{verb=\"list\",resource=\"pods\"} 4
";
    const AFTER: &str = "\
kubetrain_reconciles_total 12
kubetrain_reconcile_duration_seconds_sum 3.5
kubetrain_api_request_duration_seconds_sum{verb=\"list\",resource=\"pods\"} 5.0
kubetrain_api_request_duration_seconds_count{verb=\"list\",resource=\"pods\"} 14
kubetrain_api_request_duration_seconds_sum{verb=\"apply\",resource=\"pods\"} 0.25
kubetrain_api_request_duration_seconds_count{verb=\"apply\",resource=\"pods\"} 5
kubetrain_api_request_duration_seconds_sum{verb=\"watch\",resource=\"pods\"} 9
kubetrain_api_request_duration_seconds_count{verb=\"watch\",resource=\"pods\"} 1
";

    #[test]
    fn samples_read_names_labels_and_values() {
        let all = samples(AFTER);
        assert_eq!(all.len(), 8);
        assert_eq!(all[2].name, "kubetrain_api_request_duration_seconds_sum");
        assert_eq!(all[2].labels["verb"], "list");
        assert_eq!(all[2].labels["resource"], "pods");
        assert_eq!(all[2].value, 5.0);
        assert_eq!(sum(&all, "kubetrain_reconciles_total", &[]), 12.0);
        let labels = [("verb", "list"), ("resource", "pods")];
        let name = "kubetrain_api_request_duration_seconds_sum";
        assert_eq!(value(AFTER, name, &labels), Some(5.0));
        assert_eq!(value(AFTER, name, &labels[..1]), None);
        assert_eq!(value(AFTER, "kubetrain_reconciles_total", &[]), Some(12.0));
    }

    #[test]
    fn a_breakdown_is_the_difference_between_scrapes_most_time_first() {
        let b = Breakdown::between(BEFORE, AFTER);
        assert_eq!(b.reconciles, 10.0);
        assert_eq!(b.reconcile_seconds, 3.0);
        let rows: Vec<(&str, &str, f64, f64)> = b
            .requests
            .iter()
            .map(|r| (r.verb.as_str(), r.resource.as_str(), r.calls, r.seconds))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("watch", "pods", 1.0, 9.0),
                ("list", "pods", 10.0, 4.0),
                ("apply", "pods", 5.0, 0.25)
            ]
        );
        assert_eq!(b.calls("apply", "pods"), 5.0);
        assert_eq!(b.api_seconds(), 4.25);
        assert!(
            b.markdown()
                .contains("| list | pods | 10 | 400.0 ms | 4.0 s |")
        );
    }
}
