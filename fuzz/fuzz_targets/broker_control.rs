//! Two decoders of bytes from the broker that the `/v1` API added: a control request on the
//! reserved topic `[prefix/]_/control/v1/disconnect` (anyone with broker access could publish
//! one) into `server::control::Disconnect::decode`, and presence data (a client's MessagePack,
//! possibly from another replica) into `wire::msgpack::read_json`, which the presence and
//! lobby endpoints answer with.
//!
//! Properties: neither panics; a decoded request re-encodes to one that decodes equal; JSON
//! read from MessagePack survives `write_json` then `read_json` unchanged.

#![no_main]

use cuttle::server::control::Disconnect;
use cuttle::wire::msgpack::{read_json, write_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(d) = Disconnect::decode(data) {
        assert_eq!(Disconnect::decode(&d.encode()).as_ref(), Some(&d), "decode(encode(x)) != x");
    }
    if let Ok(v) = read_json(data) {
        let mut bytes = Vec::new();
        write_json(&mut bytes, &v);
        assert_eq!(read_json(&bytes).as_ref(), Ok(&v), "read_json(write_json(v)) != v");
    }
});
