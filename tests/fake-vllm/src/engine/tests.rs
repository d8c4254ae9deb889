use super::*;

fn cfg() -> EngineConfig {
    EngineConfig {
        worker_id: "w7".into(),
        ttft: Duration::ZERO,
        inter_token: Duration::ZERO,
        max_num_seqs: 1,
        kv_capacity_tokens: 100,
        reset_after_tokens: None,
        error_before_token: false,
        error_after_tokens: None,
        abort_before_token: false,
        fail_status: None,
        slow_factor: 5.0,
        flaky: 0.0,
        flaky_seed: None,
        prefill_per_token: Duration::ZERO,
        prefix_cache_tokens: 0,
        lora: LoraConfig::default(),
    }
}

#[tokio::test]
async fn tokens_mark_the_worker_and_the_last_one_is_flagged() {
    let engine = Arc::new(Engine::new(cfg(), "tiny"));
    let mut g = engine.generate(3, 2);
    assert_eq!(
        g.next().await,
        Some(Event::Token {
            index: 0,
            text: " w7:0".into(),
            last: false
        })
    );
    assert_eq!(engine.metrics.running.load(Ordering::Relaxed), 1);
    assert_eq!(
        g.next().await,
        Some(Event::Token {
            index: 1,
            text: " w7:1".into(),
            last: true
        })
    );
    assert_eq!(g.next().await, None);
    assert_eq!(engine.metrics.running.load(Ordering::Relaxed), 0);
    assert_eq!(engine.metrics.kv_tokens.load(Ordering::Relaxed), 0);
    assert_eq!(engine.metrics.generation_tokens.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn reset_comes_after_n_tokens() {
    let engine = Arc::new(Engine::new(
        EngineConfig {
            reset_after_tokens: Some(1),
            ..cfg()
        },
        "tiny",
    ));
    let mut g = engine.generate(3, 5);
    assert!(matches!(
        g.next().await,
        Some(Event::Token { index: 0, .. })
    ));
    assert_eq!(g.next().await, Some(Event::Reset));
    assert_eq!(g.next().await, None);
}

#[tokio::test]
async fn a_fault_replaces_the_first_token_and_frees_the_slot() {
    let engine = Arc::new(Engine::new(cfg(), "tiny"));
    for (fault, event) in [(Fault::Cut, Event::Cut), (Fault::EngineDead, Event::EngineDead), (Fault::Aborted, Event::Aborted)] {
        let mut g = engine.generate(3, 5).with_fault(Some(fault));
        assert_eq!(g.next().await, Some(event));
        assert_eq!(g.next().await, None);
        assert_eq!(engine.metrics.running.load(Ordering::Relaxed), 0);
    }
    assert_eq!(engine.metrics.generation_tokens.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn second_request_waits_for_the_slot() {
    let engine = Arc::new(Engine::new(cfg(), "tiny"));
    let mut a = engine.generate(1, 3);
    assert!(a.next().await.is_some());
    let mut b = engine.generate(1, 3);
    let waiter = tokio::spawn(async move { b.next().await });
    while engine.metrics.waiting.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    drop(a);
    assert!(waiter.await.ok().flatten().is_some());
    assert_eq!(engine.metrics.waiting.load(Ordering::Relaxed), 0);
}
