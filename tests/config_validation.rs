//! `proxy.yaml` validation: each class of invalid config fails with a message naming the YAML
//! path and the offending value, and `cuttle check` lists every problem at once.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use cuttle::config::{self, Broker};
use cuttle::diagnostics::Diagnostics;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(text: &str) -> Result<config::Loaded, Diagnostics> {
    load_with(text, &test_env)
}

fn errors(text: &str) -> String {
    errors_with_env(text, &test_env)
}

fn errors_with_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "proxy.yaml", text);
    match config::load_with_env(&p, env) {
        Ok(_) => panic!("config should be invalid:\n{text}"),
        Err(d) => d.to_string(),
    }
}

fn assert_has(all: &str, path: &str, fragments: &[&str]) {
    let line = all
        .lines()
        .find(|l| l.starts_with(&format!("error: {path}: ")))
        .unwrap_or_else(|| panic!("no error at {path} in:\n{all}"));
    for f in fragments {
        assert!(line.contains(f), "{line:?} lacks {f:?}");
    }
}

const MINIMAL: &str = "policy:\n  projects:\n    - id: demo\n";

#[test]
fn a_file_with_only_a_policy_is_complete() {
    let loaded = load(MINIMAL).unwrap();
    let s = &loaded.settings;
    assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.admin.to_string(), "127.0.0.1:9090");
    assert_eq!(s.upstream.broker, Broker::Embedded);
    assert_eq!(s.limits.send_queue, 1024);
    assert!(s.tls.is_none());
}

#[test]
fn the_repository_proxy_yaml_is_valid() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
    let loaded = config::load_with_env(&p, &|_| None).unwrap_or_else(|d| panic!("{d}"));
    assert!(loaded.policy.project("demo").is_some());
    // Without the demo secrets, the JWT and session kinds are disabled with warnings.
    assert!(loaded.warnings.warnings().count() >= 2);
}

