//! Reading `proxy.yaml` (and `policy_file`): YAML → spec → validated settings + compiled policy.
//!
//! Parsing is layered so that every error names a YAML path:
//! - `serde-saphyr` parses (duplicate keys are errors; alias/size budgets bound hostile input);
//! - `serde_path_to_error` records where a type error happened (`limits.send_queue: invalid
//!   type…`);
//! - `serde_ignored` reports *every* unknown key, not just the first, so typos are all listed.
//!
//! A syntax or type error names the file, line and column (`--> proxy.yaml:15:9`) with the
//! offending line, so a policy file's errors point into the policy file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::settings::{self, Settings, SettingsSpec};
use crate::diagnostics::Diagnostics;
use crate::policy::spec::PolicySpec;
use crate::policy::{CompileContext, Policy, compile, process_env};
use crate::tls::ServerTls;

/// Longest config or policy file read, in bytes. A policy with thousands of actors is a few
/// MiB; anything beyond this is a mistake, and YAML parsers are not where to find out.
pub const MAX_CONFIG_BYTES: u64 = 32 << 20;

/// The files a configuration was read from: what the hot-reload watcher watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub config: PathBuf,
    pub policy_file: Option<PathBuf>,
    /// Files the policy refers to (JWT public keys).
    pub key_files: Vec<PathBuf>,
    /// `tls.cert` and `tls.key`, when TLS is on: watched so that a rotated certificate is
    /// served without a restart.
    pub tls_files: Vec<PathBuf>,
}

impl Sources {
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.config.as_path())
            .chain(self.policy_file.as_deref())
            .chain(self.key_files.iter().map(PathBuf::as_path))
            .chain(self.tls_files.iter().map(PathBuf::as_path))
    }
}

/// A successfully loaded configuration.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub policy: Policy,
    /// Non-fatal findings (unset secret variables, …), to be logged.
    pub warnings: Diagnostics,
    pub sources: Sources,
    /// SHA-256 over the bytes read (config, policy file, key files); equal digests mean
    /// nothing changed on disk. The TLS files have their own digest ([`ServerTls::digest`]):
    /// a rotated certificate is not a new policy.
    pub digest: [u8; 32],
    /// The checked certificate and key, when `tls` is set.
    pub tls: Option<ServerTls>,
}

/// Loads `path` with secrets from the process environment.
pub fn load(path: &Path) -> Result<Loaded, Diagnostics> {
    load_with_env(path, &process_env)
}

/// Loads `path` with secrets from `env`.
pub fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Diagnostics> {
    let mut diags = Diagnostics::new();
    let text = read_file(path, &mut diags).ok_or(diags)?;
    load_str(&text, path, env)
}

/// Loads configuration `text` as if it had been read from `path`, which is not read: relative
/// paths in the text (`policy_file`, key files, `tls`) resolve against `path`'s directory, and
/// [`Sources::config`] names `path`. [`load_with_env`] is this after reading the file; the
/// split exists so that the YAML layers can be driven from memory (the `config_load` fuzz
/// target feeds arbitrary text here, without a temporary file per input).
pub fn load_str(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Diagnostics> {
    let mut diags = Diagnostics::new();
    let mut hasher = Sha256::new();
    hasher.update(text);
    let spec: SettingsSpec =
        parse_yaml_in(text, Some(path), "", &mut diags).ok_or_else(|| diags.clone())?;

    let base_dir = path.parent().unwrap_or(Path::new("."));
    let cx = CompileContext::new(base_dir, env);
    let mut sources = Sources {
        config: path.to_path_buf(),
        policy_file: None,
        key_files: Vec::new(),
        tls_files: Vec::new(),
    };
    let policy_spec = match (&spec.policy, &spec.policy_file) {
        (Some(p), None) => Some(p.clone()),
        (None, Some(file)) => {
            let file = cx.resolve(file);
            sources.policy_file = Some(file.clone());
            read_file(&file, &mut diags).and_then(|text| {
                hasher.update(&text);
                parse_policy_file(&text, &file, &mut diags)
            })
        }
        (Some(_), Some(_)) => {
            diags.error(
                "policy_file",
                "`policy` and `policy_file` are mutually exclusive",
            );
            None
        }
        (None, None) => {
            diags.error(
                "policy",
                "a policy is required (inline `policy:` or `policy_file:`)",
            );
            None
        }
    };
    let settings = settings::validate(&spec, &cx, &mut diags);
    let tls = spec.tls.as_ref().and_then(|t| {
        let (cert, key) = (cx.resolve(&t.cert), cx.resolve(&t.key));
        sources.tls_files = vec![cert.clone(), key.clone()];
        crate::tls::load(&cert, &key, &mut diags)
    });
    let policy = policy_spec.and_then(|p| compile(&p, "policy", &cx, &mut diags));
    // Key files are part of what "changed on disk" means: a rotated public key is a reload.
    for (file, hash) in cx.files_read() {
        hasher.update(hash);
        sources.key_files.push(file);
    }
    match (settings, policy) {
        (Some(settings), Some(policy)) if !diags.has_errors() => Ok(Loaded {
            settings,
            policy,
            warnings: diags,
            sources,
            digest: hasher.finalize().into(),
            tls,
        }),
        _ => Err(diags),
    }
}

fn read_file(path: &Path, diags: &mut Diagnostics) -> Option<String> {
    let display = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_CONFIG_BYTES => {
            diags.error(
                "",
                format!("{display} is larger than {MAX_CONFIG_BYTES} bytes"),
            );
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            diags.error("", format!("cannot read {display}: {e}"));
            return None;
        }
    }
    // The size checked above is only what the file system reports: a device or a `/proc` file
    // reports 0 and may never end, so the read itself is bounded too.
    let text = crate::policy::read_bounded(path, MAX_CONFIG_BYTES).and_then(|bytes| {
        String::from_utf8(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            )
        })
    });
    match text {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            diags.error(
                "",
                format!("{display} is larger than {MAX_CONFIG_BYTES} bytes"),
            );
            None
        }
        Err(e) => {
            diags.error("", format!("cannot read {display}: {e}"));
            None
        }
    }
}

