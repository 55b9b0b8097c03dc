//! Drives the real proxy (in-process, embedded broker and Mosquitto) from Node with `ws` and
//! `@msgpack/msgpack`, as a browser app would: `tests/node/e2e.mjs`. Needs `node` and `npm`;
//! installs the two npm packages (pinned by `tests/node/package-lock.json`) on first run, and
//! fails loudly rather than skipping when Node is missing.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::server::*;
use common::*;

fn ensure_node_modules(dir: &Path) {
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is required for this test (Node 20+; apt-get install nodejs or use nvm)"
    );
    if dir.join("node_modules/ws").is_dir() && dir.join("node_modules/@msgpack/msgpack").is_dir() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir)
        .status()
        .expect("npm is required for this test");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

async fn run(b: TestBroker) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    ensure_node_modules(&dir);
    let p = start_proxy(b, "").await;
    let out = tokio::process::Command::new("node")
        .arg(dir.join("e2e.mjs"))
        .args([
            p.url.as_str(),
            SENSOR1_TOKEN,
            SENSOR2_TOKEN,
            &hs256(&user_claims("alice")),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("node runs");
    assert!(
        out.status.success(),
        "node e2e failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_against_embedded_broker() {
    run(TestBroker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_against_mosquitto() {
    run(TestBroker::Mosquitto).await;
}

/// Close codes as a Node `ws` client sees them: 1009 for an oversize frame before and after
/// auth (with a real close handshake, not a reset), 1001 for authenticated and
/// unauthenticated sockets the moment the proxy drains (`tests/node/close_codes.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_sees_real_close_codes() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    ensure_node_modules(&dir);
    let p = start_proxy(TestBroker::Embedded, "").await;
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("close_codes.mjs"))
        .args([p.url.as_str(), SENSOR1_TOKEN])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
        .await
        .expect("the script reaches its drain phase")
        .unwrap();
    if ready.as_deref() == Some("ready") {
        p.proxy.begin_shutdown();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the script ends")
        .unwrap();
    let mut rest = String::new();
    while let Ok(Some(l)) = lines.next_line().await {
        rest.push_str(&l);
        rest.push('\n');
    }
    println!("{rest}");
    assert!(
        out.status.success() && ready.as_deref() == Some("ready"),
        "close codes failed (first line {ready:?}):\n{rest}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
