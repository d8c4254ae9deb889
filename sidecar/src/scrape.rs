//! vLLM's Prometheus names → the frame's raw numbers.
//!
//! Names differ across vLLM versions: `vllm:kv_cache_usage_perc` (current) and
//! `vllm:gpu_cache_usage_perc` (older) are both read. With several engines (data parallel),
//! gauges of load and counters are summed across label sets; KV-cache usage takes the fullest
//! engine, since that is the one that preempts first.
//!
//! Every number the mapping yields is finite: a sum that leaves the range of `f64` saturates at
//! `f64::MAX` (or `MIN`) and its name is reported in [`Scraped::saturated`]. A receiver drops a
//! frame carrying a non-finite number as malformed, so one overflowing gauge would otherwise
//! make the worker look dead while the sidecar sends on.

use gpuha_liveness::Metrics;
use prometheus_parse::{Scrape, Value};

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("the page is not Prometheus text: {0}")]
    Text(String),
    #[error("no vLLM metrics on the page (is the URL vLLM's /metrics?)")]
    NotVllm,
}

/// What one scrape yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Scraped {
    pub metrics: Metrics,
    /// Served model names, from the `model_name` label, in order of first appearance.
    pub models: Vec<String>,
    /// vLLM names whose sum left the range of `f64` and was saturated, in mapping order.
    pub saturated: Vec<&'static str>,
}

const MAX_MODELS: usize = 8;

fn number(v: &Value) -> Option<f64> {
    let x = match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        _ => return None,
    };
    x.is_finite().then_some(x)
}

/// `prometheus-parse` reads metric names as `\w+`, but Prometheus allows `:` and every vLLM
/// name has one (`vllm:...`). Names are rewritten `:` → `__` before parsing, and looked up in
/// that form (see [`n`]).
fn escape_colons(line: &str) -> String {
    let (prefix, rest) = match line.strip_prefix("# TYPE ").or_else(|| line.strip_prefix("# HELP ")) {
        Some(rest) => (&line[..7], rest),
        None => ("", line),
    };
    let end = rest.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(rest.len());
    format!("{prefix}{}{}", rest[..end].replace(':', "__"), &rest[end..])
}

/// A metric name as it reads after [`escape_colons`].
fn n(name: &str) -> String {
    name.replace(':', "__")
}

/// Every vLLM name the mapping below reads.
const WANTED: [&str; 10] = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions_total",
    "vllm:iteration_tokens_total_count",
];

/// Whether a `/metrics` line can matter to [`parse`]: a sample of a name the mapping reads, or
/// a vLLM `# TYPE` line. The sidecar keeps only these while the page streams in, so a page of
/// many megabytes (thousands of label sets of other series) costs a scan, not a parse.
pub fn wanted_line(line: &[u8]) -> bool {
    if let Some(rest) = line.strip_prefix(b"# TYPE ") {
        return rest.starts_with(b"vllm:");
    }
    let end = line.iter().position(|b| *b == b'{' || *b == b' ' || *b == b'\t').unwrap_or(line.len());
    let name = &line[..end];
    WANTED.iter().any(|w| w.as_bytes() == name)
}

