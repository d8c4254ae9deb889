use super::*;

fn msgs(h: &mut PrefixHasher, raw: &[&str]) -> Option<u64> {
    for m in raw {
        h.push(m.as_bytes(), false);
        h.end_message();
    }
    h.end_messages();
    h.finish()
}

#[test]
fn a_conversation_keeps_its_key_and_conversations_differ() {
    let cfg = AffinityConfig::default();
    let sys = r#"{"role": "system", "content": "You are terse."}"#;
    let u1 = r#"{"role": "user", "content": "hello"}"#;
    let a1 = r#"{"role": "assistant", "content": "hi"}"#;
    let u2 = r#"{"role": "user", "content": "more"}"#;
    let t1 = msgs(&mut PrefixHasher::new(&cfg), &[sys, u1]);
    let t2 = msgs(&mut PrefixHasher::new(&cfg), &[sys, u1, a1, u2]);
    assert!(t1.is_some());
    assert_eq!(t1, t2);
    let other = msgs(&mut PrefixHasher::new(&cfg), &[sys, r#"{"role": "user", "content": "bye"}"#]);
    assert_ne!(t1, other);
    // No system prompt: the first message is the key.
    assert_eq!(msgs(&mut PrefixHasher::new(&cfg), &[u1]), msgs(&mut PrefixHasher::new(&cfg), &[u1, a1, u2]));
    assert_eq!(msgs(&mut PrefixHasher::new(&cfg), &[]), None);
}

#[test]
fn bounded_bytes_per_message() {
    let cfg = AffinityConfig { message_bytes: 8, ..AffinityConfig::default() };
    let mut h = PrefixHasher::new(&cfg);
    h.push(&[b'x'; 100_000], false);
    assert!(h.cur.len() <= 8);
    h.end_message();
    assert!(!h.wants_more());
}

#[test]
fn a_growing_prompt_keeps_its_key_once_a_block_long() {
    let cfg = AffinityConfig::default();
    let key = |p: &str| {
        let mut h = PrefixHasher::new(&cfg);
        h.push(p.as_bytes(), true);
        h.end_prompt();
        h.finish()
    };
    let base = "a".repeat(300);
    assert_eq!(key(&base), key(&format!("{base}{}", "b".repeat(200))));
    assert_ne!(key("short one"), key("short two"));
    let long = "c".repeat(5_000);
    assert_eq!(key(&long), key(&format!("{long} and more")));
}

#[test]
fn instruction_roles() {
    assert!(is_instruction(br#"{"role" : "system","content":"x"}"#));
    assert!(is_instruction(br#"{"content":"x","role":"developer"}"#));
    assert!(!is_instruction(br#"{"role":"user","content":"system"}"#));
    assert!(!is_instruction(br#"{"content":"x"}"#));
}

#[test]
fn key_sources_in_order() {
    let cfg = AffinityConfig::default();
    assert_eq!(Key::choose(&cfg, Some("s1"), Some("u"), Some(7)).map(|k| k.source), Some(KeySource::Session));
    assert_eq!(Key::choose(&cfg, Some(""), Some("u"), Some(7)).map(|k| k.source), Some(KeySource::User));
    assert_eq!(Key::choose(&cfg, None, None, Some(7)), Some(Key { hash: 7, source: KeySource::Prefix }));
    let no_user = AffinityConfig { user_field: false, ..cfg.clone() };
    assert_eq!(Key::choose(&no_user, None, Some("u"), None), None);
    let off = AffinityConfig { enabled: false, ..cfg };
    assert_eq!(Key::choose(&off, Some("s"), Some("u"), Some(7)), None);
}

proptest::proptest! {
    /// `choose` keeps a placement only within the keep bound, and otherwise takes a worker
    /// under the balance bound (the highest weight there) or, with none, a least loaded one.
    #[test]
    fn choose_respects_the_bounds(
        cands in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u8..12, 0u64..6), 1..10),
        placed in proptest::option::of(0u64..8), placed_admitted: bool, eps in 0.0f64..1.0,
    ) {
        let within: Vec<Cand> = cands.iter().map(|(w, l, a)| Cand { weight: *w, load: f64::from(*l), addr_hash: *a }).collect();
        let cfg = AffinityConfig { balance_epsilon: eps, ..AffinityConfig::default() };
        let winner = within.iter().map(|c| c.weight).max();
        let (i, o) = choose(&within, placed, placed_admitted, winner, &cfg);
        proptest::prop_assert!(i < within.len());
        let n = within.len();
        let total: f64 = within.iter().map(|c| c.load).sum();
        let c = within[i];
        let kept = placed == Some(c.addr_hash) && within.iter().position(|x| Some(x.addr_hash) == placed) == Some(i)
            && c.load + 1.0 <= bound(cfg.keep_epsilon, total, n) + cfg.keep_slack;
        if !kept {
            let cap = bound(eps, total, n);
            let under: Vec<&Cand> = within.iter().filter(|x| x.load + 1.0 <= cap).collect();
            if under.is_empty() {
                proptest::prop_assert!(within.iter().all(|x| x.load >= c.load));
            } else {
                proptest::prop_assert!(c.load + 1.0 <= cap);
                proptest::prop_assert!(under.iter().all(|x| x.weight <= c.weight));
            }
        }
        proptest::prop_assert!(o != Outcome::None);
        if o == Outcome::Placed {
            proptest::prop_assert!(placed.is_none() && Some(c.weight) != winner);
        }
    }
}

#[test]
fn rendezvous_spreads_keys_evenly_and_moves_few_on_a_departure() {
    let addrs: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:8000")).collect();
    let winner = |k: u64, set: &[String]| set.iter().max_by_key(|a| weight(k, a)).cloned();
    let mut counts = std::collections::HashMap::new();
    let mut moved = 0;
    for k in 0..10_000u64 {
        let key = Key::session(&format!("s{k}"), KeySource::Session).hash;
        let w = winner(key, &addrs);
        *counts.entry(w.clone()).or_insert(0) += 1;
        let w4 = winner(key, &addrs[..4]);
        if w != w4 {
            moved += 1;
            assert_eq!(w.as_deref(), Some(addrs[4].as_str()), "only the departed worker's keys move");
        }
    }
    for c in counts.values() {
        assert!((1_800..=2_200).contains(c), "uneven: {counts:?}");
    }
    assert!((1_800..=2_200).contains(&moved), "{moved}");
}
