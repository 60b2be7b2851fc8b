//! Router: exchange kinds, bindings, exchange-to-exchange, declarations.

use std::sync::Arc;

use kelp_amqp::{FieldTable, FieldValue};

use super::super::*;
use super::{names, s, table};

fn router_with(queues: &[&str]) -> Router {
    let mut r = Router::new();
    for q in queues {
        r.add_queue(Arc::from(*q));
    }
    r
}

fn declare(r: &mut Router, name: &str, kind: &str) {
    r.declare_exchange(
        name,
        &ExchangeKind::parse(kind),
        ExchangeOptions::default(),
        &FieldTable::new(),
    )
    .unwrap();
}

fn route(r: &Router, x: &str, key: &str) -> Vec<String> {
    route_h(r, x, key, None)
}

fn route_h(r: &Router, x: &str, key: &str, headers: Option<&FieldTable>) -> Vec<String> {
    let mut out = RoutedQueues::new();
    r.route(x, key, headers, &mut out).unwrap();
    names(&out)
}

fn bind(r: &mut Router, q: &str, x: &str, key: &str) {
    r.bind_queue(q, x, key, &FieldTable::new()).unwrap();
}

#[test]
fn direct_routes_on_exact_key_only() {
    let mut r = router_with(&["q1", "q2", "q3"]);
    declare(&mut r, "x", "direct");
    bind(&mut r, "q1", "x", "red");
    bind(&mut r, "q2", "x", "red");
    bind(&mut r, "q3", "x", "green");
    bind(&mut r, "q3", "x", "blue");
    assert_eq!(route(&r, "x", "red"), ["q1", "q2"]);
    assert_eq!(route(&r, "x", "blue"), ["q3"]);
    assert!(route(&r, "x", "Red").is_empty());
    assert!(route(&r, "x", "red.x").is_empty());
    assert!(route(&r, "x", "").is_empty());
}

#[test]
fn default_exchange_routes_to_queue_named_by_key() {
    let r = router_with(&["tasks"]);
    assert_eq!(route(&r, "", "tasks"), ["tasks"]);
    assert!(route(&r, "", "missing").is_empty());
}

#[test]
fn missing_exchange_is_not_found() {
    let r = router_with(&[]);
    let err = r
        .route("nope", "k", None, &mut RoutedQueues::new())
        .unwrap_err();
    assert_eq!(err.amqp_reply_code(), 404);
    assert!(err.to_string().contains("exchange 'nope'"), "{err}");
}

#[test]
fn standard_exchanges_exist_with_their_kinds() {
    let r = Router::new();
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        let x = r.exchange(name).unwrap();
        assert_eq!(*x.kind(), kind);
        assert!(x.is_durable());
    }
}

#[test]
fn fanout_ignores_the_key() {
    let mut r = router_with(&["a", "b"]);
    declare(&mut r, "f", "fanout");
    bind(&mut r, "a", "f", "");
    bind(&mut r, "b", "f", "whatever");
    assert_eq!(route(&r, "f", "anything"), ["a", "b"]);
    assert_eq!(route(&r, "f", ""), ["a", "b"]);
}

