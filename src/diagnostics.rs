//! Configuration diagnostics: every problem found while loading `proxy.yaml`, each naming the
//! YAML path it is about.
//!
//! Loading never stops at the first semantic problem: `cuttle check` must list all of them, so
//! validators push into a [`Diagnostics`] and the caller decides at the end. Only a broken
//! document (YAML syntax, a value of the wrong shape) stops parsing early, because nothing
//! after it can be trusted.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    /// Valid but probably not what the operator wants (a secret variable that is unset, so a
    /// credential kind is disabled). Never blocks loading.
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// YAML path, e.g. `policy.projects[0].apps[1].rooms[0].actors[2]`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.path.is_empty() {
            write!(f, "{label}: {}", self.message)
        } else {
            write!(f, "{label}: {}: {}", self.path, self.message)
        }
    }
}

/// An ordered list of diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(Vec<Diagnostic>);

impl Diagnostics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, path.into(), message.into());
    }

    pub fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, path.into(), message.into());
    }

    fn push(&mut self, severity: Severity, path: String, message: String) {
        self.0.push(Diagnostic {
            severity,
            path,
            message,
        });
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.severity == Severity::Warning)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Quotes a user-supplied value for a message, escaping control characters so that a NUL or
/// a newline in a config value cannot garble the output.
pub fn quoted(value: &str) -> String {
    format!("'{}'", value.escape_debug())
}

/// Appends a mapping key to a YAML path: `parent.key` for plain keys, `parent["k.e/y"]`
/// (escaped) for anything else, so that a key containing `.`, a newline or other control
/// characters can neither make a path ambiguous nor forge a line of `cuttle check` output.
pub fn key_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[\"{}\"]", key.escape_debug()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths() {
        assert_eq!(key_path("", "listen"), "listen");
        assert_eq!(key_path("a.topics", "messages"), "a.topics.messages");
        assert_eq!(key_path("a.topics", "v1.2"), "a.topics[\"v1.2\"]");
        assert_eq!(
            key_path("a", "x\nerror: forged"),
            "a[\"x\\nerror: forged\"]"
        );
        assert_eq!(quoted("a\nb"), "'a\\nb'");
    }
}
