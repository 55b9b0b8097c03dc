//! What replicas publish to each other about presence (DESIGN §9):
//! `cuttle::presence::message::Message::decode` on arbitrary bytes (anything on the reserved
//! topics — a broker, or a client with broker access, could have written it), the round
//! trip (whatever decodes re-encodes to bytes that decode to the same message), and the
//! replica core taking the message: `Core::on_message` and a tick must never panic, and what
//! it holds stays within its bounds.

#![no_main]

use cuttle::presence::core::{Config, Core, Effects, RoomKey};
use cuttle::presence::message::Message;
use libfuzzer_sys::fuzz_target;

fn core() -> Core {
    let mut c = Core::new(Config {
        replica: "local".into(),
        incarnation: 5,
        heartbeat_ms: 1000,
        replica_timeout_ms: 5000,
        grace_ms: 1000,
        sync_retry_ms: 1000,
        snapshot_interval_ms: 250,
        max_room_members: 64,
        max_state_bytes: 1 << 20,
        max_message_bytes: 4096,
        max_replicas: 8,
    });
    let room = RoomKey {
        project: "demo".into(),
        app: "chat".into(),
        scope: Some("acme".into()),
        room: "general".into(),
    };
    let mut fx = Effects::default();
    let _ = c.set(1, room, "alice".into(), vec![0x80u8].into(), 1000, &mut fx);
    c
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::decode(data) else {
        return;
    };
    let bytes = message.encode();
    let again = Message::decode(&bytes)
        .unwrap_or_else(|e| panic!("encode output does not decode: {e}: {message:?}"));
    assert_eq!(again, message, "decode(encode(x)) != x");
    assert_eq!(again.encode(), bytes, "encode is not stable");
    // The same message twice (a duplicate), then time passing.
    let mut c = core();
    let mut fx = Effects::default();
    c.on_message(message.clone(), 2000, &mut fx);
    c.on_message(message, 2001, &mut fx);
    c.tick(9000, &mut fx);
    assert!(c.state_bytes() <= c.config().max_state_bytes + 4096, "state over its bound");
});