/// (pattern, key, matches)
const TOPIC_CASES: &[(&str, &str, bool)] = &[
    ("#", "", true),
    ("#", "a", true),
    ("#", "a.b.c", true),
    ("#", ".", true),
    ("*", "", false),
    ("*", "a", true),
    ("*", "a.b", false),
    ("*.*", "a.b", true),
    ("*.*", "a", false),
    ("*.*", "a.b.c", false),
    ("*.*", ".", true),
    ("a.#.b", "a.b", true),
    ("a.#.b", "a.x.b", true),
    ("a.#.b", "a.x.y.b", true),
    ("a.#.b", "a.b.c", false),
    ("a.#.b", "b.a.b", false),
    ("a.#", "a", true),
    ("a.#", "a.b.c", true),
    ("a.#", "ab", false),
    ("#.a", "a", true),
    ("#.a", "x.y.a", true),
    ("#.a", "a.x", false),
    ("a.*", "a.", true),
    ("a.*", "a", false),
    ("a..b", "a..b", true),
    ("a.*.b", "a..b", true),
    ("a.*.b", "a.b", false),
    ("", "", true),
    ("", "a", false),
    ("a", "", false),
    ("#.#", "", true),
    ("#.#", "a.b", true),
    ("a.#.#.b", "a.b", true),
    ("#.*.#", "", false),
    ("#.*.#", "x", true),
    ("#.a.#", "a.a", true),
    ("*.#.*", "a", false),
    ("*.#.*", "a.b", true),
    ("*.#.*", "a.b.c.d", true),
    ("stock.usd.*", "stock.usd.nyse", true),
    ("stock.usd.*", "stock.eur.nyse", false),
];

#[test]
fn topic_patterns_match_like_rabbitmq() {
    for &(pattern, key, want) in TOPIC_CASES {
        let mut r = router_with(&["q"]);
        declare(&mut r, "t", "topic");
        bind(&mut r, "q", "t", pattern);
        let got = !route(&r, "t", key).is_empty();
        assert_eq!(got, want, "pattern {pattern:?} key {key:?}");
        assert_eq!(
            topic_matches(pattern, key),
            want,
            "reference {pattern:?} {key:?}"
        );
    }
}

#[test]
fn topic_many_bindings_and_dedup() {
    let mut r = router_with(&["q1", "q2", "q3"]);
    declare(&mut r, "t", "topic");
    bind(&mut r, "q1", "t", "a.*");
    bind(&mut r, "q1", "t", "a.#");
    bind(&mut r, "q1", "t", "#.b");
    bind(&mut r, "q2", "t", "*.b");
    bind(&mut r, "q3", "t", "c.#");
    assert_eq!(route(&r, "t", "a.b"), ["q1", "q2"]);
    assert_eq!(route(&r, "t", "c"), ["q3"]);
    // Unbinding one of q1's patterns leaves the others working.
    r.unbind_queue("q1", "t", "a.*", &FieldTable::new())
        .unwrap();
    assert_eq!(route(&r, "t", "a.b"), ["q1", "q2"]);
    r.unbind_queue("q1", "t", "a.#", &FieldTable::new())
        .unwrap();
    r.unbind_queue("q1", "t", "#.b", &FieldTable::new())
        .unwrap();
    assert_eq!(route(&r, "t", "a.b"), ["q2"]);
    assert!(route(&r, "t", "a.c").is_empty());
}

#[test]
fn trie_prunes_and_counts() {
    let mut t: TopicTrie<u32> = TopicTrie::new();
    t.insert("a.*.#", 1);
    t.insert("a.*.#", 1);
    t.insert("a.b", 2);
    assert_eq!(t.len(), 3);
    assert!(t.remove("a.*.#", &1));
    assert!(t.remove("a.*.#", &1));
    assert!(!t.remove("a.*.#", &1));
    assert!(!t.remove("a.c", &2));
    let mut hits = Vec::new();
    t.for_each_match("a.x.y", &mut |v| hits.push(*v));
    assert!(hits.is_empty());
    t.for_each_match("a.b", &mut |v| hits.push(*v));
    assert_eq!(hits, [2]);
    assert!(t.remove("a.b", &2));
    assert!(t.is_empty());
}

fn headers(pairs: &[(&str, FieldValue)]) -> FieldTable {
    table(pairs)
}

fn headers_router(bind_args: FieldTable) -> Router {
    let mut r = router_with(&["q"]);
    declare(&mut r, "h", "headers");
    r.bind_queue("q", "h", "", &bind_args).unwrap();
    r
}

fn hmatch(r: &Router, h: &FieldTable) -> bool {
    !route_h(r, "h", "ignored", Some(h)).is_empty()
}

