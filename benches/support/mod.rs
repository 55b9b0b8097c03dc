//! Inputs shared by the criterion benches (a module directory, so cargo does not take it
//! for a bench target of its own). Each bench includes it with `#[path]`, after
//! `tests/common`, whose `encode` and `map` it uses.

use rmpv::Value;

use crate::common::server::{encode, map};

/// A client `data` value (`{text: "xxx…"}`) whose MessagePack encoding is exactly `len` bytes.
pub fn data_of(len: usize) -> Vec<u8> {
    (0..len)
        .rev()
        .map(|pad| encode(&map(&[("text", Value::from("x".repeat(pad)))])))
        .find(|d| d.len() == len)
        .unwrap_or_else(|| panic!("no {{text}} map encodes to {len} bytes"))
}

/// `64 B`, `1 KiB`, … for bench ids.
pub fn size_label(len: usize) -> String {
    if len >= 1024 {
        format!("{} KiB", len / 1024)
    } else {
        format!("{len} B")
    }
}
