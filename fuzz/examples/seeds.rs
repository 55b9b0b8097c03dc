//! Writes the committed seed corpora under `fuzz/corpus/<target>/`:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! Seeds are real inputs of every shape the proxy sees (frames of each type as the SDK sends
//! them, records `restore::encode` writes, topics valid and not, configs), so the fuzzer starts
//! from the interesting paths instead of discovering MessagePack and YAML from zero. Re-running
//! rewrites the generated files; seeds added by hand (crash reproducers) are left alone. The
//! session token differs on every run (its id is random), so it is written only when missing.

use std::path::{Path, PathBuf};

use cuttle::auth::session_token::{self, MintRequest};
use cuttle::topic::filters::FilterItem;
use cuttle::wire::restore::{self, Entry, Record};
use cuttle_fuzz::{NOW, WORLD};

/// A MessagePack value as the SDK would send it.
enum V<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    F64(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Arr(Vec<V<'a>>),
    Map(Vec<(&'a str, V<'a>)>),
}

use V::*;

fn write(out: &mut Vec<u8>, v: &V<'_>) {
    // Writing into a Vec cannot fail.
    match v {
        Nil => rmp::encode::write_nil(out).unwrap(),
        Bool(b) => rmp::encode::write_bool(out, *b).unwrap(),
        Int(i) => {
            rmp::encode::write_sint(out, *i).unwrap();
        }
        F64(f) => rmp::encode::write_f64(out, *f).unwrap(),
        Str(s) => rmp::encode::write_str(out, s).unwrap(),
        Bin(b) => rmp::encode::write_bin(out, b).unwrap(),
        Arr(a) => {
            rmp::encode::write_array_len(out, a.len() as u32).unwrap();
            a.iter().for_each(|x| write(out, x));
        }
        Map(m) => {
            rmp::encode::write_map_len(out, m.len() as u32).unwrap();
            for (k, x) in m {
                rmp::encode::write_str(out, k).unwrap();
                write(out, x);
            }
        }
    }
}

fn frame(pairs: Vec<(&str, V<'_>)>) -> Vec<u8> {
    let mut out = Vec::new();
    write(&mut out, &Map(pairs));
    out
}

fn strs<'a>(items: &[&'a str]) -> V<'a> {
    Arr(items.iter().map(|s| Str(s)).collect())
}