/// Parses the content of policy file `source` (the policy mapping itself, as under `policy:`).
pub fn parse_policy_file(text: &str, source: &Path, diags: &mut Diagnostics) -> Option<PolicySpec> {
    parse_yaml_in(text, Some(source), "policy", diags)
}

/// Parses YAML into `T`, reporting unknown keys and the first type error with their paths
/// under `root`. `None` when the document could not be read as a `T`.
pub fn parse_yaml<T: DeserializeOwned>(
    text: &str,
    root: &str,
    diags: &mut Diagnostics,
) -> Option<T> {
    parse_yaml_in(text, None, root, diags)
}

/// [`parse_yaml`] of text read from file `source`, which a syntax or type error names.
pub fn parse_yaml_in<T: DeserializeOwned>(
    text: &str,
    source: Option<&Path>,
    root: &str,
    diags: &mut Diagnostics,
) -> Option<T> {
    // An empty document is an empty mapping: every section then takes its default.
    let text = if text.trim().is_empty() { "{}" } else { text };
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result = serde_saphyr::with_deserializer_from_str_with_options(
        text,
        serde_saphyr::options::Options::default(),
        |de| {
            let de = serde_path_to_error::Deserializer::new(de, &mut track);
            serde_ignored::deserialize(de, |path| unknown.push(ignored_path(root, &path)))
        },
    );
    for path in unknown {
        diags.error(path, "unknown key");
    }
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            let path = track.path().to_string();
            // A syntax error inside a mapping leaves a `?` (a key not read yet) at the end.
            let path = path.trim_end_matches(".?").trim_end_matches('?');
            let path = match (root, path) {
                (r, "." | "") => r.to_string(),
                ("", p) => p.to_string(),
                (r, p) if p.starts_with('[') => format!("{r}{p}"),
                (r, p) => format!("{r}.{p}"),
            };
            diags.error(path, yaml_error_message(&e, source));
            None
        }
    }
}

/// The message of a YAML syntax or type error: what is wrong, then where, rustc-style:
///
/// ```text
/// invalid u64
///   --> proxy.yaml:15:9
///    |
/// 15 |   pool: four
///    |         ^ invalid u64
/// ```
///
/// (serde-saphyr's own rendering names the source `<input>` and repeats the location in its
/// first line.)
fn yaml_error_message(e: &serde_saphyr::Error, source: Option<&Path>) -> String {
    use serde_saphyr::MessageFormatter;
    let name = source.map(|p| p.display().to_string());
    let rendered = e.render_with_options(serde_saphyr::render_options! {
        source_name: name.as_deref(),
    });
    // The formatter's text is not sanitized the way a rendering is (a value quoted in it may
    // hold a newline): control characters are escaped so that a message stays one line.
    let what: String = serde_saphyr::DefaultMessageFormatter
        .format_message(e.without_snippet())
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    let snippet = rendered.split_once('\n').map(|(_, rest)| rest);
    match (e.location(), snippet, name) {
        (Some(_), Some(snippet), Some(_)) if snippet.contains("-->") => {
            format!("{what}\n{snippet}")
        }
        (Some(at), _, Some(name)) => {
            format!("{what} at {name}:{}:{}", at.line(), at.column())
        }
        (Some(at), _, None) => format!("{what} at line {}, column {}", at.line(), at.column()),
        (None, _, Some(name)) => format!("{what} in {name}"),
        (None, _, None) => what,
    }
}

