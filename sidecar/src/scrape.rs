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
    /// `vllm:lora_requests_info`'s current series; `None` when the page has none (LoRA off).
    pub lora: Option<LoraInfo>,
}

/// The LoRA adapters of vLLM's requests at its newest engine step, from `vllm:lora_requests_info`.
///
/// vLLM keeps that gauge as an info series per distinct label set (`max_lora`,
/// `running_lora_adapters`, `waiting_lora_adapters`: adapter names joined by commas) and sets the
/// one of the current state to the current Unix time at each engine step that has iteration
/// stats; older label sets stay on the page with older times. So the series with the highest
/// value is the current state. It names the adapters of requests running or waiting *now*: an
/// adapter that finished its requests is gone from it although vLLM keeps it in its LRU of
/// `max_lora` GPU slots. The older series still say when each adapter was last in a step
/// ([`LoraInfo::recent`]): that order is the LRU's (see `crate::lora`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraInfo {
    /// Adapters with running requests, in vLLM's order.
    pub running: Vec<String>,
    /// Adapters with waiting requests (and none running), in vLLM's order.
    pub waiting: Vec<String>,
    /// The `max_lora` label: adapters vLLM holds in GPU memory at once (`--max-loras`).
    pub max_lora: Option<u32>,
    /// Names not kept: empty, over [`MAX_ADAPTER_NAME`] bytes, or past [`MAX_LORA_NAMES`].
    pub dropped: usize,
    /// Every adapter named by any series on the page, most recently named first (the time of
    /// the newest series naming it), at most [`MAX_LORA_NAMES`].
    pub recent: Vec<String>,
}

impl LoraInfo {
    /// Running adapters, then waiting ones not running: the active set, most relevant first.
    pub fn active(&self) -> Vec<String> {
        let mut out = self.running.clone();
        for w in &self.waiting {
            if !out.contains(w) {
                out.push(w.clone());
            }
        }
        out
    }
}

/// Most adapter names read from each label of the current series.
pub const MAX_LORA_NAMES: usize = 16;
/// Longest adapter name kept (the frame's string limit).
pub const MAX_ADAPTER_NAME: usize = gpuha_liveness::frame::MAX_STR;

/// `vllm:lora_requests_info`'s current series on the page. Read here, not through
/// `prometheus-parse`, whose label parser splits on every comma (these label values are
/// comma-joined lists) and on every `=`.
fn current_lora(text: &str) -> Option<LoraInfo> {
    let mut best: Option<(f64, Vec<(String, String)>)> = None;
    // (name, newest time a series named it); bounded: a long-lived vLLM has many series.
    let mut last: Vec<(String, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("vllm:lora_requests_info") else { continue };
        let Some((labels, value)) = sample(rest) else { continue };
        if !value.is_finite() {
            continue;
        }
        let mut ignored = 0;
        for (k, v) in &labels {
            if k != "running_lora_adapters" && k != "waiting_lora_adapters" {
                continue;
            }
            for name in names(Some(v), &mut ignored) {
                match last.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, t)) => *t = t.max(value),
                    None => last.push((name, value)),
                }
            }
        }
        if last.len() > 4 * MAX_LORA_NAMES {
            last.sort_by(|a, b| b.1.total_cmp(&a.1));
            last.truncate(MAX_LORA_NAMES);
        }
        // The newest series is the current state; equal times: the later on the page.
        if best.as_ref().is_none_or(|(t, _)| value >= *t) {
            best = Some((value, labels));
        }
    }
    let (_, labels) = best?;
    // Stable: equal times keep the page's order.
    last.sort_by(|a, b| b.1.total_cmp(&a.1));
    last.truncate(MAX_LORA_NAMES);
    let recent = last.into_iter().map(|(n, _)| n).collect();
    let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut dropped = 0;
    let running = names(get("running_lora_adapters"), &mut dropped);
    let waiting = names(get("waiting_lora_adapters"), &mut dropped);
    let max_lora = get("max_lora").and_then(|v| v.trim().parse::<u32>().ok());
    Some(LoraInfo { running, waiting, max_lora, dropped, recent })
}

