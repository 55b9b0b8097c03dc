//! The NoLag MessagePack wire protocol (PROTOCOL.md): frame decoding and encoding.
//!
//! Pure functions over bytes, no I/O: the session feeds in binary WebSocket messages and gets
//! [`ClientFrame`]s; it builds replies with [`encode`]. Payloads (`data`) are never decoded,
//! only measured and copied through.

pub mod decode;
pub mod encode;
pub mod envelope;
pub mod msgpack;
pub mod restore;

pub use decode::{ClientFrame, FrameError, decode};