#[test]
fn unknown_keys_are_all_reported_with_paths() {
    let all = errors(
        r#"
listn: 1.2.3.4:5
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
    assert_has(&all, "listn", &["unknown key"]);
    assert_has(&all, "upstream.colour", &["unknown key"]);
    assert_has(&all, "policy.projects[0].flavour", &["unknown key"]);
    assert_has(&all, "policy.projects[0].apps[0].topcs", &["unknown key"]);
}

#[test]
fn duplicate_yaml_keys_are_refused() {
    let all = errors("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\npolicy: { projects: [] }\n");
    assert!(all.contains("duplicate"), "{all}");
}

#[test]
fn wrong_types_name_their_path() {
    let all = errors("upstream: { pool: many }\npolicy: { projects: [] }\n");
    assert!(all.contains("error: upstream.pool: "), "{all}");
}

#[test]
fn duplicates_and_dangling_references() {
    let all = errors(
        r#"
policy:
  projects:
    - id: demo
      scopes: [ { slug: acme }, { slug: acme } ]
      apps:
        - slug: chat
          rooms:
            - slug: general
            - slug: general
            - slug: vip
              actors: [alice, bob]
      actors:
        - { id: alice, type: user, scope: initech }
        - { id: alice, type: user }
    - id: demo
    - id: other
      apps: [ { slug: chat } ]
"#,
    );
    assert_has(
        &all,
        "policy.projects[0].scopes[1].slug",
        &["duplicate scope", "'acme'"],
    );
    assert_has(
        &all,
        "policy.projects[0].apps[0].rooms[1].slug",
        &["duplicate room", "'general'"],
    );
    assert_has(
        &all,
        "policy.projects[0].apps[0].rooms[2].actors[1]",
        &["unknown actor", "'bob'"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[0].scope",
        &["unknown scope", "'initech'"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[1].id",
        &["duplicate actor id", "'alice'"],
    );
    assert_has(
        &all,
        "policy.projects[1].id",
        &["duplicate project id", "'demo'"],
    );
    assert_has(
        &all,
        "policy.projects[2].apps[0].slug",
        &["already declared by project", "'chat'"],
    );
}

#[test]
fn invalid_slugs() {
    for (slug, why) in [
        ("_", "reserved"),
        ("a/b", "'/'"),
        ("a+b", "wildcard"),
        ("a#", "wildcard"),
        ("$sys", "'$'"),
        ("a\\0b", "NUL"),
        ("Chat", "upper case"),
        ("", "empty"),
    ] {
        let all = errors(&format!(
            "policy:\n  projects:\n    - id: demo\n      apps:\n        - slug: \"{slug}\"\n"
        ));
        assert_has(
            &all,
            "policy.projects[0].apps[0].slug",
            &["invalid slug", &format!("'{slug}'"), why],
        );
    }
    // Scopes, rooms, topics and project ids follow the same rule.
    let all = errors(
        r##"
policy:
  projects:
    - id: Demo
      scopes: [ { slug: _ } ]
      apps:
        - slug: chat
          topics: { "a/b": { user: read } }
          rooms: [ { slug: "#" } ]
"##,
    );
    assert_has(&all, "policy.projects[0].id", &["'Demo'", "upper case"]);
    assert_has(
        &all,
        "policy.projects[0].scopes[0].slug",
        &["'_'", "reserved"],
    );
    assert_has(
        &all,
        "policy.projects[0].apps[0].topics[\"a/b\"]",
        &["'a/b'"],
    );
    assert_has(&all, "policy.projects[0].apps[0].rooms[0].slug", &["'#'"]);
}

#[test]
fn lobby_errors_name_their_paths() {
    use cuttle::policy::MAX_LOBBY_ROOMS;
    let many = |n: usize| -> (String, String) {
        let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        let rooms = names
            .iter()
            .map(|r| format!("{{ slug: {r} }}"))
            .collect::<Vec<_>>()
            .join(", ");
        (format!("[ {rooms} ]"), format!("[ {} ]", names.join(", ")))
    };
    let (big_rooms, big_lobby) = many(MAX_LOBBY_ROOMS + 1);
    let all = errors(&format!(
        r#"
policy:
  projects:
    - id: demo
      apps:
        - slug: chat
          rooms: [ {{ slug: general }}, {{ slug: vip, actors: [alice] }}, {{ slug: Bad }} ]
          lobbies:
            - {{ slug: Hall, rooms: [general] }}
            - {{ slug: hall, rooms: [general, bob, general] }}
            - {{ slug: hall, rooms: [vip, ghost] }}
            - {{ slug: empty, rooms: [] }}
            - {{ slug: missing }}
            - {{ slug: general, rooms: [general, vip] }}
            - {{ slug: cascade, rooms: [Bad] }}
        - slug: big
          rooms: {big_rooms}
          lobbies: [ {{ slug: all, rooms: {big_lobby} }} ]
      actors: [ {{ id: alice, type: user }} ]
"#
    ));
    let lobby_errors: Vec<&str> = all.lines().filter(|l| l.contains(".lobbies[")).collect();
    let expected = [
        "error: policy.projects[0].apps[0].lobbies[0].slug: invalid slug 'Hall': upper case is not allowed (slugs are lower case)",
        "error: policy.projects[0].apps[0].lobbies[1].rooms[1]: unknown room 'bob'",
        "error: policy.projects[0].apps[0].lobbies[1].rooms[2]: duplicate room 'general'",
        "error: policy.projects[0].apps[0].lobbies[2].slug: duplicate lobby 'hall'",
        // The duplicate's rooms are still checked.
        "error: policy.projects[0].apps[0].lobbies[2].rooms[1]: unknown room 'ghost'",
        "error: policy.projects[0].apps[0].lobbies[3].rooms: a lobby needs at least one room",
        "error: policy.projects[0].apps[0].lobbies[4].rooms: a lobby needs at least one room",
        // lobbies[5]: a lobby named like a room is fine; lobbies[6]: the invalid room is
        // reported once, at the room.
        "error: policy.projects[0].apps[1].lobbies[0].rooms: 257 rooms: a lobby has at most 256",
    ];
    assert_eq!(lobby_errors, expected, "in:\n{all}");
    assert_has(
        &all,
        "policy.projects[0].apps[0].rooms[2].slug",
        &["invalid slug", "'Bad'"],
    );

    // At the bound, a lobby is valid; unknown keys inside a lobby are reported like any other.
    let (rooms, lobby) = many(MAX_LOBBY_ROOMS);
    let ok = format!(
        "policy:\n  projects:\n    - id: demo\n      apps:\n        - slug: chat\n          rooms: {rooms}\n          lobbies: [ {{ slug: all, rooms: {lobby} }} ]\n"
    );
    let loaded = load(&ok).unwrap_or_else(|d| panic!("{d}"));
    let project = loaded.policy.project("demo").unwrap();
    let (_, all_rooms) = project.lobby("all").unwrap();
    assert_eq!(all_rooms.rooms.len(), MAX_LOBBY_ROOMS);
    let all = errors(&ok.replace("{ slug: all,", "{ colour: red, slug: all,"));
    assert_has(
        &all,
        "policy.projects[0].apps[0].lobbies[0].colour",
        &["unknown key"],
    );
}

#[test]
fn malformed_hashes_and_credential_fields() {
    let all = errors(
        r#"
policy:
  projects:
    - id: demo
      actors:
        - { id: d1, type: device, token_sha256: "abc" }
        - { id: d2, type: device, token_sha256: "zz3ebc474c2923f993c61b8067e63e24d0c2557dd49fd6994c89dab4e0c8d012" }
        - { id: d3, type: device }
        - { id: s1, type: server, token_sha256: "dc3ebc474c2923f993c61b8067e63e24d0c2557dd49fd6994c89dab4e0c8d012" }
        - { id: u1, type: user, api_key_sha256: "dc3ebc474c2923f993c61b8067e63e24d0c2557dd49fd6994c89dab4e0c8d012" }
        - { id: x1, type: robot }
        - { id: x2, type: session }
        - { id: d4, type: device, token_sha256: "1e3607a693cbb61c29c65ba7a1eb0560b86a96818c6256965246516ba5ca01f5" }
        - { id: d5, type: device, token_sha256: "1e3607a693cbb61c29c65ba7a1eb0560b86a96818c6256965246516ba5ca01f5" }
"#,
    );
    assert_has(
        &all,
        "policy.projects[0].actors[0].token_sha256",
        &["malformed hash", "'abc'"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[1].token_sha256",
        &["malformed hash", "'zz3e"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[2].token_sha256",
        &["required"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[3].token_sha256",
        &["api_key_sha256"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[3].api_key_sha256",
        &["required"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[4].api_key_sha256",
        &["JWT"],
    );
    assert_has(
        &all,
        "policy.projects[0].actors[5].type",
        &["unknown actor type", "'robot'"],
    );
    assert_has(&all, "policy.projects[0].actors[6].type", &["session"]);
    assert_has(
        &all,
        "policy.projects[0].actors[8].token_sha256",
        &["already used", "'d4'"],
    );
}

#[test]
fn unknown_permissions_and_actor_types_in_acls_and_roles() {
    let all = errors(
        r#"
policy:
  projects:
    - id: demo
      roles: { mod: { messages: admin, nothing: read } }
      apps:
        - slug: chat
          topics:
            messages: { user: rw, robot: read }
"#,
    );
    assert_has(
        &all,
        "policy.projects[0].apps[0].topics.messages.user",
        &["unknown permission", "'rw'"],
    );
    assert_has(
        &all,
        "policy.projects[0].apps[0].topics.messages.robot",
        &["unknown actor type", "'robot'"],
    );
    assert_has(
        &all,
        "policy.projects[0].roles.mod.messages",
        &["unknown permission", "'admin'"],
    );
    assert_has(
        &all,
        "policy.projects[0].roles.mod.nothing",
        &["unknown topic", "'nothing'"],
    );
}

#[test]
fn jwt_and_session_settings() {
    let all = errors_with_env(
        r#"
policy:
  projects:
    - id: a
      jwt: { issuer: https://x, audience: c, algorithms: [HS256, RS256, XX999], secret_env: JWT_SECRET }
    - id: b
      jwt: { issuer: https://x, audience: c, algorithms: [RS256], secret_env: JWT_SECRET }
    - id: c
      jwt: { issuer: https://y, audience: c, algorithms: [HS256], public_key_file: rsa_public.pem }
    - id: d
      jwt: { issuer: https://z, audience: c, algorithms: [ES256], public_key_file: missing.pem }
    - id: e
      jwt: { issuer: https://w, audience: c, algorithms: [HS256], secret_env: SHORT }
      session: { secret_env: SESSION_SECRET, max_ttl_s: 0 }
    - id: f
      jwt: { issuer: https://x, audience: c, algorithms: [HS256], secret_env: JWT_SECRET }
"#,
        &|v| match v {
            "SHORT" => Some("too-short".into()),
            other => test_env(other),
        },
    );
    assert_has(
        &all,
        "policy.projects[0].jwt.algorithms[2]",
        &["unknown algorithm", "'XX999'"],
    );
    assert_has(
        &all,
        "policy.projects[0].jwt.algorithms[1]",
        &["one family"],
    );
    assert_has(&all, "policy.projects[1].jwt.secret_env", &["HMAC secret"]);
    assert_has(
        &all,
        "policy.projects[2].jwt.public_key_file",
        &["HMAC", "secret_env"],
    );
    assert_has(
        &all,
        "policy.projects[3].jwt.public_key_file",
        &["missing.pem"],
    );
    assert_has(
        &all,
        "policy.projects[4].jwt.secret_env",
        &["'SHORT'", "at least 32"],
    );
    assert_has(
        &all,
        "policy.projects[4].session.max_ttl_s",
        &["0", "out of range"],
    );
    assert_has(
        &all,
        "policy.projects[5].jwt.issuer",
        &["'https://x'", "already used"],
    );
}

#[test]
fn settings_errors() {
    let all = errors(
        r#"
listen: localhost
admin: 127.0.0.1:99999
upstream: { broker: "amqp://x", pool: 0, topic_prefix: "a/#" }
limits: { idle_timeout_ms: 1000, send_queue: 0 }
log: { format: xml }
tls: { cert: nope.crt, key: nope.key }
policy: { projects: [] }
"#,
    );
    assert_has(&all, "listen", &["'localhost'"]);
    assert_has(&all, "admin", &["'127.0.0.1:99999'"]);
    assert_has(&all, "upstream.broker", &["'amqp://x'"]);
    assert_has(&all, "upstream.pool", &["0", "out of range"]);
    assert_has(&all, "upstream.topic_prefix", &["'a/#'"]);
    assert_has(&all, "limits.idle_timeout_ms", &["1000"]);
    assert_has(&all, "limits.send_queue", &["0"]);
    assert_has(&all, "log.format", &["'xml'"]);
    assert_has(&all, "tls.cert", &["nope.crt"]);
}

#[test]
fn policy_is_required_and_exclusive() {
    assert!(errors("listen: 127.0.0.1:1\n").contains("error: policy: "));
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.yaml", "projects: []\n");
    let p = write(
        dir.path(),
        "proxy.yaml",
        "policy_file: p.yaml\npolicy: { projects: [] }\n",
    );
    let e = config::load_with_env(&p, &test_env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("error: policy_file: "), "{e}");
}

#[test]
fn policy_file_errors_are_reported_under_policy() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "policy.yaml",
        "projects:\n  - id: demo\n    colour: red\n",
    );
    let p = write(dir.path(), "proxy.yaml", "policy_file: policy.yaml\n");
    let e = config::load_with_env(&p, &test_env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("error: policy.projects[0].colour: unknown key"),
        "{e}"
    );
    // And a valid one loads, with its file recorded for the watcher.
    write(dir.path(), "policy.yaml", "projects:\n  - id: demo\n");
    let loaded = config::load_with_env(&p, &test_env).unwrap();
    assert_eq!(
        loaded.sources.policy_file,
        Some(dir.path().join("policy.yaml"))
    );
}

#[test]
fn cuttle_check_lists_every_error_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "proxy.yaml",
        r#"
upstream: { pool: 0 }
policy:
  projects:
    - id: demo
      apps:
        - slug: Chat
          rooms: [ { slug: vip, actors: [ghost] } ]
      actors:
        - { id: d, type: device, token_sha256: nothex }
"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "upstream.pool",
        "policy.projects[0].apps[0].slug: invalid slug 'Chat'",
        "policy.projects[0].apps[0].rooms[0].actors[0]: unknown actor 'ghost'",
        "policy.projects[0].actors[0].token_sha256: malformed hash 'nothex'",
        "4 error(s)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }

    let ok = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn cli_hash_token_and_session_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .args(["hash-token", "demo-sensor-1-token"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha("demo-sensor-1-token")
    );

    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "proxy.yaml",
        &format!("policy:\n{}", indent(&policy_yaml())),
    );
    // The fixture keys are referenced relative to the config file.
    copy_key_fixtures(dir.path());
    let mint = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cuttle"))
            .env("JWT_SECRET", JWT_SECRET)
            .env("SESSION_SECRET", SESSION_SECRET)
            .arg("session-token")
            .arg("--config")
            .arg(&p)
            .args(args)
            .output()
            .unwrap()
    };
    let out = mint(&[
        "--project",
        "demo",
        "--ttl",
        "15m",
        "--scope",
        "acme",
        "--room",
        "chat/general",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let actor = authenticator().authenticate(token.trim()).unwrap();
    assert_eq!(actor.scope(), Some("acme"));
    assert!(actor.expires_at.unwrap() >= now() + 890);

    let refused = mint(&["--project", "demo", "--ttl", "2h"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("max_ttl_s"));
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn reserved_issuer_duplicate_project_bodies_and_hostile_keys() {
    let all = errors(
        r#"
policy:
  projects:
    - id: a
      jwt: { issuer: cuttle-session, audience: a, algorithms: [HS256], secret_env: JWT_SECRET }
    - id: a
      apps: [ { slug: Bad } ]
    - id: b
      apps:
        - slug: chat
          topics: { "x\nerror: policy.fake: forged": { user: read } }
"#,
    );
    assert_has(&all, "policy.projects[0].jwt.issuer", &["reserved"]);
    assert_has(&all, "policy.projects[1].id", &["duplicate project id"]);
    // The duplicate's body is still checked.
    assert_has(&all, "policy.projects[1].apps[0].slug", &["'Bad'"]);
    // A key with a newline cannot forge a line of output.
    assert!(
        !all.lines().any(|l| l.starts_with("error: policy.fake")),
        "{all}"
    );
}

/// The errors of the repository's `proxy.yaml` after replacing `from` with `to` in it, one
/// string per error, in order.
fn errors_in_demo_with(edits: &[(&str, &str)]) -> Vec<String> {
    let mut text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml")).unwrap();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "proxy.yaml no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "proxy.yaml", &text);
    match config::load_with_env(&p, &|_| None) {
        Ok(_) => panic!("should be invalid:\n{text}"),
        Err(d) => d.errors().map(ToString::to_string).collect(),
    }
}

/// One mistake, one error. An app with any error used to be dropped before the roles were
/// checked against its topics, so a room naming an unknown actor, or a topic with an invalid
/// permission, also reported `roles.moderator.analytics: unknown topic 'analytics'` for a
/// topic that exists.
#[test]
fn each_mistake_in_an_app_is_reported_once() {
    const ROOM: (&str, &str) = ("actors: [alice, billing]", "actors: [alice, bob]");
    const PERM: (&str, &str) = (
        "messages:      { device: read-write",
        "messages:      { device: readwrite",
    );
    let unknown_actor = "error: policy.projects[0].apps[0].rooms[1].actors[1]: unknown actor 'bob'";
    let bad_permission = "error: policy.projects[0].apps[0].topics.messages.device: unknown permission 'readwrite' (expected read, write, read-write or none)";
    assert_eq!(errors_in_demo_with(&[ROOM]), [unknown_actor]);
    assert_eq!(errors_in_demo_with(&[PERM]), [bad_permission]);
    assert_eq!(
        errors_in_demo_with(&[ROOM, PERM]),
        [bad_permission, unknown_actor]
    );
    // A grant naming a topic that really is missing is still reported.
    assert_eq!(
        errors_in_demo_with(&[ROOM, ("analytics: read", "analytic: read")]),
        [
            unknown_actor,
            "error: policy.projects[0].roles.moderator.analytic: unknown topic 'analytic': a grant names `topic` (in any app) or `app/topic` of this project",
        ]
    );
}

/// The same for what is left out for an error of its own: a grant naming a topic whose name
/// is invalid, a room listing an actor whose type is invalid.
#[test]
fn what_is_left_out_for_its_own_error_is_not_reported_again() {
    assert_eq!(
        errors_in_demo_with(&[
            ("analytics: read", "Analytics: read"),
            ("analytics:     {", "Analytics:     {"),
            ("{ id: billing, type: server", "{ id: billing, type: robot"),
        ]),
        [
            "error: policy.projects[0].actors[3].type: unknown actor type 'robot' (expected device, user or server)",
            "error: policy.projects[0].apps[0].topics.Analytics: invalid topic name 'Analytics': upper case is not allowed (slugs are lower case)",
        ]
    );
}

#[test]
fn webhook_endpoints_are_validated_with_their_paths() {
    let env = |var: &str| match var {
        "HOOK" => Some(WEBHOOK_SECRET.to_string()),
        "NOT_WHSEC" => Some("a-plain-string-that-is-long-enough-0123456789".to_string()),
        other => test_env(other),
    };
    let all = errors_with_env(
        r#"
policy:
  projects:
    - id: demo
      webhooks:
        - { url: "http://127.0.0.1:9000/hook", secret_env: HOOK, events: [connect] }
        - { url: "https://169.254.169.254/latest", secret_env: HOOK, events: [connect] }
        - { url: "ftp://example.com/x", secret_env: HOOK, events: [connect] }
        - { url: "https://example.com/a", secret_env: HOOK, events: [connect, connect, teleport] }
        - { url: "https://example.com/a", secret_env: HOOK, events: [publish] }
        - { url: "https://example.com/b", secret_env: NOT_WHSEC, events: [publish], topics: ["chat/#/x"] }
        - { url: "https://example.com/c", secret_env: HOOK, events: [] }
        - { url: "https://example.com/d", secret_env: HOOK, events: [presence], batch_window_ms: 999999 }
        - { url: "https://[::1]:8443/e", secret_env: HOOK, events: [presence] }
"#,
        &env,
    );
    let w = "policy.projects[0].webhooks";
    assert_has(
        &all,
        &format!("{w}[0].url"),
        &["127.0.0.1", "allow_private: true"],
    );
    assert_has(
        &all,
        &format!("{w}[1].url"),
        &["169.254.169.254", "link-local"],
    );
    assert_has(&all, &format!("{w}[2].url"), &["https or http"]);
    assert_has(
        &all,
        &format!("{w}[3].events[1]"),
        &["duplicate event type 'connect'"],
    );
    assert_has(
        &all,
        &format!("{w}[3].events[2]"),
        &["unknown event type 'teleport'"],
    );
    assert_has(&all, &format!("{w}[4].url"), &["duplicate webhook url"]);
    assert_has(
        &all,
        &format!("{w}[5].secret_env"),
        &["'NOT_WHSEC'", "whsec_"],
    );
    assert!(
        !all.contains("a-plain-string"),
        "a secret is never printed:\n{all}"
    );
    assert_has(&all, &format!("{w}[5].topics[0]"), &["invalid filter"]);
    assert_has(
        &all,
        &format!("{w}[6].events"),
        &["at least one event type"],
    );
    assert_has(&all, &format!("{w}[7].batch_window_ms"), &["out of range"]);
    assert_has(&all, &format!("{w}[8].url"), &["::1"]);

    // Private targets are accepted when the endpoint says so; an unset secret is a warning
    // and the endpoint is off (failing closed), not an error.
    let loaded = load_with(
        r#"
policy:
  projects:
    - id: demo
      webhooks:
        - { url: "http://127.0.0.1:9000/hook", secret_env: HOOK, events: [connect], allow_private: true }
        - { url: "https://hooks.example.com/x", secret_env: UNSET_HOOK, events: [connect] }
"#,
        &env,
    )
    .unwrap_or_else(|d| panic!("{d}"));
    let warnings = loaded.warnings.to_string();
    assert!(
        warnings.contains("policy.projects[0].webhooks[1].secret_env"),
        "{warnings}"
    );
    let demo = loaded.policy.project("demo").unwrap();
    assert!(demo.webhooks[0].wants(cuttle::webhook::EventKind::Connect));
    assert!(!demo.webhooks[1].wants(cuttle::webhook::EventKind::Connect));
}

fn load_with(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<config::Loaded, Diagnostics> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "proxy.yaml", text);
    config::load_with_env(&p, env)
}

#[test]
fn upstream_broker_lists_protocols_and_trust_anchors() {
    let s = load(
        "upstream: { brokers: [\"mqtt://a:1883\", \"mqtts://b\", \"mqtt://[::1]:1884\"], protocol: v3 }\npolicy: { projects: [] }\n",
    )
    .unwrap_or_else(|d| panic!("{d}"))
    .settings;
    let Broker::Remote(endpoints) = &s.upstream.broker else {
        panic!("{:?}", s.upstream.broker)
    };
    let got: Vec<(String, u16, bool)> = endpoints
        .iter()
        .map(|e| (e.host.clone(), e.port, e.tls))
        .collect();
    assert_eq!(
        got,
        [
            ("a".into(), 1883, false),
            ("b".into(), 8883, true),
            ("::1".into(), 1884, false)
        ]
    );
    assert_eq!(s.upstream.protocol, cuttle::upstream::Protocol::V3);
    // Default: MQTT 5, falling back to 3.1.1.
    let s = load("policy: { projects: [] }\n").unwrap().settings;
    assert_eq!(s.upstream.protocol, cuttle::upstream::Protocol::Auto);

    let all = errors(
        "upstream: { broker: \"mqtt://a\", brokers: [\"mqtt://b\"], protocol: v4.2, ca_file: nope.pem }\npolicy: { projects: [] }\n",
    );
    assert_has(&all, "upstream.brokers", &["either", "not both"]);
    assert_has(&all, "upstream.protocol", &["'v4.2'", "auto, v5 or v3"]);
    assert_has(&all, "upstream.ca_file", &["nope.pem"]);
    let all = errors(
        "upstream: { brokers: [\"mqtt://a\", \"embedded\", \"tcp://c\"] }\npolicy: { projects: [] }\n",
    );
    assert_has(&all, "upstream.brokers[1]", &["embedded"]);
    let all =
        errors("upstream: { brokers: [\"mqtt://a\", \"tcp://c\"] }\npolicy: { projects: [] }\n");
    assert_has(&all, "upstream.brokers[1]", &["'tcp://c'"]);

    // A CA file that holds no certificate.
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", "not a certificate\n");
    let all = errors(&format!(
        "upstream: {{ broker: \"mqtts://b\", ca_file: {} }}\npolicy: {{ projects: [] }}\n",
        ca.display()
    ));
    assert_has(&all, "upstream.ca_file", &["no certificate"]);
}
