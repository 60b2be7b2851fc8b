//! Routing: every exchange type, exchange-to-exchange bindings, the default exchange.

use kelp::amqp::FieldTable;
use kelp::{Binding, Exchange, PublishOptions};

use crate::common::*;

conformance_tests! {
    direct_routes_by_exact_key,
    one_copy_per_queue_however_many_bindings_match,
    #[not_on(redis; "N/A on redis: Kombu's topic regexes differ from AMQP at the edges (`a.*` needs a non-empty word, `a.#` needs the dot)")]
    topic_star_matches_one_word,
    #[not_on(redis; "N/A on redis: Kombu's topic regexes differ from AMQP at the edges (`a.*` needs a non-empty word, `a.#` needs the dot)")]
    topic_hash_matches_zero_or_more_words,
    #[not_on(redis; "N/A on redis: Kombu's fanout is PUB/SUB, only consumers listening at publish time get a message")]
    fanout_ignores_routing_key,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    headers_match_all,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    headers_match_any,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    exchange_to_exchange_binding,
    default_exchange_routes_by_queue_name,
    unbind_stops_routing,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    publish_to_missing_exchange_is_404,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    alternate_exchange_takes_unroutable,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    headers_match_edge_cases,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    exchange_binding_cycle_delivers_once,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    default_and_reserved_exchanges_are_refused,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    internal_exchange_only_reachable_through_bindings,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    auto_delete_exchange_and_if_unused,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no headers, internal or alternate exchanges nor exchange-to-exchange bindings")]
    alternate_exchange_counts_as_routed_for_mandatory,
}

/// Declare a queue bound to `ex` with each of `keys`; returns its name.
async fn bound_queue(t: &Target, ch: &kelp::Channel, ex: &Exchange, keys: &[&str]) -> String {
    let mut q = t.queue("q");
    for k in keys {
        q = q.bind(Binding::new(ex.clone(), *k));
    }
    declare(ch, q).await.name
}

/// A direct exchange delivers to the queues bound with exactly the routing key.
async fn direct_routes_by_exact_key(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("direct", "direct");
    let a = bound_queue(t, &ch, &ex, &["a"]).await;
    let b = bound_queue(t, &ch, &ex, &["b"]).await;
    let ab = bound_queue(t, &ch, &ex, &["a", "b"]).await;
    for key in ["a", "b", "c", "A", "a.b", ""] {
        publish(&ch, &ex.name, key, key).await;
    }
    assert_eq!(drain(&ch, &a).await, ["a"]);
    assert_eq!(drain(&ch, &b).await, ["b"]);
    assert_eq!(drain(&ch, &ab).await, ["a", "b"]);
}

/// Two bindings of one queue that both match deliver the message once.
async fn one_copy_per_queue_however_many_bindings_match(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("topic", "topic");
    let q = bound_queue(t, &ch, &ex, &["a.*", "*.b", "#", "a.b"]).await;
    publish(&ch, &ex.name, "a.b", "once").await;
    assert_eq!(drain(&ch, &q).await, ["once"]);
}

/// Topic `*` matches exactly one word.
async fn topic_star_matches_one_word(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("topic", "topic");
    let q = bound_queue(t, &ch, &ex, &["a.*"]).await;
    let mid = bound_queue(t, &ch, &ex, &["*.b.*"]).await;
    for key in ["a.b", "a", "a.b.c", "b.a", "a.", "x.b.y", "b.y", "x.b.y.z"] {
        publish(&ch, &ex.name, key, key).await;
    }
    // "a." has an empty second word, which `*` matches (as in RabbitMQ).
    assert_eq!(drain(&ch, &q).await, ["a.b", "a."]);
    assert_eq!(drain(&ch, &mid).await, ["a.b.c", "x.b.y"]);
}

/// Topic `#` matches zero or more words, at the start, middle or end.
async fn topic_hash_matches_zero_or_more_words(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("topic", "topic");
    let tail = bound_queue(t, &ch, &ex, &["a.#"]).await;
    let head = bound_queue(t, &ch, &ex, &["#.z"]).await;
    let middle = bound_queue(t, &ch, &ex, &["a.#.z"]).await;
    let all = bound_queue(t, &ch, &ex, &["#"]).await;
    let keys = [
        "a", "a.b", "a.b.c", "z", "x.y.z", "a.z", "a.b.c.z", "b.a", "za", "",
    ];
    for key in keys {
        publish(&ch, &ex.name, key, key).await;
    }
    assert_eq!(
        drain(&ch, &tail).await,
        ["a", "a.b", "a.b.c", "a.z", "a.b.c.z"]
    );
    assert_eq!(drain(&ch, &head).await, ["z", "x.y.z", "a.z", "a.b.c.z"]);
    assert_eq!(drain(&ch, &middle).await, ["a.z", "a.b.c.z"]);
    assert_eq!(drain(&ch, &all).await, keys);
}

