//! `/metrics` against the real vLLM 0.32.0 capture, and metrics that follow the load.

mod common;

use std::time::{Duration, Instant};

use common::{capture, Exchange, Exposition, Worker};

const CORE: &[(&str, &str)] = &[
    ("vllm:num_requests_running", "gauge"),
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:prompt_tokens_total", "counter"),
    ("vllm:prompt_tokens_created", "gauge"),
    ("vllm:generation_tokens_total", "counter"),
    ("vllm:generation_tokens_created", "gauge"),
    ("vllm:num_preemptions_total", "counter"),
    ("vllm:num_preemptions_created", "gauge"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:time_to_first_token_seconds_created", "gauge"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds_created", "gauge"),
    ("vllm:request_success_total", "counter"),
    ("vllm:request_success_created", "gauge"),
];

fn buckets(e: &Exposition, name: &str) -> Vec<String> {
    let bucket = format!("{name}_bucket");
    e.samples
        .iter()
        .filter(|(n, _, _)| *n == bucket)
        .filter_map(|(_, l, _)| l.get("le").cloned())
        .collect()
}

#[test]
fn metrics_match_the_vllm_capture() {
    let real = Exposition::parse(&capture("metrics-idle.txt"));
    let w = Worker::start(&["--model", "tiny"]);
    let r = w.get("/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=1.0.0; charset=utf-8")
    );
    let fake = Exposition::parse(&r.text());

    // Every family the fake exposes is a real one, with the same type.
    for (name, kind) in &fake.types {
        assert_eq!(
            real.types.get(name),
            Some(kind),
            "family {name} ({kind}) is not in the capture as such"
        );
    }
    for (name, kind) in CORE {
        assert_eq!(
            fake.types.get(*name).map(String::as_str),
            Some(*kind),
            "core family {name} missing"
        );
    }

    // Every sample name is known to the capture with the same label names.
    let real_labels = real.label_names();
    for (name, sets) in fake.label_names() {
        assert!(
            fake.family_of(&name).is_some(),
            "sample {name} has no # TYPE"
        );
        let real_sets = real_labels
            .get(&name)
            .unwrap_or_else(|| panic!("sample {name} is not in the capture"));
        assert_eq!(&sets, real_sets, "label names of {name}");
    }

    // Same histogram buckets, same finished_reason values, same model label.
    for h in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:iteration_tokens_total",
    ] {
        assert_eq!(buckets(&fake, h), buckets(&real, h), "buckets of {h}");
    }
    let reasons = |e: &Exposition| -> Vec<String> {
        e.samples
            .iter()
            .filter(|(n, _, _)| n == "vllm:request_success_total")
            .filter_map(|(_, l, _)| l.get("finished_reason").cloned())
            .collect()
    };
    assert_eq!(reasons(&fake), reasons(&real));
    assert_eq!(
        fake.value(
            "vllm:num_requests_running",
            &[("engine", "0"), ("model_name", "tiny")]
        ),
        0.0
    );
}

