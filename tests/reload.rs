//! Hot reload (DESIGN §5): atomic swaps, rejection of invalid policies, change notification,
//! cache reset, restart-needed reporting, and the file watcher with plain edits and
//! Kubernetes-style ConfigMap symlink swaps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cuttle::config;
use cuttle::reload::{self, PolicyStore, ReloadOutcome};

fn sha(t: &str) -> String {
    hex::encode(cuttle::auth::sha256(t))
}

/// A config with one device per entry of `devices`, and optional extra top-level YAML.
fn config_text(devices: &[&str], extra: &str) -> String {
    let mut s = format!(
        "{extra}\nreload: {{ debounce_ms: 50 }}\npolicy:\n  projects:\n    - id: demo\n      apps: [ {{ slug: chat, topics: {{ m: {{ device: read }} }}, rooms: [ {{ slug: r }} ] }} ]\n      actors:\n"
    );
    for d in devices {
        s.push_str(&format!(
            "        - {{ id: {d}, type: device, token_sha256: \"{}\" }}\n",
            sha(d)
        ));
    }
    s
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn store_for(path: &Path) -> Arc<PolicyStore> {
    PolicyStore::new(config::load_with_env(path, &no_env).expect("valid config"))
}

fn write_atomically(path: &Path, text: &str) {
    // Editors and config-management tools replace files by rename.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn reload_swaps_notifies_and_drops_the_auth_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(&["d1"], "")).unwrap();
    let store = store_for(&path);
    let mut changes = store.subscribe();
    assert_eq!(store.generation(), 1);
    let before = store.snapshot();
    assert!(before.auth.authenticate("d1").is_ok());
    assert!(before.auth.authenticate("d2").is_err());

    // Unchanged sources are not a new generation.
    assert!(matches!(
        store.reload_blocking(&no_env),
        ReloadOutcome::Unchanged
    ));
    assert_eq!(store.stats.unchanged.load(Ordering::Relaxed), 1);

    std::fs::write(&path, config_text(&["d2"], "")).unwrap();
    match store.reload_blocking(&no_env) {
        ReloadOutcome::Applied {
            generation,
            restart_needed,
        } => {
            assert_eq!(generation, 2);
            assert!(restart_needed.is_empty(), "{restart_needed:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 2);
    let after = store.snapshot();
    assert!(
        after.auth.authenticate("d1").is_err(),
        "removed actor refused at once"
    );
    assert!(
        after.auth.authenticate("d2").is_ok(),
        "new actor accepted at once"
    );
    assert!(!Arc::ptr_eq(&before.policy, &after.policy));
    // The old snapshot (held by an in-flight decision) is untouched.
    assert!(before.auth.authenticate("d1").is_ok());
}

#[test]
fn cached_resolutions_do_not_survive_a_reload() {
    const SECRET: &str = "reload-test-session-secret-0123456789abcdef";
    let env = |v: &str| (v == "SESSION_SECRET").then(|| SECRET.to_string());
    let with_sessions = |devices: &[&str]| {
        config_text(devices, "").replace(
            "    - id: demo\n",
            "    - id: demo\n      session: { secret_env: SESSION_SECRET }\n",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, with_sessions(&["d1"])).unwrap();
    let store = PolicyStore::new(config::load_with_env(&path, &env).unwrap());
    let before = store.snapshot();
    let req = cuttle::auth::session_token::MintRequest {
        project: "demo".into(),
        ttl_s: 60,
        ..Default::default()
    };
    let now = cuttle::auth::session_token::now_unix();
    let token = cuttle::auth::session_token::mint(&before.policy, &req, now).unwrap();
    before.auth.authenticate(&token).unwrap();
    before.auth.authenticate(&token).unwrap();
    assert_eq!(
        before.auth.verifications(),
        1,
        "second resolution was cached"
    );

    std::fs::write(&path, with_sessions(&["d1", "d2"])).unwrap();
    assert!(matches!(
        store.reload_blocking(&env),
        ReloadOutcome::Applied { .. }
    ));
    let after = store.snapshot();
    after.auth.authenticate(&token).unwrap();
    assert_eq!(
        after.auth.verifications(),
        1,
        "the new snapshot verified afresh"
    );
}

#[test]
fn invalid_policy_is_rejected_and_the_old_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(&["d1"], "")).unwrap();
    let store = store_for(&path);
    std::fs::write(
        &path,
        config_text(&["d1"], "").replace("slug: chat", "slug: Chat"),
    )
    .unwrap();
    match store.reload_blocking(&no_env) {
        ReloadOutcome::Rejected(d) => assert!(d.to_string().contains("invalid slug 'Chat'"), "{d}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.generation(), 1);
    assert_eq!(store.stats.failed.load(Ordering::Relaxed), 1);
    assert!(store.load().auth.authenticate("d1").is_ok());
    // A file that is not even YAML.
    std::fs::write(&path, "policy: [ unclosed").unwrap();
    assert!(matches!(
        store.reload_blocking(&no_env),
        ReloadOutcome::Rejected(_)
    ));
    assert_eq!(store.stats.failed.load(Ordering::Relaxed), 2);
    assert_eq!(store.generation(), 1);
}

#[test]
fn settings_changes_are_reported_as_needing_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(&["d1"], "")).unwrap();
    let store = store_for(&path);
    std::fs::write(
        &path,
        config_text(
            &["d1", "d2"],
            "listen: 127.0.0.1:18080\nlimits: { send_queue: 16 }",
        ),
    )
    .unwrap();
    match store.reload_blocking(&no_env) {
        ReloadOutcome::Applied { restart_needed, .. } => {
            assert_eq!(restart_needed, ["listen", "limits"]);
        }
        other => panic!("{other:?}"),
    }
    // The policy part was applied; the running settings were not.
    assert!(store.load().auth.authenticate("d2").is_ok());
    assert_eq!(store.settings().limits.send_queue, 1024);
}

async fn wait_for_generation(store: &PolicyStore, generation: u64) {
    let mut rx = store.subscribe();
    let wait = async {
        while *rx.borrow_and_update() < generation {
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "generation {generation} not reached; at {}",
                store.generation()
            )
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_picks_up_edits_of_a_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let body = |devices: &[&str]| {
        config_text(devices, "")
            .split_once("policy:\n")
            .unwrap()
            .1
            .lines()
            .map(|l| l.strip_prefix("  ").unwrap_or(l).to_string() + "\n")
            .collect::<String>()
    };
    std::fs::write(&policy, body(&["d1"])).unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "reload: { debounce_ms: 50 }\npolicy_file: policy.yaml\n",
    )
    .unwrap();
    let store = store_for(&path);
    let _watcher = reload::watch(store.clone()).unwrap();

    write_atomically(&policy, &body(&["d1", "d2"]));
    wait_for_generation(&store, 2).await;
    assert!(store.load().auth.authenticate("d2").is_ok());

    // An invalid edit is rejected and counted; the policy keeps serving.
    write_atomically(&policy, "projects: [ { id: BAD } ]\n");
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.stats.failed.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("rejection counted");
    assert_eq!(store.generation(), 2);
    assert!(store.load().auth.authenticate("d2").is_ok());

    // In-place writes (no rename) are seen too.
    std::fs::write(&policy, body(&["d3"])).unwrap();
    wait_for_generation(&store, 3).await;
    assert!(store.load().auth.authenticate("d3").is_ok());
}

/// Lays out a directory the way the kubelet mounts a ConfigMap:
/// `proxy.yaml -> ..data/proxy.yaml`, `..data -> ..<version>/`.
fn configmap_version(dir: &Path, version: &str, text: &str) -> PathBuf {
    let v = dir.join(version);
    std::fs::create_dir(&v).unwrap();
    std::fs::write(v.join("proxy.yaml"), text).unwrap();
    v
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_follows_configmap_symlink_swaps() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    configmap_version(dir.path(), "..2026_01_01", &config_text(&["d1"], ""));
    symlink("..2026_01_01", dir.path().join("..data")).unwrap();
    symlink("..data/proxy.yaml", dir.path().join("proxy.yaml")).unwrap();
    let path = dir.path().join("proxy.yaml");
    let store = store_for(&path);
    let _watcher = reload::watch(store.clone()).unwrap();

    // The kubelet's update: write a new version dir, point a temp symlink at it, rename the
    // temp symlink over `..data`. The file `proxy.yaml` itself is never written.
    configmap_version(dir.path(), "..2026_01_02", &config_text(&["d2"], ""));
    symlink("..2026_01_02", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(dir.path().join("..2026_01_01")).unwrap();

    wait_for_generation(&store, 2).await;
    let snap = store.load();
    assert!(snap.auth.authenticate("d2").is_ok());
    assert!(snap.auth.authenticate("d1").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_trigger_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(&["d1"], "")).unwrap();
    let store = store_for(&path);
    let watcher = reload::watch(store.clone()).unwrap();
    // SIGHUP's path: a trigger re-reads the sources; unchanged sources keep the generation.
    watcher.trigger();
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.stats.unchanged.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("trigger re-read the sources");
    assert_eq!(store.generation(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_neighbouring_file_does_not_hold_back_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(&["d1"], "")).unwrap();
    let store = store_for(&path);
    let _watcher = reload::watch(store.clone()).unwrap();
    // Another process appends to a log in the same directory every 20 ms, for 5 s.
    let log = dir.path().join("app.log");
    let writer = tokio::spawn(async move {
        for i in 0..250 {
            std::fs::write(&log, format!("line {i}\n")).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_atomically(&path, &config_text(&["d2"], ""));
    let started = std::time::Instant::now();
    wait_for_generation(&store, 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reload waited {:?} for an unrelated file",
        started.elapsed()
    );
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_public_key_file_is_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::copy(fixtures.join("rsa_public.pem"), dir.path().join("idp.pem")).unwrap();
    let jwt = "      jwt: { issuer: https://idp, audience: c, algorithms: [RS256], public_key_file: idp.pem }\n";
    let text =
        config_text(&["d1"], "").replace("    - id: demo\n", &format!("    - id: demo\n{jwt}"));
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    let store = store_for(&path);
    assert!(
        store
            .sources()
            .key_files
            .iter()
            .any(|f| f.ends_with("idp.pem"))
    );
    let _watcher = reload::watch(store.clone()).unwrap();
    // The identity provider rotates its key: only the PEM file changes.
    write_atomically(
        &dir.path().join("idp.pem"),
        &std::fs::read_to_string(fixtures.join("rsa2_public.pem")).unwrap(),
    );
    wait_for_generation(&store, 2).await;
}
