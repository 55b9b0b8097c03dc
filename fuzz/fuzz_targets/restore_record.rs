//! The stored subscription set (PROTOCOL §13): `cuttle::wire::restore::decode` on arbitrary
//! bytes (a retained message anyone with broker access could have written), and the
//! round-trip property: whatever decodes re-encodes to bytes that decode to the same set, and
//! re-encoding that is stable.
//!
//! Only the public `restore::decode` / `restore::encode` pair is used, so the target stays
//! valid if the record's layout changes (a version field, new keys).

#![no_main]

use cuttle::wire::restore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A cleared set (`Ok(None)`) has nothing to re-encode; errors are the refusals.
    let Ok(Some(record)) = restore::decode(data) else {
        return;
    };
    let bytes = restore::encode(&record);
    let again = restore::decode(&bytes)
        .unwrap_or_else(|e| panic!("encode output does not decode: {e}: {record:?}"));
    assert_eq!(again.as_ref(), Some(&record), "decode(encode(x)) != x");
    assert_eq!(
        again.map(|r| restore::encode(&r)),
        Some(bytes),
        "encode is not stable"
    );
});
