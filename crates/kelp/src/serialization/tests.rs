use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Task {
    id: u64,
    name: String,
    args: Vec<i64>,
    kwargs: BTreeMap<String, f64>,
    eta: Option<String>,
    nested: Vec<Inner>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    flag: bool,
    note: Option<String>,
}

fn task() -> Task {
    Task {
        id: u64::MAX,
        name: "add".into(),
        args: vec![1, -2, i64::MIN],
        kwargs: [("x".to_string(), 0.5)].into_iter().collect(),
        eta: None,
        nested: vec![Inner {
            flag: true,
            note: Some("é".into()),
        }],
    }
}

/// Stands in for `bytes::Bytes` (whose serde impls need the `bytes/serde` feature): serializes
/// with `serialize_bytes`, deserializes with `deserialize_byte_buf`, exactly as `Bytes` does.
#[derive(Debug, PartialEq)]
struct ByteBuf(Vec<u8>);

impl Serialize for ByteBuf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_str<E>(self, v: &str) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.as_bytes().to_vec()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ByteBuf, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(ByteBuf(out))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

fn bb(b: &[u8]) -> ByteBuf {
    ByteBuf(b.to_vec())
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

const ALL: [(&str, &str, &str); 6] = [
    ("json", "application/json", "utf-8"),
    ("msgpack", "application/x-msgpack", "binary"),
    ("yaml", "application/x-yaml", "utf-8"),
    ("pickle", "application/x-python-serialize", "binary"),
    ("raw", "application/data", "binary"),
    ("text", "text/plain", "utf-8"),
];

#[test]
fn builtins_have_kombu_names_and_types() {
    let registry = Registry::default();
    for (name, ct, enc) in ALL {
        let ser = registry.get(name).unwrap();
        assert_eq!(
            (ser.name(), ser.content_type(), ser.content_encoding()),
            (name, ct, enc)
        );
        assert_eq!(registry.by_content_type(ct).unwrap().name(), name);
        assert_eq!(registry.content_type_of(name).unwrap(), ct);
    }
    assert_eq!(registry.get("JSON").unwrap().name(), "json");
    assert_eq!(
        registry
            .by_content_type("Application/JSON; charset=utf-8")
            .unwrap()
            .name(),
        "json"
    );
    assert!(
        matches!(registry.encode("nope", &1), Err(SerializationError::UnknownSerializer { name }) if name == "nope")
    );
    assert!(matches!(
        registry.content_type_of("application/nope"),
        Err(SerializationError::UnknownContentType { .. })
    ));
}

#[test]
fn typed_round_trip_every_structured_format() {
    let registry = Registry::default();
    for name in ["json", "msgpack", "yaml", "pickle"] {
        let enc = registry.encode(name, &task()).unwrap();
        let back: Task = registry
            .decode(
                Some(&enc.content_type),
                Some(&enc.content_encoding),
                &enc.body,
            )
            .unwrap();
        assert_eq!(back, task(), "{name}");
        // The Value path agrees with the typed path.
        let value = registry
            .decode_value(Some(&enc.content_type), None, &enc.body)
            .unwrap();
        assert_eq!(value.get("name"), Some(&s("add")), "{name}");
        assert_eq!(value.deserialize_into::<Task>().unwrap(), task(), "{name}");
        let again = registry
            .encode_value(name, &Value::from_serialize(&task()).unwrap())
            .unwrap();
        assert_eq!(
            registry
                .decode::<Task>(Some(&again.content_type), None, &again.body)
                .unwrap(),
            task()
        );
    }
}

#[test]
fn value_round_trip_with_bytes_and_non_string_keys() {
    let registry = Registry::default();
    let value = Value::Map(vec![
        (Value::Int(7), s("int key")),
        (s("blob"), Value::Bytes(vec![0, 1, 255])),
        (s("big"), Value::Int(u64::MAX.into())),
        (
            s("list"),
            Value::List(vec![1.5.into(), Value::Null, true.into()]),
        ),
    ]);
    for name in ["msgpack", "pickle"] {
        let enc = registry.encode_value(name, &value).unwrap();
        assert_eq!(
            registry
                .decode_value(Some(&enc.content_type), None, &enc.body)
                .unwrap(),
            value,
            "{name}"
        );
    }
}

#[test]
fn pickle_output_is_protocol_3_and_reads_back() {
    let enc = Registry::default()
        .encode("pickle", &vec!["a", "b"])
        .unwrap();
    // Checked once with Python 3.11: pickle.loads(bytes.fromhex(...)) == ['a', 'b'].
    assert_eq!(&enc.body[..2], b"\x80\x03");
    assert_eq!(enc.body.last(), Some(&b'.'));
    assert_eq!(
        pickle::decode(&enc.body),
        Ok(Value::List(vec![s("a"), s("b")]))
    );
}

#[test]
fn decodes_what_python_kombu_writes() {
    let registry = Registry::default();
    // kombu.utils.json.dumps({...}) from Kombu 5.7.0.
    let json = br#"{"dt": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}, "d": {"__type__": "date", "__value__": "2024-01-02"}, "t": {"__type__": "time", "__value__": "01:02:03"}, "dec": {"__type__": "decimal", "__value__": "1.50"}, "u": {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}}, "b": {"__type__": "bytes", "__value__": "hi"}, "b64": {"__type__": "base64", "__value__": "/wA="}, "nested": [{"x": {"__type__": "bytes", "__value__": "y"}}]}"#;
    let v = registry
        .decode_value(Some("application/json"), Some("utf-8"), json)
        .unwrap();
    assert_eq!(v.get("dt"), Some(&s("2024-01-02T03:04:05+00:00")));
    assert_eq!(v.get("d"), Some(&s("2024-01-02")));
    assert_eq!(v.get("t"), Some(&s("01:02:03")));
    assert_eq!(v.get("dec"), Some(&s("1.50")));
    assert_eq!(v.get("u"), Some(&s("12345678-1234-5678-1234-567812345678")));
    assert_eq!(v.get("b"), Some(&Value::Bytes(b"hi".to_vec())));
    assert_eq!(v.get("b64"), Some(&Value::Bytes(vec![0xff, 0])));
    assert_eq!(
        v.get("nested").and_then(|n| n.as_list()).unwrap()[0].get("x"),
        Some(&Value::Bytes(b"y".to_vec()))
    );

    // The typed path sees the markers too.
    #[derive(Deserialize)]
    struct Markers {
        b64: ByteBuf,
        u: String,
        dec: String,
    }
    let m: Markers = registry
        .decode(Some("application/json"), None, json)
        .unwrap();
    assert_eq!(
        (&m.b64.0[..], m.u.as_str(), m.dec.as_str()),
        (
            &[0xff, 0][..],
            "12345678-1234-5678-1234-567812345678",
            "1.50"
        )
    );

    // Unknown markers are an error, as in Kombu.
    let err = registry.decode_value(
        Some("application/json"),
        None,
        br#"{"__type__": "frob", "__value__": 1}"#,
    );
    assert!(
        matches!(err, Err(SerializationError::Decode { ref message, .. }) if message.contains("frob")),
        "{err:?}"
    );

    // yaml.safe_dump({...}) from PyYAML 6.
    let yaml = b"blob: !!binary |\n  AAH/\nlist:\n- 1.5\n- null\n- true\nn: 3\nname: kelp\n";
    let v = registry
        .decode_value(Some("application/x-yaml"), Some("utf-8"), yaml)
        .unwrap();
    assert_eq!(v.get("blob"), Some(&Value::Bytes(vec![0, 1, 0xff])));
    assert_eq!(
        v.get("list"),
        Some(&Value::List(vec![1.5.into(), Value::Null, true.into()]))
    );
    assert_eq!(v.get("n"), Some(&3.into()));
    #[derive(Deserialize)]
    struct Blob {
        blob: Vec<u8>,
        name: String,
    }
    let b: Blob = registry
        .decode(Some("application/x-yaml"), None, yaml)
        .unwrap();
    assert_eq!((b.blob, b.name.as_str()), (vec![0, 1, 0xff], "kelp"));

    // msgpack.packb({...}, use_bin_type=True) from msgpack 1.x.
    let hex = "86a46e616d65a46b656c70a16efda4626c6f62c4030001ffa46c69737493cb3ff8000000000000c0c307a7696e74206b6579a3626967cfffffffffffffffff";
    let mp: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let v = registry
        .decode_value(Some("application/x-msgpack"), Some("binary"), &mp)
        .unwrap();
    assert_eq!(
        v,
        Value::Map(vec![
            (s("name"), s("kelp")),
            (s("n"), (-3).into()),
            (s("blob"), Value::Bytes(vec![0, 1, 0xff])),
            (
                s("list"),
                Value::List(vec![1.5.into(), Value::Null, true.into()])
            ),
            (7.into(), s("int key")),
            (s("big"), Value::Int(u64::MAX.into())),
        ])
    );
}

#[test]
fn raw_and_text_bodies() {
    let registry = Registry::default();
    let enc = registry.encode("raw", &bb(b"\x00\xff")).unwrap();
    assert_eq!(
        (&enc.body[..], &*enc.content_type, &*enc.content_encoding),
        (&b"\x00\xff"[..], "application/data", "binary")
    );
    let enc = registry.encode("raw", &vec![1u8, 2]).unwrap();
    assert_eq!(&enc.body[..], &[1, 2]);
    let enc = registry.encode("raw", "hé").unwrap();
    assert_eq!(
        (&*enc.content_type, &*enc.content_encoding),
        ("application/data", "utf-8")
    );
    assert!(
        matches!(registry.encode("raw", &task()), Err(SerializationError::Encode { serializer, .. }) if serializer == "raw")
    );
    let enc = registry.encode("text", "hello").unwrap();
    assert_eq!(
        (&enc.body[..], &*enc.content_type, &*enc.content_encoding),
        (&b"hello"[..], "text/plain", "utf-8")
    );
    assert!(registry.encode("text", &1).is_err());

    let text = Some("text/plain");
    assert_eq!(
        registry
            .decode::<String>(text, Some("utf-8"), b"hi")
            .unwrap(),
        "hi"
    );
    assert_eq!(
        registry
            .decode::<Vec<u8>>(text, Some("utf-8"), b"hi")
            .unwrap(),
        b"hi"
    );
    assert_eq!(
        registry
            .decode::<ByteBuf>(text, Some("utf-8"), b"hi")
            .unwrap(),
        bb(b"hi")
    );
    assert!(registry
        .decode::<String>(text, Some("utf-8"), b"\xff")
        .is_err());
    let raw = Some("application/data");
    assert_eq!(
        registry
            .decode::<Vec<u8>>(raw, Some("binary"), b"\x00\xff")
            .unwrap(),
        b"\x00\xff"
    );
    assert_eq!(
        registry
            .decode::<ByteBuf>(raw, Some("binary"), b"\x00\xff")
            .unwrap(),
        bb(b"\x00\xff")
    );
    assert_eq!(
        registry
            .decode::<String>(raw, Some("binary"), b"ok")
            .unwrap(),
        "ok"
    );
    assert_eq!(
        registry.decode_value(raw, Some("binary"), b"ok").unwrap(),
        Value::Bytes(b"ok".to_vec())
    );
    assert_eq!(
        registry.decode_value(raw, Some("utf-8"), b"ok").unwrap(),
        s("ok")
    );
    assert_eq!(
        registry
            .decode_value(raw, Some("latin-1"), b"\xe9")
            .unwrap(),
        s("é")
    );
    assert!(registry.decode_value(raw, Some("ebcdic"), b"x").is_err());
}

#[test]
fn missing_or_unknown_content_type_and_empty_body_are_not_parsed() {
    let registry = Registry::default();
    // No content type = application/data: text when the encoding says so (or is missing and
    // the body is UTF-8), bytes otherwise.
    assert_eq!(
        registry.decode_value(None, None, b"{\"a\":1}").unwrap(),
        s("{\"a\":1}")
    );
    assert_eq!(
        registry.decode_value(None, None, b"\xff").unwrap(),
        Value::Bytes(vec![0xff])
    );
    assert_eq!(
        registry.decode_value(None, Some("binary"), b"ab").unwrap(),
        Value::Bytes(b"ab".to_vec())
    );
    assert_eq!(
        registry.decode::<Vec<u8>>(None, None, b"ab").unwrap(),
        b"ab"
    );
    // Unknown content types pass through like Kombu's `loads`.
    assert_eq!(
        registry
            .decode_value(Some("application/x-thrift"), Some("binary"), b"\x01")
            .unwrap(),
        Value::Bytes(vec![1])
    );
    // Empty bodies are not parsed even for json.
    assert_eq!(
        registry
            .decode_value(Some("application/json"), Some("utf-8"), b"")
            .unwrap(),
        s("")
    );
    assert_eq!(
        registry
            .decode_value(Some("application/x-msgpack"), Some("binary"), b"")
            .unwrap(),
        Value::Bytes(vec![])
    );
}

#[derive(Debug)]
struct Csv;

impl Serializer for Csv {
    fn name(&self) -> &str {
        "csv"
    }
    fn content_type(&self) -> &str {
        "text/csv"
    }
    fn content_encoding(&self) -> &str {
        "utf-8"
    }
    fn encode(&self, value: &Value) -> Result<Bytes, SerializationError> {
        let items = value.as_list().ok_or_else(|| SerializationError::Encode {
            serializer: "csv".into(),
            message: "needs a list".into(),
        })?;
        let cells: Vec<String> = items
            .iter()
            .map(|v| v.as_i64().unwrap_or_default().to_string())
            .collect();
        Ok(Bytes::from(cells.join(",")))
    }
    fn decode(&self, body: &[u8]) -> Result<Value, SerializationError> {
        let text = std::str::from_utf8(body).map_err(|e| SerializationError::Decode {
            content_type: "text/csv".into(),
            message: e.to_string(),
        })?;
        let cells = text.split(',').map(|c| c.parse::<i64>().map(Value::from));
        cells
            .collect::<Result<Vec<_>, _>>()
            .map(Value::List)
            .map_err(|e| SerializationError::Decode {
                content_type: "text/csv".into(),
                message: e.to_string(),
            })
    }
}

#[test]
fn user_serializers_go_through_value() {
    let base = Registry::default();
    let mut registry = base.clone();
    registry.register(Arc::new(Csv));
    assert!(
        base.get("csv").is_none(),
        "clones taken before register are unchanged"
    );
    let enc = registry.encode("CSV", &[1, 2, 3]).unwrap();
    assert_eq!(
        (&enc.body[..], &*enc.content_type, &*enc.content_encoding),
        (&b"1,2,3"[..], "text/csv", "utf-8")
    );
    let back: Vec<u8> = registry.decode(Some("text/csv"), None, &enc.body).unwrap();
    assert_eq!(back, vec![1, 2, 3]);
    assert!(matches!(
        registry.decode::<Vec<u8>>(Some("text/csv"), None, b"x"),
        Err(SerializationError::Decode { .. })
    ));
    assert!(registry.unregister("csv"));
    assert!(!registry.unregister("csv"));
    assert!(registry.get("csv").is_none());
    // Replacing a built-in by name.
    #[derive(Debug)]
    struct Json2;
    impl Serializer for Json2 {
        fn name(&self) -> &str {
            "json"
        }
        fn content_type(&self) -> &str {
            "application/json"
        }
        fn content_encoding(&self) -> &str {
            "utf-8"
        }
        fn encode(&self, _: &Value) -> Result<Bytes, SerializationError> {
            Ok(Bytes::from_static(b"42"))
        }
        fn decode(&self, _: &[u8]) -> Result<Value, SerializationError> {
            Ok(Value::Int(42))
        }
    }
    registry.register(Arc::new(Json2));
    assert_eq!(registry.names().filter(|n| *n == "json").count(), 1);
    assert_eq!(&registry.encode("json", "x").unwrap().body[..], b"42");
    assert_eq!(
        registry
            .decode::<u8>(Some("application/json"), None, b"1")
            .unwrap(),
        42
    );
}

#[test]
fn accept_lists() {
    let registry = Registry::default();
    let accept = registry.accept(["json", "application/x-msgpack"]).unwrap();
    assert!(accept.allows(Some("application/json")));
    assert!(accept.allows(Some("APPLICATION/JSON; charset=utf-8")));
    assert!(accept.allows(Some("application/x-msgpack")));
    assert!(
        accept.allows(Some("application/data")),
        "trusted, as in Kombu"
    );
    assert!(accept.allows(None), "no content type = application/data");
    assert!(!accept.allows(Some("text/plain")));
    assert_eq!(
        accept.check(Some("application/x-yaml")),
        Err(SerializationError::ContentDisallowed {
            content_type: "application/x-yaml".into()
        })
    );
    assert!(matches!(
        Accept::new(["jsn"]),
        Err(SerializationError::UnknownSerializer { .. })
    ));

    let default = Accept::default();
    for ct in [
        "application/x-python-serialize",
        "application/x-yaml",
        "application/x-msgpack",
    ] {
        assert!(default.check(Some(ct)).is_err(), "{ct}");
        assert!(Accept::any().check(Some(ct)).is_ok());
    }
    for ct in [
        "application/json",
        "text/plain",
        "application/data",
        "application/x-whatever",
    ] {
        assert!(default.check(Some(ct)).is_ok(), "{ct}");
    }
    let err = default
        .check(Some("application/x-python-serialize"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("application/x-python-serialize"), "{err}");
}

#[test]
fn hostile_nesting_is_an_error_not_a_stack_overflow() {
    let registry = Registry::default();
    let json = "[".repeat(100_000);
    let msgpack = vec![0x91u8; 100_000];
    let yaml = "[".repeat(100_000);
    for (ct, body) in [
        ("application/json", json.as_bytes()),
        ("application/x-msgpack", &msgpack[..]),
        ("application/x-yaml", yaml.as_bytes()),
    ] {
        assert!(registry.decode_value(Some(ct), None, body).is_err(), "{ct}");
        assert!(
            registry.decode::<Value>(Some(ct), None, body).is_err(),
            "{ct}"
        );
    }
    // YAML alias expansion ("billion laughs").
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in b'b'..=b'j' {
        let prev = char::from(i - 1);
        let name = char::from(i);
        laughs.push_str(&format!("{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
    }
    assert!(registry
        .decode_value(Some("application/x-yaml"), None, laughs.as_bytes())
        .is_err());
    // msgpack with a huge declared length but no data.
    assert!(registry
        .decode_value(
            Some("application/x-msgpack"),
            None,
            &[0xdd, 0xff, 0xff, 0xff, 0xff]
        )
        .is_err());
    assert!(registry
        .decode_value(
            Some("application/x-msgpack"),
            None,
            &[0xc6, 0xff, 0xff, 0xff, 0xff, 1]
        )
        .is_err());
}

#[test]
fn errors_name_the_format() {
    let registry = Registry::default();
    let err = registry
        .decode::<Task>(Some("application/json"), None, b"{")
        .unwrap_err();
    assert!(err.to_string().contains("application/json"), "{err}");
    let err = registry
        .decode_value(
            Some("application/x-python-serialize"),
            None,
            b"cos\nsystem\n.",
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("application/x-python-serialize")
            && err.to_string().contains("os.system"),
        "{err}"
    );
    let err = registry.encode("yaml", &bb(b"x")).unwrap_err();
    assert!(err.to_string().contains("yaml"), "{err}");
}

proptest! {
    #[test]
    fn every_decoder_survives_random_bytes(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let registry = Registry::default();
        for (_, ct, _) in ALL {
            let _ = registry.decode_value(Some(ct), None, &body);
            let _ = registry.decode_value(Some(ct), Some("utf-8"), &body);
            let _ = registry.decode::<Task>(Some(ct), None, &body);
            let _ = registry.decode::<Value>(Some(ct), Some("binary"), &body);
        }
    }

    #[test]
    fn every_decoder_survives_random_text(body in "[\\[\\]{}:,\"a-z0-9 \\n!&*-]{0,200}") {
        let registry = Registry::default();
        for (_, ct, _) in ALL {
            let _ = registry.decode_value(Some(ct), None, body.as_bytes());
            let _ = registry.decode::<Task>(Some(ct), None, body.as_bytes());
        }
    }

    #[test]
    fn msgpack_and_pickle_round_trip_arbitrary_values(v in arb_value()) {
        let registry = Registry::default();
        for name in ["msgpack", "pickle"] {
            let enc = registry.encode_value(name, &v).unwrap();
            let back = registry.decode_value(Some(&enc.content_type), None, &enc.body).unwrap();
            prop_assert_eq!(&back, &v, "{}", name);
        }
    }
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::Float),
        ".{0,8}".prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::vec((".{0,4}".prop_map(Value::String), inner), 0..6)
                .prop_map(Value::Map),
        ]
    })
}