#[test]
fn headers_all_requires_every_key() {
    let r = headers_router(table(&[
        ("x-match", s("all")),
        ("format", s("pdf")),
        ("type", s("report")),
    ]));
    assert!(hmatch(
        &r,
        &headers(&[("format", s("pdf")), ("type", s("report"))])
    ));
    assert!(hmatch(
        &r,
        &headers(&[
            ("format", s("pdf")),
            ("type", s("report")),
            ("extra", s("1"))
        ])
    ));
    assert!(!hmatch(&r, &headers(&[("format", s("pdf"))])));
    assert!(!hmatch(
        &r,
        &headers(&[("format", s("pdf")), ("type", s("log"))])
    ));
    assert!(route_h(&r, "h", "", None).is_empty());
}

#[test]
fn headers_default_mode_is_all() {
    let r = headers_router(table(&[("a", s("1")), ("b", s("2"))]));
    assert!(!hmatch(&r, &headers(&[("a", s("1"))])));
    assert!(hmatch(&r, &headers(&[("a", s("1")), ("b", s("2"))])));
}

#[test]
fn headers_any_requires_one_key() {
    let r = headers_router(table(&[
        ("x-match", s("any")),
        ("format", s("pdf")),
        ("type", s("report")),
    ]));
    assert!(hmatch(&r, &headers(&[("type", s("report"))])));
    assert!(hmatch(
        &r,
        &headers(&[("format", s("pdf")), ("type", s("x"))])
    ));
    assert!(!hmatch(&r, &headers(&[("format", s("zip"))])));
    assert!(!hmatch(&r, &headers(&[])));
}

#[test]
fn headers_x_keys_ignored_unless_with_x() {
    // With `all`, the x- argument is ignored: a message without it matches.
    let all = headers_router(table(&[
        ("x-match", s("all")),
        ("x-tenant", s("t1")),
        ("k", s("v")),
    ]));
    assert!(hmatch(&all, &headers(&[("k", s("v"))])));
    // With `any`, an x- key alone cannot make a match.
    let any = headers_router(table(&[("x-match", s("any")), ("x-tenant", s("t1"))]));
    assert!(!hmatch(&any, &headers(&[("x-tenant", s("t1"))])));
    // all-with-x requires it.
    let allx = headers_router(table(&[
        ("x-match", s("all-with-x")),
        ("x-tenant", s("t1")),
        ("k", s("v")),
    ]));
    assert!(!hmatch(&allx, &headers(&[("k", s("v"))])));
    assert!(hmatch(
        &allx,
        &headers(&[("k", s("v")), ("x-tenant", s("t1"))])
    ));
    // any-with-x accepts it alone.
    let anyx = headers_router(table(&[
        ("x-match", s("any-with-x")),
        ("x-tenant", s("t1")),
    ]));
    assert!(hmatch(&anyx, &headers(&[("x-tenant", s("t1"))])));
}

#[test]
fn headers_empty_arguments_all_matches_everything_any_nothing() {
    let all = headers_router(FieldTable::new());
    assert!(hmatch(&all, &headers(&[])));
    assert!(hmatch(&all, &headers(&[("a", s("b"))])));
    let any = headers_router(table(&[("x-match", s("any"))]));
    assert!(!hmatch(&any, &headers(&[("a", s("b"))])));
}

#[test]
fn headers_void_means_presence_and_numbers_compare_across_types() {
    let r = headers_router(table(&[
        ("flag", FieldValue::Void),
        ("n", FieldValue::I32(5)),
    ]));
    assert!(hmatch(
        &r,
        &headers(&[("flag", s("anything")), ("n", FieldValue::I64(5))])
    ));
    assert!(hmatch(
        &r,
        &headers(&[("flag", FieldValue::Bool(false)), ("n", FieldValue::U8(5))])
    ));
    assert!(!hmatch(&r, &headers(&[("n", FieldValue::I64(5))])));
    assert!(!hmatch(
        &r,
        &headers(&[("flag", s("x")), ("n", FieldValue::I64(6))])
    ));
    assert!(!hmatch(&r, &headers(&[("flag", s("x")), ("n", s("5"))])));
}