/// A fanout exchange delivers to every bound queue whatever the routing key.
async fn fanout_ignores_routing_key(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("fanout", "fanout");
    let a = bound_queue(t, &ch, &ex, &[""]).await;
    let b = bound_queue(t, &ch, &ex, &["something-else"]).await;
    publish(&ch, &ex.name, "any.key", "one").await;
    publish(&ch, &ex.name, "", "two").await;
    assert_eq!(drain(&ch, &a).await, ["one", "two"]);
    assert_eq!(drain(&ch, &b).await, ["one", "two"]);
}

/// Headers exchange with `x-match: all` needs every bound header (values equal); with
/// no `x-match` it defaults to `all`.
async fn headers_match_all(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("headers", "headers");
    declare_exchange(&ch, &ex).await;
    let all = declare(&ch, t.queue("all")).await;
    bind(
        &ch,
        &all,
        &ex,
        "",
        table(&[("x-match", "all"), ("kind", "pdf"), ("size", "big")]),
    )
    .await;
    let dflt = declare(&ch, t.queue("default")).await;
    bind(
        &ch,
        &dflt,
        &ex,
        "",
        table(&[("kind", "pdf"), ("size", "big")]),
    )
    .await;
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("both", &[("kind", "pdf"), ("size", "big")]),
        (
            "both+extra",
            &[("kind", "pdf"), ("size", "big"), ("colour", "red")],
        ),
        ("one", &[("kind", "pdf")]),
        ("wrong-value", &[("kind", "pdf"), ("size", "small")]),
        ("none", &[]),
    ];
    for (body, headers) in cases {
        let mut opts = PublishOptions::default();
        for (k, v) in headers {
            opts = opts.header(k, *v);
        }
        publish_with(&ch, &ex.name, "ignored", body, opts).await;
    }
    assert_eq!(drain(&ch, &all.name).await, ["both", "both+extra"]);
    assert_eq!(drain(&ch, &dflt.name).await, ["both", "both+extra"]);
}

/// Headers exchange with `x-match: any` needs one matching header.
async fn headers_match_any(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("headers", "headers");
    declare_exchange(&ch, &ex).await;
    let any = declare(&ch, t.queue("any")).await;
    bind(
        &ch,
        &any,
        &ex,
        "",
        table(&[("x-match", "any"), ("kind", "pdf"), ("size", "big")]),
    )
    .await;
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("both", &[("kind", "pdf"), ("size", "big")]),
        ("kind", &[("kind", "pdf")]),
        ("size", &[("size", "big"), ("kind", "doc")]),
        ("wrong-values", &[("kind", "doc"), ("size", "small")]),
        ("none", &[]),
    ];
    for (body, headers) in cases {
        let mut opts = PublishOptions::default();
        for (k, v) in headers {
            opts = opts.header(k, *v);
        }
        publish_with(&ch, &ex.name, "", body, opts).await;
    }
    assert_eq!(drain(&ch, &any.name).await, ["both", "kind", "size"]);
}

/// An exchange bound to another receives what the source routes with the binding key,
/// and passes it on by its own type; the message keeps its original exchange and key.
async fn exchange_to_exchange_binding(t: &Target) {
    let (_conn, ch) = t.open().await;
    // Not auto-delete: unbinding its only binding would delete it on RabbitMQ.
    let source = t.exchange("topic", "source").auto_delete(false);
    let dest = t.exchange("fanout", "dest");
    declare_exchange(&ch, &source).await;
    declare_exchange(&ch, &dest).await;
    within(
        "exchange.bind",
        dest.bind_to(&ch, &source.name, "audit.#", FieldTable::new()),
    )
    .await
    .unwrap();
    let q = bound_queue(t, &ch, &dest, &[""]).await;
    publish(&ch, &source.name, "audit.login", "in").await;
    publish(&ch, &source.name, "billing.paid", "out").await;
    let m = get_eventually(&ch, &q).await;
    assert_eq!(text(&m), "in");
    assert_eq!(m.delivery_info().exchange, source.name);
    assert_eq!(m.delivery_info().routing_key, "audit.login");
    assert!(get(&ch, &q).await.is_none(), "unmatched key went through");

    within(
        "exchange.unbind",
        dest.unbind_from(&ch, &source.name, "audit.#", FieldTable::new()),
    )
    .await
    .unwrap();
    publish(&ch, &source.name, "audit.logout", "after-unbind").await;
    assert!(
        drain(&ch, &q).await.is_empty(),
        "unbound exchange still routes"
    );
    within("exchange.delete", source.delete(&ch, false))
        .await
        .unwrap();
}