#[test]
fn metrics_follow_the_load() {
    // One slot, slow tokens: the first stream runs, the second waits.
    let w = Worker::start(&[
        "--id",
        "m1",
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "20",
        "--max-num-seqs",
        "1",
    ]);
    let before = w.metrics();
    assert_eq!(before.value("vllm:generation_tokens_total", &[]), 0.0);

    let body = r#"{"model":"tiny","messages":[{"role":"user","content":"one two three"}],"stream":true,"max_tokens":40}"#;
    let mut first =
        Exchange::open(&w.addr, "POST", "/v1/chat/completions", Some(body)).expect("first stream");
    assert_eq!(first.status, 200);
    assert!(first.next_chunk().expect("role event").is_some());
    let second =
        Exchange::open(&w.addr, "POST", "/v1/chat/completions", Some(body)).expect("second stream");
    assert_eq!(
        second.status, 200,
        "a queued request gets its headers at once"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    let busy = loop {
        let m = w.metrics();
        if m.value("vllm:num_requests_waiting", &[]) == 1.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the second request never showed as waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(busy.value("vllm:num_requests_running", &[]), 1.0);
    assert!(busy.value("vllm:kv_cache_usage_perc", &[]) > 0.0);
    assert!(busy.value("vllm:kv_cache_usage_perc", &[]) <= 1.0);
    assert!(busy.value("vllm:prompt_tokens_total", &[]) > 0.0);
    assert_eq!(
        busy.value("vllm:time_to_first_token_seconds_count", &[]),
        1.0
    );

    // Closing the first stream frees its slot: the waiting one runs, the abort is counted.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let m = w.metrics();
        if m.value("vllm:num_requests_waiting", &[]) == 0.0
            && m.value("vllm:num_requests_running", &[]) == 1.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "the queued request never ran");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(after.value("vllm:generation_tokens_total", &[]) >= 1.0);
    assert_eq!(
        after.value(
            "vllm:request_success_total",
            &[("finished_reason", "abort")]
        ),
        1.0
    );

    let done = second.finish();
    assert!(done.error.is_none(), "second stream ended cleanly");
    let end = w.metrics();
    assert_eq!(end.value("vllm:num_requests_running", &[]), 0.0);
    assert_eq!(end.value("vllm:kv_cache_usage_perc", &[]), 0.0);
    assert_eq!(
        end.value(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        1.0
    );
    assert_eq!(
        end.value("vllm:e2e_request_latency_seconds_count", &[]),
        2.0
    );
    assert!(end.value("vllm:generation_tokens_total", &[]) >= 41.0);
    assert!(end.value("vllm:time_to_first_token_seconds_sum", &[]) > 0.0);
}

/// The prefix cache: a conversation's second turn hits the blocks of its first, counted in
/// vLLM's `prefix_cache_*` counters, and its time to first token pays only the uncached part.
#[test]
fn prefix_cache_hits_and_shortens_the_first_token() {
    // 1 ms per uncached token on top of a 0 ms TTFT, no decode delay.
    let w = Worker::start(&["--ttft-ms", "0", "--tokens-per-s", "0", "--prefill-us-per-token", "1000"]);
    let system = "rule ".repeat(300);
    let turn = |history: &str| {
        let body = format!(
            r#"{{"model":"tiny","max_tokens":2,"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"hello"}}{history}]}}"#
        );
        let t0 = Instant::now();
        let r = w.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        (t0.elapsed(), r.json()["usage"]["prompt_tokens"].as_u64().unwrap_or(0))
    };
    let (cold, p1) = turn("");
    let m = w.metrics();
    assert_eq!(m.value("vllm:prefix_cache_queries_total", &[]), p1 as f64);
    assert_eq!(m.value("vllm:prefix_cache_hits_total", &[]), 0.0);
    let (warm, p2) = turn(r#",{"role":"assistant","content":"w0:0 w0:1"},{"role":"user","content":"again"}"#);
    let m = w.metrics();
    assert_eq!(m.value("vllm:prefix_cache_queries_total", &[]), (p1 + p2) as f64);
    let hits = m.value("vllm:prefix_cache_hits_total", &[]);
    // All whole blocks of turn 1 but the one with its generation prompt.
    assert_eq!(hits, ((p1 - 2) / 16 * 16) as f64, "p1 {p1} p2 {p2}");
    // ~300 ms of prefill cold, ~20 ms warm.
    assert!(cold >= Duration::from_millis(290), "cold {cold:?}");
    assert!(warm < cold / 3, "warm {warm:?} vs cold {cold:?}");
}

/// LoRA adapters as vLLM serves them: listed as models with their base as parent, the same
/// `vllm:lora_requests_info` family as the real capture (labels and type), the newest series
/// naming what runs, and a load delay only for an adapter that is not loaded (an LRU of
/// `--max-loras`).
#[test]
fn lora_adapters_are_models_with_a_load_delay_and_vllms_info_gauge() {
    let w = Worker::start(&[
        "--ttft-ms", "0", "--tokens-per-s", "0", "--lora-modules", "sql=/adapters/sql", "chat=/adapters/chat",
        "--max-loras", "1", "--lora-load-ms", "300",
    ]);
    let models = w.get("/v1/models").json();
    let ids: Vec<(String, serde_json::Value)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_owned(), m["parent"].clone()))
        .collect();
    assert_eq!(
        ids,
        vec![("tiny".into(), serde_json::Value::Null), ("sql".into(), "tiny".into()), ("chat".into(), "tiny".into())]
    );
    let real = Exposition::parse(&capture("metrics-lora.txt"));
    let fake = w.metrics();
    let name = "vllm:lora_requests_info";
    assert_eq!(fake.types.get(name), real.types.get(name));
    assert_eq!(fake.label_names().get(name), real.label_names().get(name));
    let ask = |model: &str| {
        let t0 = Instant::now();
        let r = w.post("/v1/completions", &format!(r#"{{"model":"{model}","prompt":"hi","max_tokens":1}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
        t0.elapsed()
    };
    let cold = ask("sql");
    let warm = ask("sql");
    let swapped = ask("chat");
    let base = ask("tiny");
    assert!(cold >= Duration::from_millis(290), "cold {cold:?}");
    assert!(warm < Duration::from_millis(200), "warm {warm:?}");
    assert!(swapped >= Duration::from_millis(290), "max_loras 1: chat evicts sql ({swapped:?})");
    assert!(base < Duration::from_millis(200), "the base model loads nothing ({base:?})");
    assert!(ask("sql") >= Duration::from_millis(290), "sql was evicted");
    // Idle now: the newest series names nothing, an older one names sql.
    let m = w.metrics();
    let series: Vec<&(String, std::collections::BTreeMap<String, String>, f64)> =
        m.samples.iter().filter(|(n, _, _)| n == name).collect();
    let newest = series.iter().max_by(|a, b| a.2.total_cmp(&b.2)).unwrap();
    assert_eq!(newest.1.get("running_lora_adapters").map(String::as_str), Some(""));
    assert_eq!(newest.1.get("max_lora").map(String::as_str), Some("1"));
    assert!(series.iter().any(|s| s.1.get("running_lora_adapters").map(String::as_str) == Some("sql")));
    assert!(newest.2 > 1.7e9, "a Unix time: {}", newest.2);
}