#[test]
fn headers_invalid_x_match_is_precondition_failed() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "h", "headers");
    let err = r
        .bind_queue("q", "h", "", &table(&[("x-match", s("most"))]))
        .unwrap_err();
    assert_eq!(err.amqp_reply_code(), 406);
    assert!(err.to_string().contains("x-match"), "{err}");
}

#[test]
fn exchange_to_exchange_is_followed_transitively() {
    let mut r = router_with(&["q1", "q2", "q3"]);
    declare(&mut r, "a", "topic");
    declare(&mut r, "b", "direct");
    declare(&mut r, "c", "fanout");
    r.bind_exchange("b", "a", "logs.#", &FieldTable::new())
        .unwrap();
    r.bind_exchange("c", "b", "logs.error", &FieldTable::new())
        .unwrap();
    bind(&mut r, "q1", "a", "logs.*");
    bind(&mut r, "q2", "b", "logs.error");
    bind(&mut r, "q3", "c", "");
    assert_eq!(route(&r, "a", "logs.error"), ["q1", "q2", "q3"]);
    assert_eq!(route(&r, "a", "logs.info"), ["q1"]);
    assert!(route(&r, "a", "logs.x.y").is_empty());
    r.unbind_exchange("c", "b", "logs.error", &FieldTable::new())
        .unwrap();
    assert_eq!(route(&r, "a", "logs.error"), ["q1", "q2"]);
}

#[test]
fn exchange_cycles_terminate_and_deliver_once() {
    let mut r = router_with(&["q1", "q2"]);
    declare(&mut r, "a", "fanout");
    declare(&mut r, "b", "fanout");
    declare(&mut r, "c", "fanout");
    r.bind_exchange("b", "a", "", &FieldTable::new()).unwrap();
    r.bind_exchange("c", "b", "", &FieldTable::new()).unwrap();
    r.bind_exchange("a", "c", "", &FieldTable::new()).unwrap();
    r.bind_exchange("a", "a", "", &FieldTable::new()).unwrap();
    bind(&mut r, "q1", "a", "");
    bind(&mut r, "q1", "b", "");
    bind(&mut r, "q2", "c", "");
    assert_eq!(route(&r, "a", "k"), ["q1", "q2"]);
    assert_eq!(route(&r, "c", "k"), ["q1", "q2"]);
}

#[test]
fn a_queue_reached_many_ways_gets_one_copy() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "t", "topic");
    declare(&mut r, "f", "fanout");
    bind(&mut r, "q", "t", "a.*");
    bind(&mut r, "q", "t", "#");
    bind(&mut r, "q", "t", "a.b");
    r.bind_exchange("f", "t", "#", &FieldTable::new()).unwrap();
    bind(&mut r, "q", "f", "");
    let mut out = RoutedQueues::new();
    r.route("t", "a.b", None, &mut out).unwrap();
    assert_eq!(out.len(), 1);
}

#[test]
fn routed_queues_dedup_beyond_the_scan_threshold() {
    let qs: Vec<String> = (0..30).map(|i| format!("q{i:02}")).collect();
    let refs: Vec<&str> = qs.iter().map(String::as_str).collect();
    let mut r = router_with(&refs);
    declare(&mut r, "f1", "fanout");
    declare(&mut r, "f2", "fanout");
    r.bind_exchange("f2", "f1", "", &FieldTable::new()).unwrap();
    for q in &refs {
        bind(&mut r, q, "f1", "");
        bind(&mut r, q, "f2", "");
    }
    let got = route(&r, "f1", "");
    assert_eq!(got, qs);
}