/// A sample line after its metric name: `{k="v",...} value [timestamp]` or ` value`, label
/// values with Prometheus' escapes (`\\`, `\"`, `\n`). `None` when it is not that shape.
fn sample(rest: &str) -> Option<(Vec<(String, String)>, f64)> {
    let mut labels = Vec::new();
    let mut it = rest.char_indices().peekable();
    let mut value_at = 0;
    if rest.starts_with('{') {
        it.next();
        loop {
            while it.next_if(|(_, c)| *c == ',' || c.is_whitespace()).is_some() {}
            if let Some((i, '}')) = it.peek().copied() {
                it.next();
                value_at = i + 1;
                break;
            }
            let mut key = String::new();
            while let Some((_, c)) = it.next_if(|(_, c)| *c != '=') {
                key.push(c);
            }
            if it.next()?.1 != '=' || it.next()?.1 != '"' {
                return None;
            }
            let mut val = String::new();
            loop {
                match it.next()?.1 {
                    '"' => break,
                    '\\' => match it.next()?.1 {
                        'n' => val.push('\n'),
                        c => val.push(c),
                    },
                    c => val.push(c),
                }
            }
            labels.push((key.trim().to_string(), val));
        }
    } else if !rest.starts_with([' ', '\t']) {
        // Another metric whose name starts the same.
        return None;
    }
    let value = rest[value_at..].split_whitespace().next()?;
    Some((labels, value.parse::<f64>().ok()?))
}

/// Splits a label's comma-joined names: at most [`MAX_LORA_NAMES`] distinct names of 1..=64
/// bytes; what else it holds is counted in `dropped`.
fn names(label: Option<&str>, dropped: &mut usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in label.unwrap_or("").split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if n.len() > MAX_ADAPTER_NAME || out.len() >= MAX_LORA_NAMES {
            *dropped += 1;
        } else if !out.iter().any(|x| x == n) {
            out.push(n.to_string());
        }
    }
    out
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
const WANTED: [&str; 11] = [
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
    "vllm:lora_requests_info",
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
    let lora = current_lora(text);
    Ok(Scraped { metrics, models, saturated, lora })
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

    /// The newest `vllm:lora_requests_info` series is the current state (the real capture has
    /// an older one naming `adapter-a` and a newer, idle one), and names are bounded.
    #[test]
    fn lora_requests_info_newest_series_wins() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/");
        let text = std::fs::read_to_string(format!("{dir}metrics-lora.txt")).unwrap();
        let l = parse(&text).unwrap().lora.unwrap();
        assert_eq!(l, LoraInfo { running: vec![], waiting: vec![], max_lora: Some(2), dropped: 0, recent: vec!["adapter-a".into()] });
        // Without the newer idle series, the older one is current.
        let older: String = text.lines().filter(|l| !l.contains("running_lora_adapters=\"\"")).map(|l| format!("{l}\n")).collect();
        let l = parse(&older).unwrap().lora.unwrap();
        assert_eq!((l.running.clone(), l.waiting.clone(), l.max_lora), (vec!["adapter-a".to_string()], vec!["adapter-a".to_string()], Some(2)));
        assert_eq!(l.active(), vec!["adapter-a".to_string()]);
        // No LoRA series: no info.
        assert_eq!(parse(&capture_without_lora(&text)).unwrap().lora, None);
        let long = "x".repeat(65);
        let many: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
        let page = format!(
            "vllm:num_requests_running{{model_name=\"m\"}} 1\n\
vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"b, {long},b,,c\"}} 2e9\n\
vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"}} 1e9\n",
            many.join(",")
        );
        let l = parse(&page).unwrap().lora.unwrap();
        assert_eq!(l.running.len(), MAX_LORA_NAMES);
        assert_eq!(l.waiting, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(l.dropped, 4 + 1);
        assert_eq!(l.max_lora, Some(4));
        assert_eq!(l.recent.len(), MAX_LORA_NAMES);
        assert_eq!(&l.recent[..3], ["a0", "a1", "a2"]);
        assert!(!l.recent.contains(&"old".to_string()), "older than 16 newer names");
        let kept: String = page.split_inclusive('\n').filter(|l| wanted_line(l.trim_end().as_bytes())).collect();
        assert_eq!(kept, page, "the line filter keeps the LoRA series");
    }

    #[test]
    fn the_lora_line_parser_is_total_and_reads_escapes() {
        let (l, v) = sample("{a=\"x,y=z\",b=\"q\\\"}\\\\\"} 1.5 123").unwrap();
        assert_eq!(l, vec![("a".to_string(), "x,y=z".to_string()), ("b".to_string(), "q\"}\\".to_string())]);
        assert_eq!(v, 1.5);
        assert_eq!(sample(" 2").unwrap(), (vec![], 2.0));
        for bad in ["", "{", "{a", "{a=", "{a=\"", "{a=\"x\"", "{a=\"x\"}", "_other 1", "{a=x} 1", "{} nope", "{a=\"\\\"} 1"] {
            assert!(sample(bad).is_none(), "{bad:?}");
        }
    }

    fn capture_without_lora(text: &str) -> String {
        text.lines().filter(|l| !l.contains("lora")).map(|l| format!("{l}\n")).collect()
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
