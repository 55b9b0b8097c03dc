//! The `cuttle` command line as a newcomer meets it: `--version`, `dev-jwt`, and what each
//! subcommand says when something is missing or wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use cuttle::auth::{AuthCacheSettings, AuthError, Authenticator};

const DEMO_JWT_SECRET: &str = "cli-test-demo-jwt-secret-0123456789abcdef";

fn demo_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml")
}

/// `cuttle` with `args`, without any of the variables the demo reads from the environment.
fn cuttle(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cuttle"));
    for var in [
        "CUTTLE_CONFIG",
        "DEMO_JWT_SECRET",
        "DEMO_SESSION_SECRET",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The demo policy as the proxy would load it with `DEMO_JWT_SECRET` set.
fn demo_authenticator() -> Authenticator {
    let env = |var: &str| (var == "DEMO_JWT_SECRET").then(|| DEMO_JWT_SECRET.to_string());
    let loaded = cuttle::config::load_with_env(&demo_config(), &env).unwrap();
    Authenticator::new(Arc::new(loaded.policy), AuthCacheSettings::default())
}

#[test]
fn version() {
    let out = cuttle(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        format!("cuttle {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(stdout(&out), "cuttle 0.1.0\n");
}

#[test]
fn dev_jwt_mints_what_the_demo_proxy_accepts() {
    let config = demo_config();
    let config = config.to_str().unwrap();
    let out = cuttle(
        &[
            "dev-jwt",
            "--config",
            config,
            "--project",
            "demo",
            "--sub",
            "alice",
            "--ttl",
            "1h",
        ],
        &[("DEMO_JWT_SECRET", DEMO_JWT_SECRET)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("FOR DEVELOPMENT ONLY: a user JWT for 'alice' in project 'demo', HS256 with the secret in DEMO_JWT_SECRET, expires in 1h ("),
        "{}",
        stderr(&out)
    );
    let token = stdout(&out);
    let token = token.trim_end();
    assert_eq!(token.lines().count(), 1, "only the token on stdout");
    let now = cuttle::auth::session_token::now_unix();
    let actor = demo_authenticator().verify_uncached(token, now).unwrap();
    assert_eq!(&*actor.id, "alice");
    assert_eq!(actor.scope(), Some("acme"));
    let expires = actor.expires_at.unwrap();
    assert!(
        (now + 3600..=now + 3600 + 60).contains(&expires),
        "{expires}"
    );
    // After its expiry (and the leeway), the same token is refused.
    assert_eq!(
        demo_authenticator()
            .verify_uncached(token, expires)
            .unwrap_err(),
        AuthError::Expired
    );

    // `--help` says what it is for, in the list of commands and its own help.
    let help = stdout(&cuttle(&["--help"], &[]));
    let line = help.lines().find(|l| l.contains("dev-jwt")).unwrap();
    assert!(line.contains("FOR DEVELOPMENT ONLY"), "{help}");
    let help = stdout(&cuttle(&["dev-jwt", "--help"], &[]));
    assert!(help.starts_with("FOR DEVELOPMENT ONLY"), "{help}");
}

#[test]
fn dev_jwt_names_the_variable_to_set_and_refuses_public_key_projects() {
    let config = demo_config();
    let config = config.to_str().unwrap();
    let args = |project: &'static str| {
        [
            "dev-jwt",
            "--config",
            config,
            "--project",
            project,
            "--sub",
            "alice",
            "--ttl",
            "1h",
        ]
    };
    let out = cuttle(&args("demo"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "cannot mint a development JWT: project 'demo' has no JWT secret: set DEMO_JWT_SECRET (project demo's jwt.secret_env) to the secret the proxy runs with (at least 32 bytes, e.g. from `openssl rand -hex 32`)\n"
    );
    assert!(stdout(&out).is_empty());

    // A `sub` naming a device would be refused by the proxy: no token is printed.
    let mut device = args("demo");
    device[6] = "sensor-1";
    let out = cuttle(&device, &[("DEMO_JWT_SECRET", DEMO_JWT_SECRET)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the proxy would refuse it: subject names a listed device actor"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa_public.pem"),
        dir.path().join("rsa_public.pem"),
    )
    .unwrap();
    let rsa = dir.path().join("proxy.yaml");
    std::fs::write(
        &rsa,
        "policy:\n  projects:\n    - id: corp\n      jwt: { issuer: https://corp.example.com, audience: c, algorithms: [RS256], public_key_file: rsa_public.pem }\n",
    )
    .unwrap();
    let mut corp = args("corp");
    corp[2] = rsa.to_str().unwrap();
    let out = cuttle(&corp, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("project 'corp' verifies user JWTs with RS256, a public-key algorithm: only the holder of the private key (your identity provider) can sign them"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn session_token_names_the_variable_to_set() {
    let config = demo_config();
    let out = cuttle(
        &[
            "session-token",
            "--config",
            config.to_str().unwrap(),
            "--project",
            "demo",
            "--ttl",
            "15m",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "cannot mint a session token: project 'demo' has no session secret: set DEMO_SESSION_SECRET (project demo's session.secret_env) to the secret the proxy runs with (at least 32 bytes, e.g. from `openssl rand -hex 32`)\n"
    );
}

#[test]
fn a_missing_config_file_says_how_to_name_one() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["check"][..], &["run"], &[]] {
        let out = Command::new(env!("CARGO_BIN_EXE_cuttle"))
            .env_remove("CUTTLE_CONFIG")
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&out),
            "error: no configuration file at proxy.yaml (the default, in the current directory; the repository root holds the demo one): pass --config FILE or set CUTTLE_CONFIG\n",
            "{args:?}"
        );
    }
    let out = cuttle(&["check", "--config", "/nonexistent/cuttle.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: no configuration file at /nonexistent/cuttle.yaml: pass --config FILE or set CUTTLE_CONFIG\n"
    );
}

/// The demo config with `edits` applied, written to a temporary directory.
fn edited_demo(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(demo_config()).unwrap();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "proxy.yaml no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    let p = dir.join("proxy.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_names_the_file_line_and_column_of_a_type_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_demo(dir.path(), &[("pool: 4", "pool: four")]);
    let line = std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .position(|l| l.contains("pool: four"))
        .unwrap()
        + 1;
    let out = cuttle(&["check", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let mut lines = err.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("{}: error: upstream.pool: invalid u64", p.display())
    );
    assert_eq!(
        lines.next().unwrap().trim(),
        format!("--> {}:{line}:9", p.display())
    );
    assert!(!err.contains("<input>"), "{err}");
    assert!(
        err.ends_with(&format!("{}: 1 error(s)\n", p.display())),
        "{err}"
    );
}

#[test]
fn check_lists_two_mistakes_as_two_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_demo(
        dir.path(),
        &[
            ("actors: [alice, billing]", "actors: [alice, bob]"),
            ("device: read-write", "device: readwrite"),
        ],
    );
    let out = cuttle(&["check", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(": error: ")).collect();
    let d = p.display();
    assert_eq!(
        errors,
        [
            format!(
                "{d}: error: policy.projects[0].apps[0].topics.messages.device: unknown permission 'readwrite' (expected read, write, read-write or none)"
            ),
            format!(
                "{d}: error: policy.projects[0].apps[0].rooms[1].actors[1]: unknown actor 'bob'"
            ),
        ]
    );
    assert!(err.ends_with(&format!("{d}: 2 error(s)\n")), "{err}");
}