struct Corpus {
    dir: PathBuf,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Self {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn put(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.dir.join(name), bytes).unwrap();
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    frames(&Corpus::new(&root, "frame_decode"));
    restore_records(&Corpus::new(&root, "restore_record"));
    topics(&Corpus::new(&root, "topic_filter"));
    configs(&Corpus::new(&root, "config_load"));
    presence_messages(&Corpus::new(&root, "presence_message"));
    println!("seeds written under {}", root.display());
}

fn frames(c: &Corpus) {
    c.put("heartbeat", b"");
    c.put(
        "auth-device",
        frame(vec![
            ("type", Str("auth")),
            ("token", Str("fuzz-device-token")),
        ]),
    );
    c.put(
        "auth-server-reconnect-v2",
        frame(vec![
            ("type", Str("auth")),
            ("token", Str("fuzz-server-key")),
            ("reconnect", Bool(true)),
            ("protocolVersion", Int(2)),
            ("projectId", Str("fuzz")),
        ]),
    );
    c.put(
        "auth-version-float",
        frame(vec![
            ("type", Str("auth")),
            ("token", Str("nope")),
            ("protocolVersion", F64(1e300)),
        ]),
    );
    c.put("auth-no-token", frame(vec![("type", Str("auth"))]));
    // A JWT whose signature is wrong: header and claims are decoded, the signature refused.
    let jwt = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#),
        b64(&format!(
            r#"{{"iss":"https://id.fuzz.example","aud":"cuttle","sub":"alice","exp":{},"scope":"acme","roles":["moderator"]}}"#,
            NOW + 3600
        )),
        b64("not-a-signature")
    );
    c.put(
        "auth-jwt-bad-signature",
        frame(vec![("type", Str("auth")), ("token", Str(&jwt))]),
    );
    c.put(
        "auth-jwt-alg-none",
        frame(vec![
            ("type", Str("auth")),
            (
                "token",
                Str(&format!(
                    "{}.{}.",
                    b64(r#"{"alg":"none"}"#),
                    b64(r#"{"iss":"https://id.fuzz.example","sub":"x"}"#)
                )),
            ),
        ]),
    );
    // A correctly signed session token, valid at NOW: the whole verification path.
    let session = c.dir.join("auth-session-token");
    if !session.exists() {
        let token = session_token::mint(
            WORLD.policy(),
            &MintRequest {
                project: "fuzz".into(),
                ttl_s: 600,
                scope: Some("globex".into()),
                rooms: vec!["chat/general".into()],
            },
            NOW,
        )
        .unwrap();
        c.put(
            "auth-session-token",
            frame(vec![("type", Str("auth")), ("token", Str(&token))]),
        );
    }

    c.put(
        "publish",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("chat/general/messages")),
            ("data", Map(vec![("text", Str("hello"))])),
            ("qos", Int(1)),
        ]),
    );
    c.put(
        "publish-filter-echo-off-msgref",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("chat/general/messages")),
            ("data", Bin(&[0, 159, 146, 150])),
            ("qos", F64(0.0)),
            ("echo", Bool(false)),
            ("retain", Bool(true)),
            ("filter", Str("Alice|bob")),
            ("msgRef", Str("m-1")),
        ]),
    );
    c.put(
        "publish-filters-array",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("ops/eu/alerts")),
            (
                "data",
                Arr(vec![Int(1), Int(-2), F64(3.5), Nil, Bool(true)]),
            ),
            ("filters", strs(&["Zed", "amy"])),
        ]),
    );
    c.put(
        "publish-envelope-lookalike",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("chat/vip/messages")),
            (
                "data",
                Map(vec![("_sender", Str("victim")), ("data", Str("x"))]),
            ),
        ]),
    );
    c.put(
        "publish-wildcard-topic",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("chat/+/messages")),
            ("data", Nil),
        ]),
    );
    c.put(
        "publish-bad-filter",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("chat/general/orders")),
            ("data", Str("x")),
            ("filter", Str("a/b#")),
        ]),
    );
    c.put(
        "publish-no-data",
        frame(vec![
            ("type", Str("publish")),
            ("topic", Str("chat/general/messages")),
        ]),
    );
    c.put(
        "subscribe",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/general/messages")),
            ("qos", Int(1)),
        ]),
    );
    c.put(
        "subscribe-wildcard-room",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/+/messages")),
        ]),
    );
    c.put(
        "subscribe-app-hash",
        frame(vec![("type", Str("subscribe")), ("topic", Str("ops/#"))]),
    );
    c.put(
        "subscribe-room-hash-with-filters",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/vip/#")),
            ("filters", strs(&["x"])),
        ]),
    );
    c.put(
        "subscribe-filters-and-groups",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/general/+")),
            (
                "filters",
                Arr(vec![Str("Alice"), Arr(vec![Str("Zed"), Str("amy")])]),
            ),
        ]),
    );
    c.put(
        "subscribe-load-balance-group",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/general/orders")),
            ("loadBalance", Bool(true)),
            ("loadBalanceGroup", Str("workers")),
            ("qos", Int(0)),
        ]),
    );
    c.put(
        "subscribe-load-balance-default-group",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("ops/+/alerts")),
            ("loadBalance", Bool(true)),
            ("filters", strs(&["eu", "us"])),
        ]),
    );
    c.put(
        "subscribe-bad-group",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/general/orders")),
            ("loadBalance", Bool(true)),
            ("loadBalanceGroup", Str("$share/x")),
        ]),
    );
    let many: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    c.put(
        "subscribe-too-many-filters",
        frame(vec![
            ("type", Str("subscribe")),
            ("topic", Str("chat/general/messages")),
            ("filters", strs(&many)),
        ]),
    );
    c.put(
        "setfilters",
        frame(vec![
            ("type", Str("setFilters")),
            ("topic", Str("chat/general/messages")),
            (
                "filters",
                Arr(vec![Str("b"), Arr(vec![Str("c"), Str("d")])]),
            ),
        ]),
    );
    c.put(
        "setfilters-clear",
        frame(vec![
            ("type", Str("setFilters")),
            ("topic", Str("chat/+/messages")),
            ("filters", Arr(vec![])),
        ]),
    );
    c.put(
        "unsubscribe",
        frame(vec![
            ("type", Str("unsubscribe")),
            ("topic", Str("chat/general/messages")),
        ]),
    );
    c.put(
        "presence",
        frame(vec![
            ("type", Str("presence")),
            ("roomId", Str("general")),
            ("data", Map(vec![("status", Str("online"))])),
        ]),
    );
    c.put(
        "get-presence",
        frame(vec![
            ("type", Str("getPresence")),
            ("roomId", Str("general")),
        ]),
    );
    c.put(
        "lobby-subscribe",
        frame(vec![
            ("type", Str("lobbySubscribe")),
            ("lobbyId", Str("l1")),
        ]),
    );
    c.put(
        "ack",
        frame(vec![("type", Str("ack")), ("msgId", Str("id-1"))]),
    );
    c.put(
        "batch-ack",
        frame(vec![
            ("type", Str("batchAck")),
            ("msgIds", strs(&["a", "b"])),
        ]),
    );
    c.put(
        "unknown-type",
        frame(vec![("type", Str("teleport")), ("topic", Str("a/b/c"))]),
    );
    c.put(
        "wrong-type-topic",
        frame(vec![("type", Str("subscribe")), ("topic", Int(7))]),
    );
    // Not frames: another type, trailing bytes, a non-string key, deep nesting.
    c.put("not-a-map", [0x93, 1, 2, 3]);
    c.put("trailing-bytes", [0x80, 0xc0]);
    c.put("key-not-string", [0x81, 0x01, 0x01]);
    let mut deep = frame(vec![
        ("type", Str("publish")),
        ("topic", Str("chat/general/messages")),
    ]);
    deep[0] = 0x83; // one more pair: `data`, nested 64 arrays deep
    rmp::encode::write_str(&mut deep, "data").unwrap();
    deep.extend(std::iter::repeat_n(0x91, 64));
    deep.push(0xc0);
    c.put("publish-data-nested-64", deep);
}

