//! The `cuttle` command line (DESIGN §6).
//!
//! - `cuttle [--config FILE]` runs the proxy;
//! - `cuttle check` validates a config and lists every problem;
//! - `cuttle hash-token TOKEN` prints the SHA-256 the policy stores for a device token or key;
//! - `cuttle session-token --project P --ttl 15m [--scope S] [--room app/room]…` mints a
//!   session token from the project's session secret;
//! - `cuttle dev-jwt --project P --sub alice --ttl 1h [--scope S] [--role R]…` mints a user JWT
//!   with an HMAC project's own secret, for development only.
//!
//! Exit codes: 0 success; 1 a configuration that is invalid or cannot be read, or a refused
//! mint; 2 usage errors and failures to start (bind, runtime, watcher).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::auth::dev_jwt::{self, DevJwtRequest};
use crate::auth::session_token::{self, MintRequest};
use crate::config::{self, DEFAULT_CONFIG_PATH, Loaded};
use crate::diagnostics::Diagnostics;
use crate::reload;
use crate::secret::Secret;

#[derive(Debug, Parser)]
#[command(name = "cuttle", version, about = "A stateless realtime edge proxy", long_about = None)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, env = "CUTTLE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Run,
    /// Validate the configuration and list every problem found.
    Check,
    /// Print the SHA-256 (hex) that the policy stores for a device token or server API key.
    HashToken {
        /// The token; omit it (or pass `-`) to read it from stdin and keep it out of shell
        /// history.
        #[arg(value_parser = secret_arg)]
        token: Option<Secret<String>>,
    },
    /// Mint a session token from a project's session secret.
    SessionToken {
        /// The project's id, e.g. demo.
        #[arg(long)]
        project: String,
        /// Lifetime, e.g. 90s, 15m, 1h (at most the project's max_ttl_s).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Access scope of the session.
        #[arg(long)]
        scope: Option<String>,
        /// Restrict the session to these rooms (app/room); repeatable.
        #[arg(long = "room")]
        rooms: Vec<String>,
    },
    /// FOR DEVELOPMENT ONLY: mint a user JWT signed with an HMAC project's own secret.
    #[command(
        name = "dev-jwt",
        long_about = "FOR DEVELOPMENT ONLY: mint a user JWT signed with an HMAC project's own secret.\n\n\
            In production, user JWTs come from your identity provider (the project's jwt.issuer). \
            This signs one with the secret in the project's jwt.secret_env variable (the proxy \
            must run with the same value), with iss and aud from its jwt settings, sub, iat and \
            exp, so that a project can be tried without an identity provider. Projects that \
            verify RSA, EC or EdDSA signatures are refused."
    )]
    DevJwt {
        /// The project's id, e.g. demo.
        #[arg(long)]
        project: String,
        /// The user's id (the `sub` claim), e.g. alice.
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 90s, 15m, 1h (the `exp` claim).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The scope claim: the access scope of a user the policy does not list.
        #[arg(long)]
        scope: Option<String>,
        /// A role name for the roles claim; repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    main_with_args(std::env::args_os())
}

/// The command line with explicit arguments (the first is the program name). The load tool
/// runs the proxy through this so that what it measures is exactly the `cuttle` binary.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config),
        Command::Check => check(&cli.config),
        Command::HashToken { token } => hash_token(token),
        Command::SessionToken {
            project,
            ttl,
            scope,
            rooms,
        } => mint(
            &cli.config,
            MintRequest {
                project,
                ttl_s: ttl.as_secs(),
                scope,
                rooms,
            },
        ),
        Command::DevJwt {
            project,
            sub,
            ttl,
            scope,
            roles,
        } => dev_jwt(
            &cli.config,
            DevJwtRequest {
                project,
                sub,
                ttl_s: ttl.as_secs(),
                scope,
                roles,
            },
        ),
    }
}

fn print_diagnostics(path: &Path, diags: &Diagnostics) {
    let mut err = std::io::stderr().lock();
    for d in diags.iter() {
        let _ = writeln!(err, "{}: {d}", path.display());
    }
}

fn load_or_report(path: &Path) -> Result<Loaded, ExitCode> {
    if matches!(path.try_exists(), Ok(false)) {
        // A newcomer's likely first error: `cuttle` run outside the directory holding
        // proxy.yaml. Say where the file was looked for and how to name another.
        let hint = if path == Path::new(DEFAULT_CONFIG_PATH) {
            " (the default, in the current directory; the repository root holds the demo one)"
        } else {
            ""
        };
        let _ = writeln!(
            std::io::stderr(),
            "error: no configuration file at {}{hint}: pass --config FILE or set CUTTLE_CONFIG",
            path.display()
        );
        return Err(ExitCode::from(1));
    }
    config::load(path).map_err(|diags| {
        print_diagnostics(path, &diags);
        let _ = writeln!(
            std::io::stderr(),
            "{}: {} error(s)",
            path.display(),
            diags.errors().count()
        );
        ExitCode::from(1)
    })
}

fn check(path: &Path) -> ExitCode {
    match load_or_report(path) {
        Err(code) => code,
        Ok(loaded) => {
            print_diagnostics(path, &loaded.warnings);
            println!("{}: ok ({})", path.display(), loaded.policy.summary());
            ExitCode::SUCCESS
        }
    }
}

/// A command-line value that is a credential: `Debug` of the parsed [`Cli`] redacts it.
fn secret_arg(value: &str) -> Result<Secret<String>, std::convert::Infallible> {
    Ok(Secret::new(value.to_string()))
}

