//! The policy engine: who may read and write what, and which rooms a lobby gathers (DESIGN
//! §3, §4, §9).
//!
//! - [`spec`]: the YAML shape;
//! - [`compile`](compile::compile): validation of a spec into an immutable, indexed [`Policy`],
//!   with every problem reported against its YAML path;
//! - [`model`]: the compiled types, and the resolution of bare lobby slugs in policy order
//!   ([`Project::lobby`], PROTOCOL A12);
//! - [`authorize`]: decisions for (actor, topic, access), at subscribe, publish and delivery
//!   time, and room access alone for presence ([`Policy::room_access`]).

pub mod authorize;
mod compile;
pub mod model;
pub mod slug;
pub mod spec;

use std::path::{Path, PathBuf};

pub use authorize::{Denial, SubscriptionGrant};
pub use compile::compile;
pub use model::{
    Access, ActorType, App, CredentialEntry, ListedActor, Lobby, MAX_LOBBY_ROOMS, Permission,
    Policy, Project, Room, Scope, ScopeGrants, SessionSettings, TopicAcl,
};
pub use slug::{check_actor_id, check_slug};

use crate::diagnostics::{Diagnostics, quoted};
use crate::secret::Secret;

/// HMAC secrets (JWT and session) shorter than this are refused: a short shared secret can be
/// brute-forced offline from any one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Where compile-time inputs outside the YAML come from: files relative to the config file,
/// secrets from environment variables (a function, so that tests can supply secrets without
/// touching the process environment). It records every file it reads, so that hot reload can
/// notice a rotated key file.
pub struct CompileContext<'a> {
    pub base_dir: &'a Path,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    read: std::cell::RefCell<Vec<(PathBuf, [u8; 32])>>,
}

impl<'a> CompileContext<'a> {
    pub fn new(base_dir: &'a Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self {
            base_dir,
            env,
            read: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// Reads a file the policy refers to (at most [`MAX_KEY_FILE_BYTES`]), recording its path
    /// and content hash.
    pub fn read_file(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        use sha2::{Digest, Sha256};
        let bytes = read_bounded(path, MAX_KEY_FILE_BYTES)?;
        self.read
            .borrow_mut()
            .push((path.to_path_buf(), Sha256::digest(&bytes).into()));
        Ok(bytes)
    }

    /// Every file read through [`Self::read_file`], with the SHA-256 of what was read.
    pub fn files_read(&self) -> Vec<(PathBuf, [u8; 32])> {
        self.read.borrow().clone()
    }
    /// Reads the environment variable `var` named at YAML `path`. Unset: a warning (the
    /// credential kind is disabled, failing closed). Too short: an error (naming its length,
    /// never its value).
    pub fn secret(&self, var: &str, path: &str, diags: &mut Diagnostics) -> Option<Secret<String>> {
        if var.is_empty() {
            diags.error(path, "must name an environment variable");
            return None;
        }
        match (self.env)(var) {
            None => {
                diags.warn(
                    path,
                    format!("environment variable {} is not set", quoted(var)),
                );
                None
            }
            Some(v) if v.len() < MIN_SECRET_BYTES => {
                diags.error(
                    path,
                    format!(
                        "the secret in {} is {} bytes; at least {MIN_SECRET_BYTES} are required",
                        quoted(var),
                        v.len()
                    ),
                );
                None
            }
            Some(v) => Some(Secret::new(v)),
        }
    }

    pub fn resolve(&self, file: &Path) -> PathBuf {
        if file.is_absolute() {
            file.to_path_buf()
        } else {
            self.base_dir.join(file)
        }
    }
}

/// Longest file a policy may refer to (JWT public keys, a few KiB of PEM each), in bytes.
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// Reads at most `max` bytes of `path`; a longer file is an error of kind
/// [`std::io::ErrorKind::FileTooLarge`]. The bound holds while reading, whatever size the file
/// system reports: a device or a `/proc` file reports 0 bytes and may never end, and
/// `policy_file: /dev/zero` once read until memory ran out.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// The process environment, for [`CompileContext::env`].
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}