#[test]
fn alternate_exchange_takes_unroutable_messages() {
    let mut r = router_with(&["main", "unrouted"]);
    r.declare_exchange(
        "x",
        &ExchangeKind::Direct,
        ExchangeOptions::default(),
        &table(&[("alternate-exchange", s("ae"))]),
    )
    .unwrap();
    declare(&mut r, "ae", "fanout");
    bind(&mut r, "main", "x", "k");
    bind(&mut r, "unrouted", "ae", "");
    assert_eq!(route(&r, "x", "k"), ["main"]);
    assert_eq!(route(&r, "x", "other"), ["unrouted"]);
}

#[test]
fn binding_twice_is_idempotent_and_unbinding_missing_is_ok() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "x", "direct");
    assert!(r.bind_queue("q", "x", "k", &FieldTable::new()).unwrap());
    assert!(!r.bind_queue("q", "x", "k", &FieldTable::new()).unwrap());
    assert_eq!(r.exchange("x").unwrap().binding_count(), 1);
    assert!(r.unbind_queue("q", "x", "k", &FieldTable::new()).unwrap());
    assert!(!r.unbind_queue("q", "x", "k", &FieldTable::new()).unwrap());
    assert!(route(&r, "x", "k").is_empty());
}

#[test]
fn binding_errors() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "x", "direct");
    let e = r
        .bind_queue("missing", "x", "k", &FieldTable::new())
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    assert!(e.to_string().contains("queue 'missing'"));
    let e = r
        .bind_queue("q", "nope", "k", &FieldTable::new())
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    let e = r.bind_queue("q", "", "k", &FieldTable::new()).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    let e = r
        .bind_exchange("", "x", "k", &FieldTable::new())
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
}

#[test]
fn deleting_an_exchange_removes_bindings_both_ways() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "a", "fanout");
    declare(&mut r, "b", "fanout");
    r.bind_exchange("b", "a", "", &FieldTable::new()).unwrap();
    bind(&mut r, "q", "b", "");
    assert_eq!(route(&r, "a", ""), ["q"]);
    assert!(r.delete_exchange("b", false).unwrap());
    assert!(route(&r, "a", "").is_empty());
    assert_eq!(r.exchange("a").unwrap().binding_count(), 0);
    // Redeclared b starts without bindings, and a no longer forwards to it.
    declare(&mut r, "b", "fanout");
    assert!(route(&r, "a", "").is_empty());
    assert!(route(&r, "b", "").is_empty());
    assert!(!r.delete_exchange("b-never", false).unwrap());
}

#[test]
fn delete_if_unused_refuses_a_source_with_bindings() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "x", "direct");
    bind(&mut r, "q", "x", "k");
    let e = r.delete_exchange("x", true).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    r.unbind_queue("q", "x", "k", &FieldTable::new()).unwrap();
    assert!(r.delete_exchange("x", true).unwrap());
}

#[test]
fn auto_delete_exchange_goes_with_its_last_binding() {
    let mut r = router_with(&["q1", "q2"]);
    let opts = ExchangeOptions {
        auto_delete: true,
        ..Default::default()
    };
    r.declare_exchange("ad", &ExchangeKind::Fanout, opts, &FieldTable::new())
        .unwrap();
    bind(&mut r, "q1", "ad", "");
    bind(&mut r, "q2", "ad", "");
    r.unbind_queue("q1", "ad", "", &FieldTable::new()).unwrap();
    assert!(r.exchange("ad").is_some());
    // Removing the queue removes its binding, which was the last one.
    assert!(r.remove_queue("q2"));
    assert!(r.exchange("ad").is_none());
}

#[test]
fn removing_a_queue_removes_its_bindings() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "x", "direct");
    bind(&mut r, "q", "x", "k");
    r.remove_queue("q");
    r.add_queue(Arc::from("q"));
    assert!(route(&r, "x", "k").is_empty());
    assert_eq!(r.exchange("x").unwrap().binding_count(), 0);
}