fn hash_token(token: Option<Secret<String>>) -> ExitCode {
    let token = match token.as_ref().map(|t| t.expose().as_str()) {
        Some("-") | None => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
                eprintln!("cannot read the token from stdin: {e}");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        Some(t) => t.to_string(),
    };
    if token.is_empty() {
        eprintln!("the token is empty");
        return ExitCode::from(2);
    }
    println!("{}", hex::encode(crate::auth::sha256(&token)));
    ExitCode::SUCCESS
}

fn mint(path: &Path, req: MintRequest) -> ExitCode {
    let loaded = match load_or_report(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    match session_token::mint(&loaded.policy, &req, session_token::now_unix()) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot mint a session token: {e}");
            ExitCode::from(1)
        }
    }
}

fn dev_jwt(path: &Path, req: DevJwtRequest) -> ExitCode {
    let loaded = match load_or_report(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let now = session_token::now_unix();
    let minted = match dev_jwt::mint(&loaded.policy, &req, now, &crate::policy::process_env) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot mint a development JWT: {e}");
            return ExitCode::from(1);
        }
    };
    // The proxy's own verification, so that a token it would refuse (a listed user's scope
    // contradicted, a `sub` naming a device) is never handed out.
    let auth = crate::auth::Authenticator::new(
        Arc::new(loaded.policy),
        crate::auth::AuthCacheSettings::default(),
    );
    if let Err(e) = auth.verify_uncached(&minted.token, now) {
        eprintln!("cannot mint a development JWT: the proxy would refuse it: {e}");
        return ExitCode::from(1);
    }
    eprintln!(
        "FOR DEVELOPMENT ONLY: a user JWT for '{}' in project '{}', {:?} with the secret in {}{}, expires in {} ({}). In production, user JWTs come from your identity provider.",
        req.sub.escape_debug(),
        req.project.escape_debug(),
        minted.algorithm,
        minted.secret_env.escape_debug(),
        minted
            .kid
            .as_deref()
            .map(|k| format!(" (kid '{}')", k.escape_debug()))
            .unwrap_or_default(),
        humantime::format_duration(std::time::Duration::from_secs(req.ttl_s)),
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(minted.exp)
        ),
    );
    println!("{}", minted.token);
    ExitCode::SUCCESS
}

fn run(path: &Path) -> ExitCode {
    let loaded = match load_or_report(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    crate::logging::init(&loaded.settings.log);
    for w in loaded.warnings.iter() {
        tracing::warn!("{}: {w}", path.display());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(serve(loaded))
}

async fn serve(loaded: Loaded) -> ExitCode {
    let settings = loaded.settings.clone();
    let (listener, admin) = match crate::server::bind(&settings).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(2);
        }
    };
    let proxy = match crate::server::Proxy::start(loaded) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(2);
        }
    };
    let watcher = match reload::watch(Arc::clone(&proxy.store)) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the policy for changes");
            return ExitCode::from(2);
        }
    };
    started_line(&proxy, &listener, &admin);
    let serving = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve(listener, admin).await })
    };
    wait_for_shutdown(&watcher).await;

    // Drain: stop accepting, close every session (they send a close frame), wait for them to
    // finish within the grace period.
    tracing::info!(open = proxy.open_connections(), "shutting down");
    proxy.begin_shutdown();
    let deadline = tokio::time::Instant::now() + settings.shutdown_grace;
    while proxy.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    serving.abort();
    // The sessions' last events (disconnects, leaves) go to the backends within what is left
    // of the grace period (2 s at least): an unreachable receiver cannot hold the exit.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    proxy
        .webhooks
        .drain(left.max(std::time::Duration::from_secs(2)))
        .await;
    // Subscription sets changed in the last moments go to the broker before the pool stops;
    // a clean DISCONNECT after them (the broker then logs no reset and drops the will).
    proxy.restore.flush();
    proxy
        .pool
        .disconnect(std::time::Duration::from_secs(2))
        .await;
    tracing::info!(still_open = proxy.open_connections(), "stopped");
    ExitCode::SUCCESS
}

/// The one start-up record: version, listeners (as bound), broker, pool, policy generation,
/// TLS certificate and presence replica — what an operator checks first in a new pod's log.
fn started_line(
    proxy: &crate::server::Proxy,
    listener: &tokio::net::TcpListener,
    admin: &tokio::net::TcpListener,
) {
    let settings = &proxy.settings;
    let bound = |l: &tokio::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let scheme = if settings.tls.is_some() { "wss" } else { "ws" };
    let broker = match (&settings.upstream.broker, proxy.embedded_broker) {
        (_, Some(addr)) => format!("embedded (mqtt://{addr})"),
        (crate::config::Broker::Remote(endpoints), None) => endpoints
            .iter()
            .map(|e| {
                format!(
                    "{}://{}:{}",
                    if e.tls { "mqtts" } else { "mqtt" },
                    e.host,
                    e.port
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        (crate::config::Broker::Embedded, None) => "embedded".to_string(),
    };
    let tls = proxy
        .store
        .tls()
        .map_or_else(|| "off".to_string(), |t| t.fingerprint.to_string());
    let snapshot = proxy.store.load();
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        listen = %format!("{scheme}://{}/ws", bound(listener, settings.listen)),
        admin = %format!("http://{}", bound(admin, settings.admin)),
        broker = %broker,
        pool = settings.upstream.pool,
        policy_generation = snapshot.generation,
        policy = %snapshot.policy.summary(),
        config = %proxy.store.sources().config.display(),
        tls = %tls,
        replica = %proxy.presence.replica_id(),
        "cuttle started"
    );
}

/// Waits for Ctrl-C or SIGTERM; SIGHUP triggers a policy reload.
async fn wait_for_shutdown(watcher: &reload::PolicyWatcher) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the policy");
                    watcher.trigger();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = watcher;
        let _ = tokio::signal::ctrl_c().await;
    }
}
