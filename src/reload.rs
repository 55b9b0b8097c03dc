//! Live policy: the current snapshot, atomic swaps, change notification, and the file watcher
//! that drives hot reload (DESIGN §5).
//!
//! Readers call [`PolicyStore::load`] (one atomic load through `arc-swap`, no lock) once per
//! decision and use that snapshot to the end of it. A reload parses and validates on a blocking
//! thread, off the async workers, then swaps the whole snapshot in one store; an invalid policy
//! is logged, counted, and never replaces a valid one. Sessions learn of a swap through
//! [`PolicyStore::subscribe`] (a `watch` channel carrying the generation) and re-evaluate
//! themselves.
//!
//! The watcher watches the *directories* of the config and policy files, not the files: a
//! Kubernetes ConfigMap update swaps a `..data` symlink and never touches the file's own inode,
//! and editors often replace files by rename. Any event in those directories, debounced, leads
//! to a re-read; the content digest decides whether anything actually changed.
//!
//! The store also holds the client listener's TLS certificate (when `tls` is set), behind its
//! own `ArcSwap`: the certificate and key files are watched with the policy's sources, and a
//! re-read that finds them changed and valid swaps the rustls config that new connections
//! load. It has its own digest, so a rotated certificate is not a new policy generation and
//! sessions are not re-evaluated; a bad new certificate is rejected like a bad policy, and the
//! old one keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, Guard};
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::auth::{AuthCacheSettings, Authenticator};
use crate::config::{self, Loaded, Settings, Sources};
use crate::diagnostics::Diagnostics;
use crate::policy::Policy;
use crate::tls::ServerTls;

/// One immutable policy generation: the compiled policy and the authenticator (with its own
/// cache) built for it.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub policy: Arc<Policy>,
    pub auth: Authenticator,
    pub digest: [u8; 32],
    pub loaded_at: SystemTime,
}

/// Reload outcomes, for logs now and metrics later.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// Re-reads that found the sources unchanged.
    pub unchanged: AtomicU64,
    /// TLS certificate rotations applied.
    pub tls_rotated: AtomicU64,
}

/// What one reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    Applied {
        generation: u64,
        /// Settings sections that changed on disk but need a restart to take effect.
        restart_needed: Vec<&'static str>,
    },
    /// Only the TLS certificate and key changed; new connections are served with them.
    TlsRotated,
    Unchanged,
    /// The configuration is invalid; the policy in use stays. (A valid rotated certificate is
    /// still applied: it expires on its own clock, whatever else is being edited.)
    Rejected(Diagnostics),
}

