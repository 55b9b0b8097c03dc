//! The persisted subscription set of an actor (PROTOCOL §13), as stored in the broker, and its
//! entries as returned in `restoredSubscriptions` (`{name, loadBalance, loadBalanceGroup,
//! filters}` maps, the SDK's type, A11).
//!
//! The record is versioned and names its owner: `{v: 2, scope, actor, subs: [entry…]}`. A
//! reader restores it only when the version is one it knows and the owner is the reader's
//! own (project, scope, actor); anything else — the bare array older releases wrote, a future
//! version, a record for someone else — is ignored, never half-trusted.

use bytes::Bytes;

use super::msgpack::{MsgpackError, Reader};
use crate::topic::filters::FilterItem;

/// At most this many entries are read back (a session's own limit bounds what is written).
pub const MAX_ENTRIES: usize = 10_000;

/// One persisted subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub load_balance: bool,
    pub group: Option<String>,
    pub filters: Vec<FilterItem>,
}

impl Entry {
    /// This entry as one MessagePack map.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let _ = rmp::encode::write_map_len(out, 4);
        let _ = rmp::encode::write_str(out, "name");
        let _ = rmp::encode::write_str(out, &self.name);
        let _ = rmp::encode::write_str(out, "loadBalance");
        let _ = rmp::encode::write_bool(out, self.load_balance);
        let _ = rmp::encode::write_str(out, "loadBalanceGroup");
        match &self.group {
            Some(g) => {
                let _ = rmp::encode::write_str(out, g);
            }
            None => {
                let _ = rmp::encode::write_nil(out);
            }
        }
        let _ = rmp::encode::write_str(out, "filters");
        super::encode::write_filter_items(out, &self.filters);
    }

    pub fn encode(&self) -> Bytes {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out.into()
    }
}

/// The version this build writes.
pub const VERSION: u64 = 2;

/// A stored set: whose it is and what it holds. The owner is part of the record, so a record
/// is never restored to anyone else, whatever topic it was found on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The actor's access scope (`None`: unscoped).
    pub scope: Option<String>,
    pub actor: String,
    pub entries: Vec<Entry>,
    /// The room the actor was last present in, `app/room` (presence after a reconnect,
    /// which the SDK re-sends without `roomId`).
    pub room: Option<String>,
}

/// Why a stored record is not restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("malformed record: {0}")]
    Malformed(#[from] MsgpackError),
    /// The bare array an older cuttle wrote (keyed by project and actor only).
    #[error("a record of the unversioned format of older releases")]
    Legacy,
    #[error("a record of unknown version {0}")]
    UnknownVersion(u64),
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// Encodes a record (the retained payload): `{v: 2, scope, actor, subs: [entry…], room?}`.
/// (`room` is optional: readers of the same version that predate it skip unknown keys.)
pub fn encode(record: &Record) -> Bytes {
    let mut out = Vec::new();
    let _ = rmp::encode::write_map_len(&mut out, 4 + u32::from(record.room.is_some()));
    let _ = rmp::encode::write_str(&mut out, "v");
    let _ = rmp::encode::write_uint(&mut out, VERSION);
    let _ = rmp::encode::write_str(&mut out, "scope");
    match &record.scope {
        Some(s) => {
            let _ = rmp::encode::write_str(&mut out, s);
        }
        None => {
            let _ = rmp::encode::write_nil(&mut out);
        }
    }
    let _ = rmp::encode::write_str(&mut out, "actor");
    let _ = rmp::encode::write_str(&mut out, &record.actor);
    let _ = rmp::encode::write_str(&mut out, "subs");
    let _ = rmp::encode::write_array_len(&mut out, record.entries.len() as u32);
    for e in &record.entries {
        e.encode_into(&mut out);
    }
    if let Some(room) = &record.room {
        let _ = rmp::encode::write_str(&mut out, "room");
        let _ = rmp::encode::write_str(&mut out, room);
    }
    out.into()
}

/// Bytes the `room` field adds to a record.
pub fn room_len(room: Option<&str>) -> usize {
    room.map_or(0, |r| 5 + 5 + r.len())
}

/// Bytes of a record holding entries of `entry_bytes` bytes in all (for the size cap, without
/// encoding the whole set).
pub fn record_len(scope: Option<&str>, actor: &str, entry_bytes: usize) -> usize {
    // Map header; "v" and its value; "scope" and a str (header ≤ 5) or nil; "actor" and a
    // str; "subs" and an array header (≤ 5). An upper bound, exact up to header widths.
    1 + 2 + 1 + 6 + scope.map_or(1, |s| 5 + s.len()) + 6 + 5 + actor.len() + 5 + 5 + entry_bytes
}

/// Decodes a stored record. The broker is trusted no more than a client: anything malformed,
/// legacy or of another version is an error, and the caller restores nothing. An empty
/// payload (a cleared set) is `Ok(None)`.
pub fn decode(buf: &[u8]) -> Result<Option<Record>, RestoreError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut r = Reader::new(buf);
    if matches!(
        r.peek_marker(),
        Ok(rmp::Marker::FixArray(_) | rmp::Marker::Array16 | rmp::Marker::Array32)
    ) {
        return Err(RestoreError::Legacy);
    }
    let fields = r.map_len()?;
    let mut version = None;
    let mut record = Record {
        scope: None,
        actor: String::new(),
        entries: Vec::new(),
        room: None,
    };
    let mut entries_at = None;
    for _ in 0..fields {
        match r.str()? {
            "v" => {
                let v = r.number()?;
                // Any integral, non-negative value names a version; anything else is malformed.
                if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
                    return Err(MsgpackError::Type.into());
                }
                version = Some(v as u64);
            }
            "scope" if r.next_is_nil() => r.skip(0)?,
            "scope" => record.scope = Some(r.str()?.to_owned()),
            "actor" => record.actor = r.str()?.to_owned(),
            "room" if r.next_is_nil() => r.skip(0)?,
            "room" => record.room = Some(r.str()?.to_owned()),
            // Entries are read once the version is known (keys may come in any order).
            "subs" => entries_at = Some(r.value_bytes()?),
            _ => r.skip(0)?,
        }
    }
    if !r.is_empty() {
        return Err(MsgpackError::Type.into());
    }
    match version {
        Some(VERSION) => {}
        Some(v) => return Err(RestoreError::UnknownVersion(v)),
        None => return Err(MsgpackError::Type.into()),
    }
    if let Some(bytes) = entries_at {
        record.entries = decode_entries(bytes)?;
    }
    Ok(Some(record))
}

