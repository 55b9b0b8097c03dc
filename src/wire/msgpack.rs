//! Minimal MessagePack reading over a byte slice: typed reads of the scalars the protocol
//! uses, and skipping (measuring) any value without decoding it, so that a payload can be
//! passed through byte-exact (PROTOCOL §2: `data` is opaque).
//!
//! Everything here reads untrusted bytes: lengths are checked against what is left before any
//! slicing, nesting depth is bounded, and nothing allocates in proportion to a declared length.

use rmp::Marker;

/// Deepest nesting accepted inside a value (arrays/maps). The SDK never comes close; a
/// hostile frame of nested one-element arrays must not exhaust the stack.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("truncated MessagePack")]
    Truncated,
    #[error("reserved MessagePack marker")]
    Reserved,
    #[error("MessagePack nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("unexpected MessagePack type")]
    Type,
    #[error("invalid UTF-8 in a MessagePack string")]
    Utf8,
}

/// A read cursor over a frame.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        if n > self.buf.len() {
            return Err(MsgpackError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, MsgpackError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, MsgpackError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    pub fn peek_marker(&self) -> Result<Marker, MsgpackError> {
        self.buf
            .first()
            .map(|b| Marker::from_u8(*b))
            .ok_or(MsgpackError::Truncated)
    }

    fn marker(&mut self) -> Result<Marker, MsgpackError> {
        Ok(Marker::from_u8(self.u8()?))
    }

    /// Reads a map header.
    pub fn map_len(&mut self) -> Result<usize, MsgpackError> {
        match self.marker()? {
            Marker::FixMap(n) => Ok(n as usize),
            Marker::Map16 => Ok(self.be(2)? as usize),
            Marker::Map32 => Ok(self.be(4)? as usize),
            _ => Err(MsgpackError::Type),
        }
    }

    /// Reads an array header.
    pub fn array_len(&mut self) -> Result<usize, MsgpackError> {
        match self.marker()? {
            Marker::FixArray(n) => Ok(n as usize),
            Marker::Array16 => Ok(self.be(2)? as usize),
            Marker::Array32 => Ok(self.be(4)? as usize),
            _ => Err(MsgpackError::Type),
        }
    }

    /// Reads a str.
    pub fn str(&mut self) -> Result<&'a str, MsgpackError> {
        let len = match self.marker()? {
            Marker::FixStr(n) => n as usize,
            Marker::Str8 => self.be(1)? as usize,
            Marker::Str16 => self.be(2)? as usize,
            Marker::Str32 => self.be(4)? as usize,
            _ => return Err(MsgpackError::Type),
        };
        std::str::from_utf8(self.take(len)?).map_err(|_| MsgpackError::Utf8)
    }

    /// Reads a bool.
    pub fn bool(&mut self) -> Result<bool, MsgpackError> {
        match self.marker()? {
            Marker::True => Ok(true),
            Marker::False => Ok(false),
            _ => Err(MsgpackError::Type),
        }
    }

    /// Reads any number (int of any width, or float) as an `f64`; the protocol's numeric
    /// fields (`qos`, `protocolVersion`) are small and the SDK may send either form.
    pub fn number(&mut self) -> Result<f64, MsgpackError> {
        Ok(match self.marker()? {
            Marker::FixPos(n) => f64::from(n),
            Marker::FixNeg(n) => f64::from(n),
            Marker::U8 => self.be(1)? as f64,
            Marker::U16 => self.be(2)? as f64,
            Marker::U32 => self.be(4)? as f64,
            Marker::U64 => self.be(8)? as f64,
            Marker::I8 => f64::from(self.be(1)? as u8 as i8),
            Marker::I16 => f64::from(self.be(2)? as u16 as i16),
            Marker::I32 => f64::from(self.be(4)? as u32 as i32),
            Marker::I64 => self.be(8)? as i64 as f64,
            Marker::F32 => f64::from(f32::from_bits(self.be(4)? as u32)),
            Marker::F64 => f64::from_bits(self.be(8)?),
            _ => return Err(MsgpackError::Type),
        })
    }

    /// Reads an unsigned integer of any width, exactly (ids and clocks do not fit an `f64`).
    pub fn uint(&mut self) -> Result<u64, MsgpackError> {
        match self.marker()? {
            Marker::FixPos(n) => Ok(u64::from(n)),
            Marker::U8 => self.be(1),
            Marker::U16 => self.be(2),
            Marker::U32 => self.be(4),
            Marker::U64 => self.be(8),
            _ => Err(MsgpackError::Type),
        }
    }

    /// Whether the next value is nil (without consuming it).
    pub fn next_is_nil(&self) -> bool {
        matches!(self.peek_marker(), Ok(Marker::Null))
    }

    /// Skips one complete value and returns its exact bytes.
    pub fn value_bytes(&mut self) -> Result<&'a [u8], MsgpackError> {
        let start = self.buf;
        self.skip(0)?;
        let used = start.len() - self.buf.len();
        Ok(&start[..used])
    }

    /// Skips one value. Iterative over siblings, recursive over nesting (bounded).
    pub fn skip(&mut self, depth: usize) -> Result<(), MsgpackError> {
        if depth > MAX_DEPTH {
            return Err(MsgpackError::TooDeep);
        }
        let n = match self.marker()? {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixStr(n) => n as usize,
            Marker::Str8 | Marker::Bin8 => self.be(1)? as usize,
            Marker::Str16 | Marker::Bin16 => self.be(2)? as usize,
            Marker::Str32 | Marker::Bin32 => self.be(4)? as usize,
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::Ext8 => self.be(1)? as usize + 1,
            Marker::Ext16 => self.be(2)? as usize + 1,
            Marker::Ext32 => self.be(4)? as usize + 1,
            Marker::FixArray(n) => return self.skip_items(n as usize, depth),
            Marker::Array16 => {
                let n = self.be(2)? as usize;
                return self.skip_items(n, depth);
            }
            Marker::Array32 => {
                let n = self.be(4)? as usize;
                return self.skip_items(n, depth);
            }
            Marker::FixMap(n) => return self.skip_items(n as usize * 2, depth),
            Marker::Map16 => {
                let n = self.be(2)? as usize;
                return self.skip_items(n.saturating_mul(2), depth);
            }
            Marker::Map32 => {
                let n = self.be(4)? as usize;
                return self.skip_items(n.saturating_mul(2), depth);
            }
            Marker::Reserved => return Err(MsgpackError::Reserved),
        };
        self.take(n).map(|_| ())
    }

    fn skip_items(&mut self, n: usize, depth: usize) -> Result<(), MsgpackError> {
        // Each item takes at least one byte: a declared count beyond what is left is a lie,
        // caught before looping over it.
        if n > self.buf.len() {
            return Err(MsgpackError::Truncated);
        }
        for _ in 0..n {
            self.skip(depth + 1)?;
        }
        Ok(())
    }
}

