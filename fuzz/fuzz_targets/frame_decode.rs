//! Client → server frames: `cuttle::wire::decode` on arbitrary bytes (what a WebSocket client
//! sends), then the pure part of what the session and the router do with the frame (see
//! `cuttle_fuzz`): token verification, topic and filter parsing, authorization, upstream
//! topics and filters, the echo envelope, and the reply frames.

#![no_main]

use cuttle::wire::encode::ErrorFrame;
use cuttle::wire::{ClientFrame, decode};
use cuttle_fuzz::{WORLD, assert_frame, authenticate, check_envelope, publish, subscribe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = match decode(data) {
        Ok(frame) => frame,
        Err(e) => {
            // The session answers with an error frame naming the problem.
            assert_frame(
                &ErrorFrame {
                    error: &e.to_string(),
                    ..Default::default()
                }
                .encode(),
            );
            return;
        }
    };
    let _ = frame.kind();
    let world = &*WORLD;
    match frame {
        ClientFrame::Auth(a) => {
            if let Some(token) = a.token {
                authenticate(world, token.expose());
            }
        }
        ClientFrame::Publish(p) => publish(world, &p),
        ClientFrame::Subscribe(s) => subscribe(
            world,
            s.topic,
            &s.filters,
            s.load_balance,
            s.load_balance_group,
        ),
        ClientFrame::SetFilters { topic, filters } => {
            // The session keeps the subscription's load-balance setting; try both.
            subscribe(world, topic, &filters, false, None);
            subscribe(world, topic, &filters, true, None);
        }
        ClientFrame::Unsubscribe { topic } => subscribe(world, topic, &[], false, None),
        // Not served by this build (PROTOCOL §11–12); the payload would be passed through.
        ClientFrame::Presence { data, .. } => check_envelope(data),
        ClientFrame::Heartbeat
        | ClientFrame::GetPresence { .. }
        | ClientFrame::LobbySubscribe { .. }
        | ClientFrame::LobbyUnsubscribe { .. }
        | ClientFrame::GetLobbyPresence { .. }
        | ClientFrame::Ack
        | ClientFrame::BatchAck
        | ClientFrame::Ignored => {}
    }
});