/// Formats a `serde_ignored` path the way every other diagnostic is written:
/// `policy.projects[0].apps[1].colour`.
fn ignored_path(root: &str, path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    fn walk(path: &P<'_>, out: &mut String) {
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                out.push_str(&format!("[{index}]"));
            }
            P::Map { parent, key } => {
                walk(parent, out);
                *out = crate::diagnostics::key_path(out, key);
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out)
            }
        }
    }
    let mut out = root.to_string();
    walk(path, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> String {
        match load_str(text, Path::new("/nonexistent/proxy.yaml"), &|_| None) {
            Ok(_) => panic!("should not load:\n{text}"),
            Err(d) => d.to_string(),
        }
    }

    #[test]
    fn load_str_is_load_without_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        let text = "policy:\n  projects:\n    - id: demo\n";
        std::fs::write(&path, text).unwrap();
        let from_file = load_with_env(&path, &|_| None).unwrap();
        let from_str = load_str(text, &path, &|_| None).unwrap();
        assert_eq!(from_file.digest, from_str.digest);
        assert_eq!(from_file.sources, from_str.sources);
    }

    /// Type and syntax errors used to point at `<input>`: they name the file they are in, with
    /// line and column, the config file's or the policy file's.
    #[test]
    fn yaml_errors_name_their_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.yaml");
        let text = "upstream:\n  broker: embedded\n  pool: four\npolicy:\n  projects: []\n";
        std::fs::write(&config, text).unwrap();
        let e = load_with_env(&config, &|_| None).unwrap_err();
        let errors: Vec<_> = e.errors().collect();
        assert_eq!(errors.len(), 1, "{e}");
        assert_eq!(errors[0].path, "upstream.pool");
        let mut lines = errors[0].message.lines();
        assert_eq!(lines.next(), Some("invalid u64"), "{e}");
        let at = lines.next().unwrap();
        assert_eq!(at.trim(), format!("--> {}:3:9", config.display()), "{e}");
        assert!(e.to_string().contains("3 |   pool: four"), "{e}");
        assert!(!e.to_string().contains("<input>"), "{e}");

        // A syntax error in a policy file names the policy file, and no `?` path level.
        std::fs::write(&config, "policy_file: policy.yaml\n").unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, "projects:\n  - id: demo\n    jwt: { issuer: x\n").unwrap();
        let e = load_with_env(&config, &|_| None).unwrap_err();
        let errors: Vec<_> = e.errors().collect();
        assert_eq!(errors.len(), 1, "{e}");
        assert_eq!(errors[0].path, "policy.projects[0].jwt");
        let mut lines = errors[0].message.lines();
        assert_eq!(lines.next(), Some("unclosed bracket '{'"), "{e}");
        assert_eq!(
            lines.next().unwrap().trim(),
            format!("--> {}:3:10", policy.display()),
            "{e}"
        );

        // Text not read from a file has no name to give.
        let mut diags = Diagnostics::new();
        assert!(parse_yaml::<SettingsSpec>("upstream: { pool: four }", "", &mut diags).is_none());
        let message = &diags.errors().next().unwrap().message;
        assert_eq!(message, "invalid u64 at line 1, column 19");
    }

    /// Reads used to be bounded only by the size `metadata` reports, which is 0 for a device:
    /// `policy_file: /dev/zero` (or a key file there) read until memory ran out, in `cuttle
    /// check`, at start-up, or in a hot reload of a running proxy.
    #[cfg(target_os = "linux")]
    #[test]
    fn endless_files_are_refused_not_read_forever() {
        let e = errors("policy_file: /dev/zero\n");
        assert!(e.contains("/dev/zero is larger than"), "{e}");
        let e = errors(
            "policy:\n  projects:\n    - id: p\n      jwt: { issuer: https://i, audience: a, algorithms: [RS256], public_key_file: /dev/zero }\n",
        );
        assert!(e.contains("cannot read /dev/zero: larger than"), "{e}");
    }
}