#[test]
fn exchange_declare_semantics() {
    let mut r = Router::new();
    let none = FieldTable::new();
    let d = ExchangeOptions::default();
    assert!(r
        .declare_exchange("x", &ExchangeKind::Direct, d, &none)
        .unwrap());
    assert!(!r
        .declare_exchange("x", &ExchangeKind::Direct, d, &none)
        .unwrap());
    let e = r
        .declare_exchange("x", &ExchangeKind::Fanout, d, &none)
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(e.to_string().contains("'type'"), "{e}");
    assert!(e.to_string().contains("exchange 'x'"), "{e}");
    let durable = ExchangeOptions { durable: true, ..d };
    let e = r
        .declare_exchange("x", &ExchangeKind::Direct, durable, &none)
        .unwrap_err();
    assert!(matches!(e, BrokerError::Inequivalent { ref argument, .. } if argument == "durable"));
    let e = r
        .declare_exchange(
            "x",
            &ExchangeKind::Direct,
            d,
            &table(&[("alternate-exchange", s("ae"))]),
        )
        .unwrap_err();
    assert!(
        matches!(e, BrokerError::Inequivalent { ref argument, .. } if argument == "alternate-exchange")
    );
    // Passive: existence only, flags ignored.
    let passive = ExchangeOptions {
        passive: true,
        durable: true,
        ..d
    };
    r.declare_exchange("x", &ExchangeKind::Fanout, passive, &none)
        .unwrap();
    let e = r
        .declare_exchange("missing", &ExchangeKind::Direct, passive, &none)
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    // Reserved names.
    let e = r
        .declare_exchange("amq.custom", &ExchangeKind::Direct, d, &none)
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    // Redeclaring a standard exchange equivalently is fine, differently is not.
    r.declare_exchange("amq.direct", &ExchangeKind::Direct, durable, &none)
        .unwrap();
    assert_eq!(
        r.declare_exchange("amq.direct", &ExchangeKind::Direct, d, &none)
            .unwrap_err()
            .amqp_reply_code(),
        406
    );
    assert_eq!(
        r.delete_exchange("amq.direct", false)
            .unwrap_err()
            .amqp_reply_code(),
        403
    );
    assert_eq!(
        r.declare_exchange("", &ExchangeKind::Direct, d, &none)
            .unwrap_err()
            .amqp_reply_code(),
        403
    );
    assert_eq!(
        r.delete_exchange("", false).unwrap_err().amqp_reply_code(),
        403
    );
    let e = r
        .declare_exchange("y", &ExchangeKind::parse("x-consistent-hash"), d, &none)
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 503);
    assert!(e.is_connection_error());
    let e = r
        .declare_exchange("y", &ExchangeKind::parse("x-delayed-message"), d, &none)
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
}

#[test]
fn exchange_kind_names_round_trip() {
    for k in ["direct", "topic", "fanout", "headers", "x-delayed-message"] {
        assert_eq!(ExchangeKind::parse(k).as_str(), k);
        assert_eq!(ExchangeKind::from(k).to_string(), k);
    }
    assert_eq!(
        ExchangeKind::parse("x-delayed-message"),
        ExchangeKind::Other("x-delayed-message".into())
    );
}

#[test]
fn bindings_are_listed() {
    let mut r = router_with(&["q"]);
    declare(&mut r, "x", "direct");
    declare(&mut r, "y", "direct");
    bind(&mut r, "q", "x", "k1");
    bind(&mut r, "q", "x", "k2");
    r.bind_exchange("y", "x", "k3", &FieldTable::new()).unwrap();
    let mut keys: Vec<String> = r
        .bindings("x")
        .into_iter()
        .map(|b| format!("{}:{}", b.destination.name(), b.routing_key))
        .collect();
    keys.sort();
    assert_eq!(keys, ["q:k1", "q:k2", "y:k3"]);
}
