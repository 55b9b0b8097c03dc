//! The process's logs as an operator receives them: the real `cuttle` binary, its stderr
//! captured (a pipe, or a pseudo-terminal through `script`), in both formats.
//!
//! - no ANSI escape codes unless stderr is a terminal, and none with `NO_COLOR` even then;
//! - one start-up record with the version, the listeners as bound, the broker and the policy
//!   generation;
//! - JSON: one object per line; a connection's records carry its span (peer, actor, type,
//!   scope); a rejected reload with several errors is one record; denials at debug with their
//!   reason; no credential in any line.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::*;
use common::*;
use rmpv::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cuttle");

/// A config directory with the test policy on the embedded broker, ports chosen by the OS.
fn config_dir(format: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    copy_key_fixtures(dir.path());
    let indented: String = policy_yaml().lines().map(|l| format!("  {l}\n")).collect();
    let text = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {{ broker: embedded, pool: 2 }}\nlog: {{ format: {format}, level: info }}\nshutdown: {{ grace_s: 2 }}\npolicy:\n{indented}"
    );
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn secrets(cmd: &mut Command) -> &mut Command {
    cmd.env("JWT_SECRET", JWT_SECRET)
        .env("SESSION_SECRET", SESSION_SECRET)
        .env_remove("RUST_LOG")
        .env_remove("CUTTLE_LOG_FORMAT")
        .env_remove("NO_COLOR")
}

/// A running proxy whose stderr goes to a file; killed (and reaped) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        secrets(&mut cmd)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cuttle starts");
        Self { child, log }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.text();
            if t.contains(needle) {
                return t;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the whole log once the process has exited.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "cuttle did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.text()
    }
}

#[test]
fn pretty_logs_to_a_pipe_have_no_colour_and_one_start_up_line() {
    let (_dir, config) = config_dir("pretty");
    let p = Proc::start(&config, &[]);
    p.wait_for("cuttle started");
    let text = p.stop();
    assert!(!text.contains('\x1b'), "ANSI escape in piped logs:\n{text}");
    let started: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cuttle started"))
        .collect();
    assert_eq!(started.len(), 1, "{text}");
    let line = started[0];
    for field in [
        concat!("version=", env!("CARGO_PKG_VERSION")),
        "listen=ws://127.0.0.1:",
        "admin=http://127.0.0.1:",
        "broker=embedded (mqtt://127.0.0.1:",
        "policy_generation=1",
        "pool=2",
    ] {
        assert!(line.contains(field), "{field} missing from: {line}");
    }
    // The port as bound, never the configured 0.
    assert!(!line.contains("127.0.0.1:0/"), "{line}");
}

/// `script` gives the process a pseudo-terminal for stderr: colour then, unless `NO_COLOR`.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    assert!(
        Command::new("script").arg("--version").output().is_ok(),
        "`script` (util-linux) is needed to give the proxy a terminal"
    );
    let on_tty = |no_color: Option<&str>| -> String {
        let (_dir, config) = config_dir("pretty");
        // `timeout` ends the proxy with SIGTERM after 3 s; `script` then exits too.
        let inner = format!("timeout -s TERM 3 {BIN} run --config {}", config.display());
        let mut cmd = Command::new("script");
        secrets(&mut cmd)
            .args(["-qefc", &inner, "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = child.wait();
        assert!(
            out.contains("cuttle started"),
            "no start-up line on the terminal:\n{out}"
        );
        out
    };
    let coloured = on_tty(None);
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal:\n{coloured}"
    );
    let plain = on_tty(Some("1"));
    assert!(!plain.contains('\x1b'), "colour despite NO_COLOR:\n{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_connection_span_and_keep_multi_line_errors_whole() {
    let (_dir, config) = config_dir("json");
    let p = Proc::start(&config, &[("RUST_LOG", "info,cuttle=debug")]);
    let text = p.wait_for("cuttle started");
    let started = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "cuttle started")
        .expect("a JSON start-up record");
    assert_eq!(started["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(started["policy_generation"], 1);
    let listen = started["listen"].as_str().unwrap().to_string();
    assert!(listen.starts_with("ws://127.0.0.1:"), "{listen}");

    // A device connects and is denied a publish; a bad token is refused.
    let mut c = Client::login(&listen, SENSOR1_TOKEN).await;
    c.publish("chat/general/analytics", Value::from("x")).await;
    c.frame_of("error").await;
    let (_, refused) = Client::auth(&listen, "tok-not-a-real-one").await;
    assert_eq!(get(&refused, "success"), Some(&Value::Boolean(false)));
    let jwt = hs256(&user_claims("alice"));
    let _alice = Client::login(&listen, &jwt).await;

    // A config edit with two errors: rejected, logged as one record.
    let yaml = std::fs::read_to_string(&config).unwrap();
    let broken = yaml
        .replace("pool: 2", "pool: 0")
        .replace("grace_s: 2", "grace_s: 7200");
    std::fs::write(&config, broken).unwrap();
    p.wait_for("config reload rejected");
    drop(c);
    let text = p.stop();

    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"))
        })
        .collect();
    let find = |message: &str| {
        records
            .iter()
            .find(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no {message:?} record in\n{text}"))
    };
    // The session's span: peer, actor, type, project, scope.
    let authenticated = find("authenticated");
    let span = &authenticated["span"];
    assert_eq!(span["name"], "session");
    assert_eq!(span["actor"], "sensor-1");
    assert_eq!(span["actor_type"], "device");
    assert_eq!(span["project"], "demo");
    assert_eq!(span["scope"], "acme");
    assert!(span["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    // Denials at debug, with their reason.
    let denied = find("publish denied");
    assert_eq!(denied["level"], "DEBUG");
    assert!(denied["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let refused = find("authentication failed");
    assert_eq!(refused["level"], "DEBUG");
    assert_eq!(refused["reason"], "unknown credential");
    // The rejected reload: one record holding every error.
    let rejected: Vec<_> = records
        .iter()
        .filter(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("config reload rejected"))
        })
        .collect();
    assert_eq!(rejected.len(), 1, "{text}");
    let message = rejected[0]["message"].as_str().unwrap();
    assert!(message.contains("upstream.pool"), "{message}");
    assert!(message.contains("shutdown.grace_s"), "{message}");
    assert_eq!(rejected[0]["errors"], 2);
    // No credential the clients presented, nor the secrets, in any line.
    for secret in [
        SENSOR1_TOKEN,
        "tok-not-a-real-one",
        &jwt,
        JWT_SECRET,
        SESSION_SECRET,
    ] {
        assert!(!text.contains(secret), "{secret} in the log");
    }
    assert!(!text.contains('\x1b'));
}
