//! Identifier rules for the names that become MQTT topic levels (apps, scopes, rooms, topics)
//! and for project ids.
//!
//! A slug is 1–64 bytes of `a-z`, `0-9`, `-`, `_`, `.` and `:`, and is never exactly `_` (the
//! unscoped namespace segment). An allow-list rather than a deny-list: whatever is not
//! obviously safe as a topic level, a share-group part and a log field is refused.

/// Longest slug accepted, in bytes.
pub const MAX_SLUG_BYTES: usize = 64;

/// Why a string is not a slug; the message names the first problem found.
pub fn check_slug(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s == "_" {
        return Err("'_' is reserved for the unscoped namespace".into());
    }
    if s.len() > MAX_SLUG_BYTES {
        return Err(format!("longer than {MAX_SLUG_BYTES} bytes"));
    }
    for c in s.chars() {
        let problem = match c {
            'a'..='z' | '0'..='9' | '-' | '_' | '.' | ':' => continue,
            '/' => "'/' separates topic levels",
            '+' | '#' => "'+' and '#' are MQTT wildcards",
            '$' => "'$' is reserved by MQTT brokers",
            '\0' => "NUL is not allowed",
            'A'..='Z' => "upper case is not allowed (slugs are lower case)",
            _ => "only a-z, 0-9, '-', '_', '.' and ':' are allowed",
        };
        return Err(problem.into());
    }
    Ok(())
}

/// Actor ids are looser than slugs (a user id is a JWT `sub`, such as `auth0|5f3c…`) but are
/// still bounded and printable.
pub fn check_actor_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_ACTOR_ID_BYTES {
        return Err(format!("longer than {MAX_ACTOR_ID_BYTES} bytes"));
    }
    if s.chars().any(crate::topic::is_mqtt_unsafe) {
        return Err(
            "control characters (NUL, newline, …) and Unicode noncharacters are not allowed".into(),
        );
    }
    Ok(())
}

/// Longest actor id (and JWT `sub`) accepted, in bytes.
pub const MAX_ACTOR_ID_BYTES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for ok in ["chat", "a", "my_app", "v1.2", "eu:west-1", "_x", "0"] {
            assert!(check_slug(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("_", "reserved"),
            ("a/b", "'/'"),
            ("a+", "wildcard"),
            ("#", "wildcard"),
            ("$sys", "'$'"),
            ("a\0", "NUL"),
            ("Chat", "upper case"),
            ("a b", "only a-z"),
            ("é", "only a-z"),
        ] {
            let err = check_slug(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(check_slug(&"a".repeat(65)).is_err());
    }

    #[test]
    fn actor_ids() {
        assert!(check_actor_id("auth0|5f3c").is_ok());
        assert!(check_actor_id("").is_err());
        assert!(check_actor_id("a\nb").is_err());
        assert!(check_actor_id("a\u{fffe}").is_err());
        assert!(check_actor_id(&"a".repeat(257)).is_err());
    }
}