/// One MessagePack value as JSON, for the HTTP API's answers (presence data): maps become
/// objects (scalar non-string keys are written as their JSON text; a map or array as a key
/// is an error), bin becomes `{"$bin": hex}`, ext
/// `{"$ext": type, "$bin": hex}`, non-finite floats `null`. Depth is bounded by [`MAX_DEPTH`];
/// trailing bytes are ignored.
pub fn read_json(bytes: &[u8]) -> Result<serde_json::Value, MsgpackError> {
    Reader::new(bytes).json(0)
}

impl Reader<'_> {
    fn json(&mut self, depth: usize) -> Result<serde_json::Value, MsgpackError> {
        use serde_json::Value as V;
        if depth > MAX_DEPTH {
            return Err(MsgpackError::TooDeep);
        }
        // bin and ext become objects: one level deeper than the value, so the JSON (written
        // back as MessagePack) stays within MAX_DEPTH too (found by fuzzing).
        let as_object = |depth: usize| {
            if depth + 1 > MAX_DEPTH {
                Err(MsgpackError::TooDeep)
            } else {
                Ok(())
            }
        };
        let bin = |b: &[u8]| serde_json::json!({ "$bin": hex::encode(b) });
        let float = |f: f64| serde_json::Number::from_f64(f).map_or(V::Null, V::Number);
        Ok(match self.peek_marker()? {
            Marker::Null => {
                self.marker()?;
                V::Null
            }
            Marker::True | Marker::False => V::Bool(self.bool()?),
            Marker::FixPos(_) | Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => {
                V::from(self.uint()?)
            }
            Marker::FixNeg(_) | Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
                let m = self.marker()?;
                let v = match m {
                    Marker::FixNeg(n) => i64::from(n),
                    Marker::I8 => i64::from(self.be(1)? as u8 as i8),
                    Marker::I16 => i64::from(self.be(2)? as u16 as i16),
                    Marker::I32 => i64::from(self.be(4)? as u32 as i32),
                    _ => self.be(8)? as i64,
                };
                V::from(v)
            }
            Marker::F32 | Marker::F64 => float(self.number()?),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                V::String(self.str()?.to_string())
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                as_object(depth)?;
                let len = match self.marker()? {
                    Marker::Bin8 => self.be(1)?,
                    Marker::Bin16 => self.be(2)?,
                    _ => self.be(4)?,
                } as usize;
                bin(self.take(len)?)
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.array_len()?;
                if n > self.buf.len() {
                    return Err(MsgpackError::Truncated);
                }
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.json(depth + 1)?);
                }
                V::Array(a)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.map_len()?;
                if n.saturating_mul(2) > self.buf.len() {
                    return Err(MsgpackError::Truncated);
                }
                let mut m = serde_json::Map::new();
                for _ in 0..n {
                    // A scalar key is written as its JSON text. A map or array key is refused:
                    // stringified, each level would escape the one inside it again, and nested
                    // keys would grow exponentially (found by fuzzing).
                    let key = match self.json(depth + 1)? {
                        V::String(s) => s,
                        V::Array(_) | V::Object(_) => return Err(MsgpackError::Type),
                        other => other.to_string(),
                    };
                    let value = self.json(depth + 1)?;
                    m.insert(key, value);
                }
                V::Object(m)
            }
            Marker::Reserved => return Err(MsgpackError::Reserved),
            // Ext: its type byte and payload.
            _ => {
                as_object(depth)?;
                let whole = self.value_bytes()?;
                let (kind, payload) = match whole.first().map(|b| Marker::from_u8(*b)) {
                    Some(Marker::FixExt1 | Marker::FixExt2 | Marker::FixExt4)
                    | Some(Marker::FixExt8 | Marker::FixExt16) => (whole.get(1), whole.get(2..)),
                    Some(Marker::Ext8) => (whole.get(2), whole.get(3..)),
                    Some(Marker::Ext16) => (whole.get(3), whole.get(4..)),
                    _ => (whole.get(5), whole.get(6..)),
                };
                serde_json::json!({
                    "$ext": kind.map_or(0, |k| *k as i8),
                    "$bin": hex::encode(payload.unwrap_or_default()),
                })
            }
        })
    }
}

