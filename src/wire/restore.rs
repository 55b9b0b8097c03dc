//! The persisted subscription set of an actor (PROTOCOL §13), as stored in the broker and as
//! returned in `restoredSubscriptions`: a MessagePack array of
//! `{name, loadBalance, loadBalanceGroup, filters}` maps (the SDK's type, A11).

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

/// Encodes a whole set (the retained payload).
pub fn encode(entries: &[Entry]) -> Bytes {
    let mut out = Vec::new();
    let _ = rmp::encode::write_array_len(&mut out, entries.len() as u32);
    for e in entries {
        e.encode_into(&mut out);
    }
    out.into()
}

/// Decodes a stored set. The broker is trusted no more than a client: anything malformed is
/// an error, and the caller restores nothing.
pub fn decode(buf: &[u8]) -> Result<Vec<Entry>, MsgpackError> {
    if buf.is_empty() {
        return Ok(Vec::new()); // a cleared set
    }
    let mut r = Reader::new(buf);
    let n = r.array_len()?;
    if n > MAX_ENTRIES {
        return Err(MsgpackError::Type);
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
        return Err(MsgpackError::Type);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let set = vec![
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
        ];
        assert_eq!(decode(&encode(&set)).unwrap(), set);
        assert_eq!(decode(&[]).unwrap(), vec![]);
        assert!(decode(&[0x91, 0x01]).is_err());
        assert!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
