//! Bytes from a replication connection: framing, then each message as the streaming client reads
//! it (CopyData → XLogData/keepalive → pgoutput), authentication requests and data rows. Nothing
//! may panic or reserve more than the framing limit.
#![no_main]

use bytes::{Bytes, BytesMut};
use dongbo_connectors::postgres::{pgoutput, protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some((tag, body))) = protocol::decode_frame(&mut buf) {
        match tag {
            b'd' => {
                if let Ok(protocol::ReplicationMessage::XLogData { data, .. }) = protocol::replication_message(body) {
                    let _ = pgoutput::decode(data);
                }
            }
            b'R' => {
                let _ = protocol::auth_request(body);
            }
            b'D' => {
                let _ = protocol::parse_data_row(body);
            }
            _ => {}
        }
    }
    let _ = protocol::replication_message(Bytes::copy_from_slice(data));
});
