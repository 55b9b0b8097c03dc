//! [`Secret`]: a value that must never reach a log line or `Debug` output.
//!
//! Passwords, HMAC secrets and tokens are held in a `Secret` from the moment they are read (an
//! environment variable, an `auth` frame, the command line), so that a `#[derive(Debug)]` on
//! anything holding one, a `tracing::debug!(?settings)` or an error's `{:?}` prints
//! `<redacted>` instead. The value is reached only through [`Secret::expose`], which makes each
//! use site visible in review.
//!
//! Not `secrecy`: its `SecretBox` has no `PartialEq` (settings holding a secret are compared on
//! reload to report what needs a restart) and needs an owned, zeroizable value (an `auth`
//! frame's token is borrowed from the frame); and zeroizing on drop buys little when rumqttc's
//! options and jsonwebtoken's keys hold their own copies.

use std::fmt;

/// What [`Secret`]'s `Debug` and `Display` print.
pub const REDACTED: &str = "<redacted>";

/// A value printed as [`REDACTED`]. Compare and clone it like `T`; read it with
/// [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself. Never pass it to a formatting macro.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The value, consuming the wrapper.
    pub fn into_exposed(self) -> T {
        self.0
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_redacted_whatever_the_format() {
        let s = Secret::new("hunter2-hunter2".to_string());
        #[derive(Debug)]
        #[allow(dead_code)] // read only by Debug
        struct Holder {
            password: Option<Secret<String>>,
        }
        let h = Holder {
            password: Some(s.clone()),
        };
        for out in [
            format!("{s}"),
            format!("{s:?}"),
            format!("{s:#?}"),
            format!("{h:?}"),
            format!("{h:#?}"),
        ] {
            assert!(!out.contains("hunter2"), "{out}");
            assert!(out.contains(REDACTED), "{out}");
        }
        assert_eq!(s.expose(), "hunter2-hunter2");
        assert_eq!(s, Secret::from("hunter2-hunter2".to_string()));
    }
}
