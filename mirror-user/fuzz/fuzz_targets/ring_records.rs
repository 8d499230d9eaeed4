//! The ring record decoder on arbitrary records (the kernel writes only
//! well-formed ones, but the packet bytes behind the header are whatever
//! the network sent): it never panics, and a decoded segment never claims
//! more captured payload than the packet carried.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mirror_user::{flow::segment::PayloadPool, kernel::record::Record};

fuzz_target!(|raw: &[u8]| {
    let Ok(record) = Record::decode(raw) else {
        return;
    };
    assert!(record.packet.len() == record.header.cap_len as usize);
    let Ok(tcp) = record.tcp() else {
        return;
    };
    assert!(tcp.payload.len() as u64 <= u64::from(tcp.payload_len));
    let mut pool = PayloadPool::new(4096);
    let segment = record.segment(&mut pool).expect("decoded once already");
    assert_eq!(&segment.payload[..], tcp.payload);
    assert_eq!(segment.seq, tcp.seq);
});