/// The live policy of the process.
pub struct PolicyStore {
    current: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
    cache: AuthCacheSettings,
    /// The settings the process runs with, to tell which changes need a restart.
    settings: Settings,
    sources: Sources,
    /// The client listener's certificate, when `tls` is set.
    tls: Option<ArcSwap<ServerTls>>,
    pub stats: ReloadStats,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("generation", &self.generation())
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl PolicyStore {
    /// Starts from a loaded configuration as generation 1.
    pub fn new(loaded: Loaded) -> Arc<Self> {
        let cache = loaded.settings.auth_cache;
        let snapshot = build_snapshot(1, loaded.policy, loaded.digest, cache);
        let (changes, _) = watch::channel(1);
        Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            changes,
            cache,
            settings: loaded.settings,
            sources: loaded.sources,
            tls: loaded.tls.map(ArcSwap::from_pointee),
            stats: ReloadStats::default(),
        })
    }

    /// The current snapshot. Hold it for one decision, not across awaits for long.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// An owned handle on the current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Notified with the new generation after every applied reload.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// The certificate in use, when TLS is on.
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.as_ref().map(ArcSwap::load_full)
    }

    /// The rustls config for a connection being accepted now, when TLS is on.
    pub fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.as_ref().map(|t| t.load().config.clone())
    }

    /// Re-reads the sources and applies the policy if it changed and is valid. Blocking: file
    /// I/O, YAML parsing and key loading. Call it from a blocking thread.
    pub fn reload_blocking(&self, env: &dyn Fn(&str) -> Option<String>) -> ReloadOutcome {
        match config::load_with_env(&self.sources.config, env) {
            Err(diags) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.rotate_tls_despite(&diags);
                ReloadOutcome::Rejected(diags)
            }
            Ok(loaded) if loaded.digest == self.current.load().digest => {
                if self.rotate_tls(&loaded) {
                    return ReloadOutcome::TlsRotated;
                }
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                ReloadOutcome::Unchanged
            }
            Ok(loaded) => {
                self.rotate_tls(&loaded);
                let restart_needed = self.settings.restart_needed(&loaded.settings);
                if loaded.sources.config != self.sources.config
                    || loaded.sources.policy_file != self.sources.policy_file
                {
                    // Switching between inline and policy_file (or to another file) changes
                    // what is watched; apply the policy, but the watch set needs a restart.
                    let mut r = restart_needed;
                    r.push("policy_file");
                    return self.apply(loaded, r);
                }
                self.apply(loaded, restart_needed)
            }
        }
    }

    /// Serves the certificate of `loaded` from now on, if it differs from the one in use.
    /// Only for the files the process started with: other `tls` settings need a restart
    /// (reported as such by [`Settings::restart_needed`]).
    fn rotate_tls(&self, loaded: &Loaded) -> bool {
        match (&self.tls, &loaded.tls) {
            (Some(live), Some(new)) if loaded.settings.tls == self.settings.tls => {
                self.swap_tls(live, new.clone())
            }
            _ => false,
        }
    }

    /// After a rejected reload: when none of the errors is about `tls`, the certificate files
    /// are read on their own and a valid rotation is applied anyway.
    fn rotate_tls_despite(&self, diags: &Diagnostics) {
        let (Some(live), Some(files)) = (&self.tls, &self.settings.tls) else {
            return;
        };
        if diags.errors().any(|d| d.path.starts_with("tls")) {
            return;
        }
        let mut d = Diagnostics::new();
        match crate::tls::load(&files.cert, &files.key, &mut d) {
            Some(new) => {
                self.swap_tls(live, new);
            }
            None => tracing::warn!("keeping the TLS certificate in use:\n{d}"),
        }
    }

    fn swap_tls(&self, live: &ArcSwap<ServerTls>, new: ServerTls) -> bool {
        if live.load().digest == new.digest {
            return false;
        }
        tracing::info!(
            fingerprint = %new.fingerprint,
            chain = new.chain_len,
            "TLS certificate reloaded; new connections are served with it"
        );
        live.store(Arc::new(new));
        self.stats.tls_rotated.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn apply(&self, loaded: Loaded, restart_needed: Vec<&'static str>) -> ReloadOutcome {
        for w in loaded.warnings.iter() {
            tracing::warn!(%w, "policy reload");
        }
        let generation = self.current.load().generation + 1;
        let snapshot = build_snapshot(generation, loaded.policy, loaded.digest, self.cache);
        self.current.store(Arc::new(snapshot));
        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
        self.changes.send_replace(generation);
        ReloadOutcome::Applied {
            generation,
            restart_needed,
        }
    }
}

fn build_snapshot(
    generation: u64,
    policy: Policy,
    digest: [u8; 32],
    cache: AuthCacheSettings,
) -> Snapshot {
    let policy = Arc::new(policy);
    Snapshot {
        generation,
        auth: Authenticator::new(policy.clone(), cache),
        policy,
        digest,
        loaded_at: SystemTime::now(),
    }
}

/// Something that asks for a reload: a file event or a signal.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    FileEvent,
    Signal,
}

