//! The upstream payload envelope for echo suppression (PROTOCOL §9).
//!
//! A publish with `echo: false` goes upstream as `{_sender: <socket id>, data: <payload>}`;
//! every receiving proxy unwraps it and the socket whose id is `_sender` drops it. Other
//! publishes go upstream as the bare payload, so plain MQTT consumers see the client's data.
//!
//! A bare payload that itself looks like an envelope would be misread, letting a client strip
//! its own payload or suppress delivery to another socket; such payloads are always wrapped
//! (with an empty `_sender`), which makes the encoding unambiguous.

use super::msgpack::Reader;

/// Splits an upstream payload into (client data, sender socket id).
pub fn unwrap(payload: &[u8]) -> (&[u8], Option<&str>) {
    parse(payload).unwrap_or((payload, None))
}

fn parse(payload: &[u8]) -> Option<(&[u8], Option<&str>)> {
    let mut r = Reader::new(payload);
    if r.map_len().ok()? != 2 {
        return None;
    }
    let mut sender = None;
    let mut data = None;
    for _ in 0..2 {
        match r.str().ok()? {
            "_sender" => sender = Some(r.str().ok()?),
            "data" => data = Some(r.value_bytes().ok()?),
            _ => return None,
        }
    }
    if !r.is_empty() {
        return None;
    }
    let sender = sender?;
    Some((data?, (!sender.is_empty()).then_some(sender)))
}

/// The upstream payload for `data` published by socket `sender` with the given `echo`.
pub fn wrap(data: &[u8], sender: &str, echo: bool) -> bytes::Bytes {
    if echo && parse(data).is_none() {
        return bytes::Bytes::copy_from_slice(data);
    }
    let sender = if echo { "" } else { sender };
    let mut out = Vec::with_capacity(data.len() + sender.len() + 24);
    let _ = rmp::encode::write_map_len(&mut out, 2);
    let _ = rmp::encode::write_str(&mut out, "_sender");
    let _ = rmp::encode::write_str(&mut out, sender);
    let _ = rmp::encode::write_str(&mut out, "data");
    out.extend_from_slice(data);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_value(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        rmp::encode::write_str(&mut v, s).unwrap();
        v
    }

    #[test]
    fn echo_on_is_bare_and_echo_off_is_wrapped() {
        let data = str_value("hello");
        assert_eq!(&wrap(&data, "s1", true)[..], &data[..]);
        let wrapped = wrap(&data, "s1", false);
        assert_eq!(unwrap(&wrapped), (&data[..], Some("s1")));
        assert_eq!(unwrap(&data), (&data[..], None));
    }

    #[test]
    fn lookalike_payloads_are_wrapped() {
        // A client publishing something shaped like an envelope, naming another socket.
        let fake = wrap(&str_value("x"), "victim", false);
        let sent = wrap(&fake, "attacker", true);
        assert_ne!(&sent[..], &fake[..]);
        assert_eq!(
            unwrap(&sent),
            (&fake[..], None),
            "delivered intact, suppresses nobody"
        );
    }
}
