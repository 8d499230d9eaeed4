//! The subscriber protocol's frame decoders on arbitrary frames (what a
//! hostile client sends the server, or a hostile server a client): they
//! never panic, and whatever decodes encodes back to a frame that decodes
//! to the same thing.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mirror_user::server::protocol::{ClientFrame, OLDEST_VERSION, ServerFrame, VERSION};

fuzz_target!(|frame: &[u8]| {
    if let Ok(decoded) = ClientFrame::decode(frame) {
        let mut encoded = BytesMut::new();
        decoded.encode(&mut encoded);
        assert_eq!(ClientFrame::decode(&encoded), Ok(decoded));
    }
    let decoded = ServerFrame::decode(frame);
    let shared = ServerFrame::decode_shared(Bytes::copy_from_slice(frame));
    if let Ok(decoded) = decoded {
        assert_eq!(shared.as_ref(), Ok(&decoded), "both decoders agree");
        let mut encoded = BytesMut::new();
        decoded.encode(&mut encoded);
        assert_eq!(ServerFrame::decode(&encoded), Ok(decoded.clone()));
        // On the wire: the length prefix, then the rest.
        let mut wire = BytesMut::new();
        let payload = decoded.encode_wire(VERSION, &mut wire);
        if let Some(payload) = payload {
            wire.extend_from_slice(&payload);
        }
        let len = u32::from_be_bytes(wire[..4].try_into().expect("a prefix")) as usize;
        assert_eq!(len, wire.len() - 4);
        assert_eq!(ServerFrame::decode(&wire[4..]), Ok(decoded.clone()));
        // A version 2 session's form of it decodes too.
        let mut old = BytesMut::new();
        decoded.encode_for(OLDEST_VERSION, &mut old);
        assert!(ServerFrame::decode(&old).is_ok(), "{decoded:?}");
    }
});
