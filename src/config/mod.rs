//! `proxy.yaml`: the typed settings of a running proxy, their defaults and their validation
//! (DESIGN §5).
//!
//! [`load`] reads the file (and `policy_file`, if used), reports *every* problem with its YAML
//! path, and returns the validated [`Settings`] plus the compiled [`Policy`]. Only the policy
//! is hot-reloaded; [`Settings`] are fixed for the life of the process, and a reload that finds
//! them changed reports which ones need a restart.

mod load;
mod settings;

pub use load::{
    Loaded, Sources, load, load_str, load_with_env, parse_policy_file, parse_yaml, parse_yaml_in,
};
pub use settings::{
    ApiSettings, Broker, Limits, LogFormat, LogSettings, PresenceSettings, ReloadSettings,
    Settings, TlsSettings, UpstreamSettings, WebhookSettings,
};

/// The config file used when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "proxy.yaml";