fn b64(s: &str) -> String {
    // URL-safe base64 without padding, as JWTs use it; a few lines instead of a dependency.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &x)| n | (u32::from(x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn restore_records(c: &Corpus) {
    let entry = |name: &str, lb: bool, group: Option<&str>, filters: Vec<FilterItem>| Entry {
        name: name.into(),
        load_balance: lb,
        group: group.map(Into::into),
        filters,
    };
    let one = |s: &str| FilterItem::One(s.into());
    let all = |v: &[&str]| FilterItem::All(v.iter().map(|s| s.to_string()).collect());
    let scoped = |entries: &[Entry]| {
        restore::encode(&Record {
            scope: Some("acme".into()),
            actor: "alice".into(),
            entries: entries.to_vec(),
            room: Some("chat/general".into()),
        })
    };
    let unscoped = |entries: &[Entry]| {
        restore::encode(&Record {
            scope: None,
            actor: "bob".into(),
            entries: entries.to_vec(),
            room: None,
        })
    };
    c.put("cleared", b"");
    c.put("empty-set", scoped(&[]));
    c.put(
        "one-exact",
        unscoped(&[entry("chat/general/messages", false, None, vec![])]),
    );
    c.put(
        "mixed",
        scoped(&[
            entry("chat/general/messages", false, None, vec![]),
            entry(
                "chat/+/orders",
                true,
                Some("workers"),
                vec![one("A"), all(&["x", "y"])],
            ),
            entry("ops/#", true, None, vec![]),
            entry("chat/vip/+", false, None, vec![all(&[])]),
        ]),
    );
    // What releases before the versioned record wrote: a bare array (refused as legacy).
    let mut extra = Vec::new();
    write(
        &mut extra,
        &Arr(vec![Map(vec![
            ("name", Str("chat/general/messages")),
            ("loadBalance", Bool(false)),
            ("loadBalanceGroup", Nil),
            ("filters", strs(&["a"])),
            ("since", Int(1_767_225_600)),
        ])]),
    );
    c.put("legacy-array", extra);
    // A future version is refused whole.
    let mut future = Vec::new();
    write(&mut future, &Map(vec![("v", Int(3)), ("subs", Arr(vec![]))]));
    c.put("future-version", future);
    let mut full = scoped(&[entry("chat/general/messages", false, None, vec![])]).to_vec();
    full.truncate(full.len() - 3);
    c.put("truncated", full);
    c.put("huge-count", [0xdd, 0xff, 0xff, 0xff, 0xff]);
}