/// The default exchange routes to the queue named by the routing key, and only to it.
async fn default_exchange_routes_by_queue_name(t: &Target) {
    let (_conn, ch) = t.open().await;
    let a = declare(&ch, t.queue("a")).await.name;
    let b = declare(&ch, t.queue("b")).await.name;
    publish(&ch, "", &a, "to-a").await;
    publish(&ch, "", &b, "to-b").await;
    publish(&ch, "", "no-such-queue-anywhere", "lost").await;
    let m = get(&ch, &a).await.unwrap();
    assert_eq!(text(&m), "to-a");
    assert_eq!(m.delivery_info().exchange, "");
    assert_eq!(m.delivery_info().routing_key, a);
    assert_eq!(drain(&ch, &b).await, ["to-b"]);
}

/// Unbinding a queue stops routing to it; queues bound through `Queue::exchange` and
/// `Queue::bind` both route.
async fn unbind_stops_routing(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("direct", "direct").auto_delete(false);
    let q = declare(&ch, t.queue("q").exchange(ex.clone()).routing_key("k")).await;
    publish(&ch, &ex.name, "k", "before").await;
    within(
        "unbind",
        q.unbind_from(&ch, &ex.name, "k", FieldTable::new()),
    )
    .await
    .unwrap();
    publish(&ch, &ex.name, "k", "after").await;
    assert_eq!(drain(&ch, &q.name).await, ["before"]);
    within("exchange.delete", ex.delete(&ch, false))
        .await
        .unwrap();
}

/// Publishing to an exchange that does not exist is a 404 (on a broker: the channel
/// closes; with confirms the publish fails).
async fn publish_to_missing_exchange_is_404(t: &Target) {
    let (conn, ch) = t.open().await;
    within("confirm.select", ch.confirm_select()).await.unwrap();
    let err = try_publish(&ch, &t.name("missing"), "k", "x", PublishOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    // The connection is still usable.
    let ch2 = channel(&conn).await;
    let q = declare(&ch2, t.queue("q")).await;
    publish(&ch2, "", &q.name, "ok").await;
    assert_eq!(drain(&ch2, &q.name).await, ["ok"]);
}

/// Messages rejected by an alternate-exchange-less exchange vanish; with
/// `alternate-exchange` they go there instead.
async fn alternate_exchange_takes_unroutable(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ae = t.exchange("fanout", "ae");
    let ae_q = bound_queue(t, &ch, &ae, &[""]).await;
    let ex = t
        .exchange("direct", "main")
        .argument("alternate-exchange", ae.name.as_str());
    let q = bound_queue(t, &ch, &ex, &["known"]).await;
    publish(&ch, &ex.name, "known", "routed").await;
    publish(&ch, &ex.name, "unknown", "unroutable").await;
    assert_eq!(drain(&ch, &q).await, ["routed"]);
    assert_eq!(text(&get_eventually(&ch, &ae_q).await), "unroutable");
}

/// Headers exchange edge cases: `x-match: all` with no headers to match matches
/// everything; `any` with none matches nothing; binding arguments starting with `x-`
/// are not matched; values compare by type (the integer 1 is not the string "1").
async fn headers_match_edge_cases(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("headers", "headers");
    declare_exchange(&ch, &ex).await;
    let all_empty = declare(&ch, t.queue("all-empty")).await;
    bind(&ch, &all_empty, &ex, "", table(&[("x-match", "all")])).await;
    let any_empty = declare(&ch, t.queue("any-empty")).await;
    bind(&ch, &any_empty, &ex, "", table(&[("x-match", "any")])).await;
    let x_ignored = declare(&ch, t.queue("x-ignored")).await;
    bind(
        &ch,
        &x_ignored,
        &ex,
        "",
        table(&[("x-match", "all"), ("x-tenant", "a"), ("kind", "pdf")]),
    )
    .await;
    let typed = declare(&ch, t.queue("typed")).await;
    let mut args = FieldTable::new();
    args.insert("n", 1i32);
    bind(&ch, &typed, &ex, "", args).await;

    publish_with(&ch, &ex.name, "", "plain", PublishOptions::default()).await;
    publish_with(
        &ch,
        &ex.name,
        "",
        "pdf",
        PublishOptions::default().header("kind", "pdf"),
    )
    .await;
    publish_with(
        &ch,
        &ex.name,
        "",
        "int",
        PublishOptions::default().header("n", 1i32),
    )
    .await;
    publish_with(
        &ch,
        &ex.name,
        "",
        "str",
        PublishOptions::default().header("n", "1"),
    )
    .await;

    assert_eq!(
        drain(&ch, &all_empty.name).await,
        ["plain", "pdf", "int", "str"]
    );
    assert!(drain(&ch, &any_empty.name).await.is_empty());
    assert_eq!(drain(&ch, &x_ignored.name).await, ["pdf"]);
    assert_eq!(drain(&ch, &typed.name).await, ["int"]);
}

/// Exchange-to-exchange cycles neither loop nor duplicate: a queue reachable twice gets
/// one copy.
async fn exchange_binding_cycle_delivers_once(t: &Target) {
    let (_conn, ch) = t.open().await;
    let a = t.exchange("fanout", "a");
    let b = t.exchange("fanout", "b");
    declare_exchange(&ch, &a).await;
    declare_exchange(&ch, &b).await;
    within("bind", b.bind_to(&ch, &a.name, "", FieldTable::new()))
        .await
        .unwrap();
    within("bind", a.bind_to(&ch, &b.name, "", FieldTable::new()))
        .await
        .unwrap();
    let q = declare(&ch, t.queue("q")).await;
    bind(&ch, &q, &a, "", FieldTable::new()).await;
    bind(&ch, &q, &b, "", FieldTable::new()).await;
    publish(&ch, &a.name, "", "once").await;
    assert_eq!(drain(&ch, &q.name).await, ["once"]);
    // Bound to each other, they would never auto-delete.
    delete_exchanges(&ch, &[&a, &b]).await;
}

/// The default exchange cannot be bound to, and `amq.`-prefixed exchanges cannot be
/// declared (403 ACCESS_REFUSED).
async fn default_and_reserved_exchanges_are_refused(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("q")).await;
    let err = within("bind", q.bind_to(&ch, "", "k", FieldTable::new()))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(403), "{err:?}");
    let ch = channel(&conn).await;
    let err = within(
        "declare",
        Exchange::direct(format!("amq.{}", t.name("x"))).declare(&ch),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(403), "{err:?}");
}