/// Handle to a running watcher. Dropping it stops watching.
pub struct PolicyWatcher {
    _watcher: notify::RecommendedWatcher,
    triggers: mpsc::Sender<Trigger>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyWatcher {
    /// Asks for a reload now (SIGHUP, tests). Never blocks; a reload already queued covers it.
    pub fn trigger(&self) {
        let _ = self.triggers.try_send(Trigger::Signal);
    }
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching the store's sources. Must be called inside a Tokio runtime.
pub fn watch(store: Arc<PolicyStore>) -> Result<PolicyWatcher, notify::Error> {
    // Capacity 1 is enough: one pending trigger already means "re-read soon".
    let (tx, rx) = mpsc::channel(1);
    let event_tx = tx.clone();
    let names = relevant_names(store.sources());
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if e.kind.is_access() => {}
            Ok(e) if e.paths.iter().any(|p| is_relevant(&names, p)) => {
                let _ = event_tx.try_send(Trigger::FileEvent);
            }
            Ok(_) => {} // another file in the same directory
            Err(e) => tracing::warn!(error = %e, "policy watcher error"),
        })?;
    for dir in watch_dirs(store.sources()) {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        tracing::debug!(dir = %dir.display(), "watching for policy changes");
    }
    let debounce = store.settings().reload.debounce;
    let task = tokio::spawn(run(store, rx, debounce));
    Ok(PolicyWatcher {
        _watcher: watcher,
        triggers: tx,
        task,
    })
}

/// File names whose changes matter: the sources themselves.
fn relevant_names(sources: &Sources) -> Vec<std::ffi::OsString> {
    sources
        .files()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect()
}

/// Whether an event path is a source file, or Kubernetes' ConfigMap machinery (`..data`,
/// `..2026_01_01_…`, `..data_tmp`), through which a mounted source changes without its own
/// name ever appearing in an event.
fn is_relevant(names: &[std::ffi::OsString], path: &Path) -> bool {
    match path.file_name() {
        Some(name) => names.iter().any(|n| n == name) || name.to_string_lossy().starts_with(".."),
        None => false,
    }
}

fn watch_dirs(sources: &Sources) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for file in sources.files() {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Longest a reload waits for its sources to go quiet: a file rewritten in a loop must not
/// postpone a policy change (a revoked token) indefinitely.
const MAX_DEBOUNCE_EXTRA: Duration = Duration::from_secs(2);

async fn run(store: Arc<PolicyStore>, mut rx: mpsc::Receiver<Trigger>, debounce: Duration) {
    // The diagnostics of the last rejected reload: the same broken file re-read (an editor's
    // saves, SIGHUP) is logged once at error level, then at debug.
    let mut last_rejected: Option<String> = None;
    while let Some(first) = rx.recv().await {
        // Debounce: wait until the sources have been quiet for `debounce`, so that an editor's
        // write-rename-chmod or a ConfigMap's several symlink swaps become one reload — but no
        // longer than `debounce + MAX_DEBOUNCE_EXTRA` in all.
        let give_up = tokio::time::Instant::now() + debounce + MAX_DEBOUNCE_EXTRA;
        loop {
            let quiet_until = (tokio::time::Instant::now() + debounce).min(give_up);
            match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                Ok(Some(_)) if tokio::time::Instant::now() < give_up => continue,
                Ok(Some(_)) => break,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let s = store.clone();
        let outcome =
            tokio::task::spawn_blocking(move || s.reload_blocking(&crate::policy::process_env))
                .await;
        match outcome {
            Ok(ReloadOutcome::Applied {
                generation,
                restart_needed,
            }) => {
                last_rejected = None;
                tracing::info!(generation, trigger = ?first, summary = %store.load().policy.summary(), "policy reloaded");
                if !restart_needed.is_empty() {
                    tracing::warn!(
                        sections = ?restart_needed,
                        "settings changed on disk but only the policy is reloaded live; restart to apply them"
                    );
                }
            }
            // Logged where it was swapped.
            Ok(ReloadOutcome::TlsRotated) => {}
            Ok(ReloadOutcome::Unchanged) => {
                tracing::debug!(trigger = ?first, "policy sources unchanged")
            }
            Ok(ReloadOutcome::Rejected(diags)) => {
                let text = diags.to_string();
                if last_rejected.as_deref() == Some(text.as_str()) {
                    tracing::debug!(trigger = ?first, "config still rejected (same errors)");
                    continue;
                }
                // One event, however many lines: a log pipeline keeps the list together.
                tracing::error!(
                    errors = diags.errors().count(),
                    "config reload rejected; keeping policy generation {}:\n{text}",
                    store.generation()
                );
                last_rejected = Some(text);
            }
            Err(e) => tracing::error!(error = %e, "policy reload task failed"),
        }
    }
}