fn topics(c: &Corpus) {
    for (name, text) in [
        ("exact", "chat/general/messages"),
        ("wild-room", "chat/+/messages"),
        ("wild-topic", "chat/general/+"),
        ("app-hash", "chat/#"),
        ("room-hash", "chat/vip/#"),
        ("with-filters", "chat/general/messages\nAlice\nZed\namy"),
        ("with-filters-and-group", "chat/+/orders\nx\ny\nworkers"),
        ("pipe-filter", "chat/general/messages\nA|b\nc"),
        ("bad-filter", "chat/general/messages\na/b\n+\n#\n$x"),
        ("group-reserved", "ops/eu/alerts\nguest/+#%$\u{85}"),
        ("wildcard-app", "+/general/messages"),
        ("hash-not-last", "chat/#/messages"),
        ("too-deep", "chat/general/messages/x"),
        ("empty-level", "chat//messages"),
        ("dollar", "$SYS/general/messages"),
        ("control", "chat/a\u{1}/messages"),
        ("noncharacter", "chat/\u{fdd0}/messages\n\u{1fffe}"),
        ("nul", "chat/\0/messages"),
        ("unicode", "chät/général/メッセージ"),
        ("upstream", "prod/eu/chat/acme/general/messages/a|b"),
        ("upstream-unscoped", "chat/_/general/messages"),
        ("upstream-deep-filter", "chat/acme/general/messages/a/b/"),
        ("prefix", "prod/eu"),
        ("restore-topic", "_/restore/fuzz/alice"),
    ] {
        c.put(name, text);
    }
    c.put("too-long", "a/".repeat(300));
}