pub fn parse(text: &str) -> Result<Scraped, ParseError> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(escape_colons(l)))).map_err(|e| ParseError::Text(e.to_string()))?;
    let mut saturated = Vec::new();
    let mut sum = |names: &[&'static str]| -> Option<f64> {
        let wanted: Vec<String> = names.iter().map(|x| n(x)).collect();
        let mut acc: Option<f64> = None;
        for s in scrape.samples.iter().filter(|s| wanted.contains(&s.metric)) {
            if let Some(x) = number(&s.value) {
                *acc.get_or_insert(0.0) += x;
            }
        }
        match acc {
            Some(x) if !x.is_finite() => {
                // Only finite terms were added, so this is an overflow, never a NaN.
                saturated.push(names[0]);
                Some(if x > 0.0 { f64::MAX } else { f64::MIN })
            }
            _ => acc,
        }
    };
    let max = |names: &[&str]| -> Option<f64> {
        let names: Vec<String> = names.iter().map(|x| n(x)).collect();
        scrape
            .samples
            .iter()
            .filter(|s| names.contains(&s.metric))
            .filter_map(|s| number(&s.value))
            .reduce(f64::max)
    };
    let metrics = Metrics {
        running: sum(&["vllm:num_requests_running"]),
        waiting: sum(&["vllm:num_requests_waiting"]),
        kv_usage: max(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]).map(|x| x.clamp(0.0, 1.0)),
        ttft_sum_s: sum(&["vllm:time_to_first_token_seconds_sum"]),
        ttft_count: sum(&["vllm:time_to_first_token_seconds_count"]),
        prompt_tokens: sum(&["vllm:prompt_tokens_total"]),
        generation_tokens: sum(&["vllm:generation_tokens_total"]),
        preemptions: sum(&["vllm:num_preemptions_total"]),
        engine_steps: sum(&["vllm:iteration_tokens_total_count"]),
    };
    // Without the two load gauges this is not a vLLM we can judge: say nothing.
    if metrics.running.is_none() && metrics.waiting.is_none() {
        return Err(ParseError::NotVllm);
    }
    let mut models: Vec<String> = Vec::new();
    for s in scrape.samples.iter().filter(|s| s.metric.starts_with("vllm__")) {
        if let Some(m) = s.labels.get("model_name") {
            if !m.is_empty() && m.len() <= 64 && models.len() < MAX_MODELS && !models.iter().any(|x| x == m) {
                models.push(m.to_string());
            }
        }
    }
    Ok(Scraped { metrics, models, saturated })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_cache_name_and_engines_sum() {
        let text = "# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2\n\
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 3\n\
# TYPE vllm:gpu_cache_usage_perc gauge\n\
vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.2\n\
vllm:gpu_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.7\n";
        let s = parse(text).unwrap();
        assert_eq!(s.metrics.running, Some(5.0));
        assert_eq!(s.metrics.kv_usage, Some(0.7));
        assert_eq!(s.metrics.waiting, None);
        assert_eq!(s.models, vec!["m".to_string()]);
    }

    /// Keeping only the wanted lines changes nothing: every real capture maps the same.
    #[test]
    fn the_line_filter_keeps_every_number_the_mapping_reads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if !name.starts_with("metrics-") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let kept: String = text.split_inclusive('\n').filter(|l| wanted_line(l.trim_end().as_bytes())).collect();
            assert!(kept.len() * 4 < text.len(), "{name}: the filter kept {} of {} bytes", kept.len(), text.len());
            assert_eq!(parse(&kept).unwrap(), parse(&text).unwrap(), "{name}");
            n += 1;
        }
        assert!(n >= 5, "only {n} captures");
        assert!(!wanted_line(b"vllm:num_requests_running_other 1"));
        assert!(wanted_line(b"vllm:num_requests_running{engine=\"0\"} 1"));
        assert!(!wanted_line(b"# HELP vllm:num_requests_running x"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse("").is_err());
        assert!(parse("hello world\n<html>").is_err());
        assert!(parse("# TYPE foo gauge\nfoo 1\n").is_err());
        assert!(parse("\u{0}\u{1}\u{2}").is_err());
    }

    /// Two engines at 1e308 each: the sum is +inf, which the receiver rejects as malformed, so
    /// the worker would never appear. The sum saturates and the metric is reported.
    #[test]
    fn sum_past_f64_range_saturates_and_is_reported() {
        let text = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 1e308\n\
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 1e308\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} -1e308\n\
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} -1e308\n\
vllm:generation_tokens_total{engine=\"0\",model_name=\"m\"} 5\n";
        let s = parse(text).unwrap();
        assert_eq!(s.metrics.running, Some(f64::MAX));
        assert_eq!(s.metrics.waiting, Some(f64::MIN));
        assert_eq!(s.metrics.generation_tokens, Some(5.0));
        assert_eq!(s.saturated, vec!["vllm:num_requests_running", "vllm:num_requests_waiting"]);
        let s = parse("vllm:num_requests_running 1\n").unwrap();
        assert!(s.saturated.is_empty());
    }

    #[test]
    fn nan_and_inf_are_ignored() {
        let s = parse("vllm:num_requests_running{model_name=\"m\"} NaN\nvllm:num_requests_waiting{model_name=\"m\"} +Inf\n");
        assert!(s.is_err() || s.is_ok_and(|s| s.metrics.running.is_none()));
    }
}