fn decode_entries(buf: &[u8]) -> Result<Vec<Entry>, RestoreError> {
    let mut r = Reader::new(buf);
    let n = r.array_len()?;
    if n > MAX_ENTRIES {
        return Err(RestoreError::TooManyEntries);
    }
    let mut out = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        let fields = r.map_len()?;
        let mut e = Entry {
            name: String::new(),
            load_balance: false,
            group: None,
            filters: Vec::new(),
        };
        for _ in 0..fields {
            match r.str()? {
                "name" => e.name = r.str()?.to_owned(),
                "loadBalance" => e.load_balance = r.bool()?,
                "loadBalanceGroup" if r.next_is_nil() => r.skip(0)?,
                "loadBalanceGroup" => e.group = Some(r.str()?.to_owned()),
                // The same shape and limits as a client's `filters`.
                "filters" => {
                    e.filters = super::decode::filter_items(r.value_bytes()?)
                        .map_err(|_| MsgpackError::Type)?;
                }
                _ => r.skip(0)?,
            }
        }
        out.push(e);
    }
    if !r.is_empty() {
        return Err(MsgpackError::Type.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            scope: Some("acme".into()),
            actor: "alice".into(),
            entries: vec![
                Entry {
                    name: "chat/general/messages".into(),
                    load_balance: false,
                    group: None,
                    filters: vec![],
                },
                Entry {
                    name: "chat/+/orders".into(),
                    load_balance: true,
                    group: Some("workers".into()),
                    filters: vec![
                        FilterItem::One("A".into()),
                        FilterItem::All(vec!["x".into(), "y".into()]),
                    ],
                },
            ],
            room: Some("chat/general".into()),
        }
    }

    #[test]
    fn round_trip() {
        let r = record();
        assert_eq!(decode(&encode(&r)).unwrap(), Some(r.clone()));
        let unscoped = Record { scope: None, ..r };
        assert_eq!(decode(&encode(&unscoped)).unwrap(), Some(unscoped));
        assert_eq!(decode(&[]).unwrap(), None);
    }

    #[test]
    fn record_len_is_exact_or_over() {
        for r in [
            record(),
            Record {
                scope: None,
                entries: vec![],
                room: None,
                ..record()
            },
        ] {
            let entry_bytes: usize = r.entries.iter().map(|e| e.encode().len()).sum::<usize>()
                + room_len(r.room.as_deref());
            let predicted = record_len(r.scope.as_deref(), &r.actor, entry_bytes);
            let actual = encode(&r).len();
            assert!(predicted >= actual, "{predicted} < {actual}");
            assert!(
                predicted <= actual + 16,
                "{predicted} much more than {actual}"
            );
        }
    }

    #[test]
    fn legacy_unknown_and_malformed_records_are_refused() {
        // What cuttle 0.1 wrote: a bare array of entries.
        let mut legacy = Vec::new();
        rmp::encode::write_array_len(&mut legacy, 1).unwrap();
        record().entries[0].encode_into(&mut legacy);
        assert_eq!(decode(&legacy), Err(RestoreError::Legacy));
        let mut v3 = Vec::new();
        rmp::encode::write_map_len(&mut v3, 1).unwrap();
        rmp::encode::write_str(&mut v3, "v").unwrap();
        rmp::encode::write_uint(&mut v3, 3).unwrap();
        assert_eq!(decode(&v3), Err(RestoreError::UnknownVersion(3)));
        assert!(decode(&[0x91, 0x01]).is_err());
        assert!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut trailing = encode(&record()).to_vec();
        trailing.push(0xc0);
        assert!(decode(&trailing).is_err());
    }
}