fn configs(c: &Corpus) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    c.put(
        "proxy.yaml",
        std::fs::read(repo.join("proxy.yaml")).unwrap(),
    );
    c.put("world.yaml", cuttle_fuzz::WORLD_YAML);
    c.put("empty.yaml", "");
    c.put("minimal.yaml", "policy:\n  projects:\n    - id: demo\n");
    c.put(
        "all-settings.yaml",
        r#"listen: 0.0.0.0:8443
admin: 127.0.0.1:9091
tls: { cert: certs/tls.crt, key: certs/tls.key }
upstream:
  broker: mqtts://broker.example:8883
  pool: 8
  username: cuttle
  password_env: FUZZ_JWT_SECRET
  topic_prefix: prod/eu
  client_id_prefix: edge
  keep_alive_s: 15
  connect_timeout_ms: 2000
limits:
  max_message_bytes: 65536
  max_frame_bytes: 2097152
  publish_per_second: 10
  connections_per_actor: 4
  max_connections: 100
  subscriptions_per_connection: 16
  auth_timeout_ms: 5000
  handshake_timeout_ms: 5000
  idle_timeout_ms: 120000
  send_queue: 64
auth_cache: { capacity: 10, ttl_s: 5 }
reload: { debounce_ms: 100 }
log: { format: json, level: debug }
shutdown: { grace_s: 5 }
policy: { projects: [ { id: p } ] }
"#,
    );
    c.put("policy-file.yaml", "policy_file: policy.yaml\n");
    c.put(
        "policy-and-policy-file.yaml",
        "policy_file: p.yaml\npolicy: { projects: [] }\n",
    );
    c.put(
        "jwt-keys.yaml",
        r#"policy:
  projects:
    - id: a
      jwt:
        issuer: https://idp.example
        audience: cuttle
        algorithms: [RS256, RS384]
        keys: [ { kid: 2026-01, public_key_file: keys/a.pem }, { kid: 2026-02, public_key_file: /nonexistent/b.pem } ]
        scope_claim: tenant
        roles_claim: groups
        leeway_s: 300
    - id: b
      jwt: { issuer: https://x, audience: c, algorithms: [HS256, RS256, XX999], secret_env: FUZZ_JWT_SECRET }
    - id: c
      jwt: { issuer: https://y, audience: c, algorithms: [HS256], public_key_file: rsa_public.pem }
    - id: d
      jwt: { issuer: https://z, audience: c, algorithms: [EdDSA], secret_env: UNSET }
      session: { secret_env: FUZZ_SESSION_SECRET, max_ttl_s: 0 }
"#,
    );
    c.put(
        "unknown-keys.yaml",
        r#"listn: 1.2.3.4:5
upstream: { pool: 2, colour: blue }
policy:
  projects:
    - id: demo
      flavour: x
      apps:
        - slug: chat
          topcs: {}
"#,
    );
    c.put(
        "duplicate-key.yaml",
        "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\npolicy: { projects: [] }\n",
    );
    c.put(
        "wrong-type.yaml",
        "upstream: { pool: many }\npolicy: { projects: [] }\n",
    );
    c.put(
        "settings-errors.yaml",
        r#"listen: localhost
admin: 127.0.0.1:99999
upstream: { broker: "amqp://x", pool: 0, topic_prefix: "a/#" }
limits: { idle_timeout_ms: 1000, send_queue: 0 }
log: { format: xml }
tls: { cert: nope.crt, key: nope.key }
policy: { projects: [] }
"#,
    );
    c.put(
        "policy-errors.yaml",
        r##"policy:
  projects:
    - id: demo
      scopes: [ { slug: acme }, { slug: acme }, { slug: _ } ]
      roles: { mod: { messages: admin, nothing: read } }
      apps:
        - slug: Chat
          topics:
            messages: { user: rw, robot: read }
            "a/b": { device: read }
          rooms:
            - slug: general
            - slug: general
            - slug: "#"
            - slug: vip
              actors: [alice, bob]
      actors:
        - { id: alice, type: user, scope: initech }
        - { id: alice, type: user }
        - { id: d1, type: device, token_sha256: "abc" }
        - { id: s1, type: server, token_sha256: "dc3ebc474c2923f993c61b8067e63e24d0c2557dd49fd6994c89dab4e0c8d012" }
        - { id: x1, type: robot }
        - { id: x2, type: session }
    - id: demo
"##,
    );
    c.put(
        "aliases.yaml",
        r#"a: &a [x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b]
policy: { projects: [ { id: p, scopes: *c } ] }
"#,
    );
    c.put(
        "anchors-merge.yaml",
        r#"defaults: &d { device: read, server: read-write }
policy:
  projects:
    - id: p
      apps:
        - slug: chat
          topics: { messages: { <<: *d, user: read }, orders: *d }
"#,
    );
    c.put(
        "flow-and-tags.yaml",
        "%YAML 1.2\n---\n!!map { policy: !!map { projects: [ { id: !!str 1 } ] }, upstream: { pool: !!int \"4\" } }\n...\n",
    );
}

/// What replicas publish on the presence topics: one of each kind, as `Message::encode`
/// writes them.
fn presence_messages(c: &Corpus) {
    use cuttle::presence::core::{Member, RoomKey};
    use cuttle::presence::message::{Body, Message, Op};
    let room = |scope: Option<&str>, slug: &str| RoomKey {
        project: "fuzz".into(),
        app: "chat".into(),
        scope: scope.map(Into::into),
        room: slug.into(),
    };
    let mut data = Vec::new();
    write(&mut data, &Map(vec![("status", Str("online")), ("n", Int(3))]));
    let set = |scope, slug, actor: &str| Op::Set {
        room: room(scope, slug),
        actor: actor.into(),
        member: Member {
            data: data.clone().into(),
            joined_at: NOW,
            updated: NOW * 1000 + 123,
        },
    };
    let message = |seq, body| {
        Message {
            replica: "host-8080".into(),
            incarnation: (NOW * 1000) << 16 | 7,
            seq,
            body,
        }
        .encode()
    };
    c.put(
        "delta",
        message(
            3,
            Body::Delta {
                ops: vec![
                    set(Some("acme"), "general", "alice"),
                    Op::Remove {
                        room: room(None, "lobby"),
                        actor: "bob".into(),
                    },
                ],
            },
        ),
    );
    c.put(
        "snapshot-part",
        message(
            4,
            Body::Snapshot {
                part: 0,
                parts: 2,
                ops: vec![set(None, "general", "carol"), set(Some("globex"), "vip", "dave")],
            },
        ),
    );
    c.put(
        "snapshot-empty",
        message(0, Body::Snapshot { part: 0, parts: 1, ops: vec![] }),
    );
    c.put("heartbeat", message(9, Body::Heartbeat));
    c.put("hello", message(0, Body::SyncRequest { target: None }));
    c.put(
        "sync-request",
        message(2, Body::SyncRequest { target: Some("other-9090".into()) }),
    );
    c.put("gone", message(5, Body::Gone));
}