/// Appends `v` as MessagePack: null → nil, bool, integers in their smallest form, other
/// numbers as f64, strings as str, arrays, objects as maps with str keys. For JSON from the
/// HTTP API (its nesting is bounded by `serde_json`'s recursion limit, 128).
pub fn write_json(out: &mut Vec<u8>, v: &serde_json::Value) {
    use serde_json::Value as V;
    // Writing to a Vec cannot fail; the results are ignored for that reason.
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    match v {
        V::Null => {
            let _ = rmp::encode::write_nil(out);
        }
        V::Bool(b) => {
            let _ = rmp::encode::write_bool(out, *b);
        }
        V::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = rmp::encode::write_sint(out, i);
            } else if let Some(u) = n.as_u64() {
                let _ = rmp::encode::write_uint(out, u);
            } else {
                let _ = rmp::encode::write_f64(out, n.as_f64().unwrap_or(0.0));
            }
        }
        V::String(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        V::Array(a) => {
            let _ = rmp::encode::write_array_len(out, len(a.len()));
            a.iter().for_each(|x| write_json(out, x));
        }
        V::Object(m) => {
            let _ = rmp::encode::write_map_len(out, len(m.len()));
            for (k, x) in m {
                let _ = rmp::encode::write_str(out, k);
                write_json(out, x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        write_json(&mut out, v);
        out
    }

    #[test]
    fn json_round_trips_and_hostile_bytes_error() {
        let v = serde_json::json!({"a": [1, -2, 3.5, null, true, "x", {"b": 300, "c": -70000, "d": u64::MAX}]});
        assert_eq!(read_json(&enc(&v)).unwrap(), v);
        // bin and ext, and a map with a non-string key.
        let bytes = [
            0x83, 0xa1, b'b', 0xc4, 0x02, 0x01, 0xff, 0xa1, b'e', 0xd4, 0x05, 0x07, 0x01, 0x02,
        ];
        assert_eq!(
            read_json(&bytes).unwrap(),
            serde_json::json!({"b": {"$bin": "01ff"}, "e": {"$ext": 5, "$bin": "07"}, "1": 2})
        );
        let deep = vec![0x91u8; 1000];
        assert_eq!(read_json(&deep), Err(MsgpackError::TooDeep));
        // A bin at the deepest level would become an object one level deeper: refused.
        let mut at_limit = vec![0x91u8; MAX_DEPTH];
        at_limit.extend([0xc4, 0x01, 0x00]);
        assert_eq!(read_json(&at_limit), Err(MsgpackError::TooDeep));
        let mut below = vec![0x91u8; MAX_DEPTH - 1];
        below.extend([0xc4, 0x01, 0x00]);
        let v = read_json(&below).unwrap();
        let mut again = Vec::new();
        write_json(&mut again, &v);
        assert_eq!(read_json(&again).unwrap(), v);
        // Maps as keys of maps: refused, not stringified level by level (exponential).
        let mut keys = vec![0x81u8; 40];
        keys.extend([0x01, 0x02]);
        assert_eq!(read_json(&keys), Err(MsgpackError::Type));
        for bad in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0x7f, 0xff, 0xff, 0xff],
            &[0xc1],
            &[],
        ] {
            assert!(read_json(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn value_bytes_are_exact() {
        let v = serde_json::json!({"a": [1, -2, 3.5, null, true, "x", {"b": 300, "c": -70000}]});
        let bytes = enc(&v);
        let mut with_tail = bytes.clone();
        with_tail.push(0xc0);
        let mut r = Reader::new(&with_tail);
        assert_eq!(r.value_bytes().unwrap(), &bytes[..]);
        assert_eq!(r.remaining(), &[0xc0]);
    }

    #[test]
    fn bin_and_ext_are_skipped() {
        let mut buf = Vec::new();
        rmp::encode::write_bin(&mut buf, &[1, 2, 3]).unwrap();
        rmp::encode::write_ext_meta(&mut buf, 8, -1).unwrap();
        buf.extend_from_slice(&[0; 8]);
        let mut r = Reader::new(&buf);
        assert_eq!(r.value_bytes().unwrap().len(), 5);
        assert_eq!(r.value_bytes().unwrap().len(), 10);
        assert!(r.is_empty());
    }

    #[test]
    fn hostile_input_errors_instead_of_panicking() {
        // Truncated lengths, lying counts, deep nesting, reserved marker.
        for bad in [
            &[0xdb, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
            &[0xdf, 0x7f, 0xff, 0xff, 0xff],
            &[0xc1],
            &[0xd9],
            &[0xc7, 0x05, 0x01],
            &[],
        ] {
            assert!(Reader::new(bad).value_bytes().is_err(), "{bad:?}");
        }
        let deep = vec![0x91u8; 1000];
        assert_eq!(Reader::new(&deep).value_bytes(), Err(MsgpackError::TooDeep));
    }

    #[test]
    fn numbers_of_any_width() {
        for (v, expect) in [
            (serde_json::json!(1), 1.0),
            (serde_json::json!(300), 300.0),
            (serde_json::json!(-5), -5.0),
            (serde_json::json!(1.5), 1.5),
        ] {
            assert_eq!(Reader::new(&enc(&v)).number().unwrap(), expect);
        }
    }
}