/// Publishing straight to an internal exchange is refused (403); it still routes what
/// reaches it through an exchange binding.
async fn internal_exchange_only_reachable_through_bindings(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    within("confirm", ch.confirm_select()).await.unwrap();
    let front = t.exchange("fanout", "front");
    let inner = t.exchange("fanout", "inner").internal(true);
    declare_exchange(&ch, &front).await;
    declare_exchange(&ch, &inner).await;
    within(
        "bind",
        inner.bind_to(&ch, &front.name, "", FieldTable::new()),
    )
    .await
    .unwrap();
    let q = declare(&ch, t.queue("q")).await;
    bind(&ch, &q, &inner, "", FieldTable::new()).await;
    publish(&ch, &front.name, "", "via-front").await;
    assert_eq!(drain(&ch, &q.name).await, ["via-front"]);
    let err = try_publish(&ch, &inner.name, "", "direct", PublishOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(403), "{err:?}");
}

/// An auto-delete exchange goes when its last binding is removed; `delete(if_unused)`
/// refuses an exchange that still has bindings (406).
async fn auto_delete_exchange_and_if_unused(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let ex = t.exchange("direct", "auto");
    let q = declare(&ch, t.queue("q").exchange(ex.clone()).routing_key("k")).await;
    let err = within("delete", ex.delete(&ch, true)).await.unwrap_err();
    assert_eq!(err.reply_code(), Some(406), "{err:?}");
    let ch = channel(&conn).await;
    within(
        "unbind",
        q.unbind_from(&ch, &ex.name, "k", FieldTable::new()),
    )
    .await
    .unwrap();
    let err = within("passive", ch.get_exchange(&ex.name, true))
        .await
        .unwrap_err();
    assert_eq!(
        err.reply_code(),
        Some(404),
        "auto-delete exchange stayed: {err:?}"
    );
}

/// A message routed to an alternate exchange counts as routed: mandatory does not
/// return it.
async fn alternate_exchange_counts_as_routed_for_mandatory(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let ae = t.exchange("fanout", "ae");
    let ae_q = declare(&ch, t.queue("ae-q").exchange(ae.clone())).await;
    let ex = t
        .exchange("direct", "main")
        .argument("alternate-exchange", ae.name.as_str());
    declare_exchange(&ch, &ex).await;
    let opts = PublishOptions::default().mandatory(true);
    try_publish(&ch, &ex.name, "nobody", "to-ae", opts)
        .await
        .unwrap();
    assert_eq!(drain(&ch, &ae_q.name).await, ["to-ae"]);
    delete_exchanges(&ch, &[&ex]).await;
}
