//! What one member reads from another's messages beyond raft's own (prost decodes those): the
//! follower proxy's requests, its replies and packed replies, `HELLO`'s settings and cluster id, the leader's
//! health report, a snapshot's descriptor and payload, a recovery record. Decoding must never
//! panic, and what decodes must encode back to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use raftis::cluster_id::ClusterId;
use raftis::forward::{decode_replies, encode_replies, read_reply_frame, reply_frame, ForwardRequest};
use raftis::health_report::HealthReport;
use raftis::recovery::Recovery;
use raftis::resp::{self, Frame};
use raftis::shared_settings::SharedSettings;
use raftis::snapshot_data;
use raftis::snapshot_transfer::SnapshotDescriptor;

fuzz_target!(|data: &[u8]| {
    forward_request(data);
    forward_reply(data);
    if let Some(replies) = decode_replies(data) {
        assert_eq!(decode_replies(&encode_replies(&replies)), Some(replies));
    }
    if let Ok(report) = HealthReport::parse(data) {
        assert_eq!(HealthReport::parse(report.encode().as_bytes()), Ok(report));
    }
    if let Some(descriptor) = SnapshotDescriptor::decode(data) {
        assert_eq!(SnapshotDescriptor::decode(&descriptor.encode()), Some(descriptor));
    }
    if let Some(recovery) = Recovery::decode(data) {
        assert_eq!(Recovery::decode(&recovery.encode()), Some(recovery));
    }
    if let Ok((members, app)) = snapshot_data::decode(data) {
        let again = snapshot_data::encode(&members, app);
        let (members_again, app_again) = snapshot_data::decode(&again).expect("an encoded payload decodes");
        assert_eq!((members_again, app_again), (members, app));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let settings = SharedSettings::decode(text);
        assert_eq!(SharedSettings::decode(&settings.encode()), settings);
        let _ = settings.differences(&SharedSettings::default());
        if let Some(id) = ClusterId::parse(text) {
            assert_eq!(ClusterId::parse(&id.to_string()), Some(id));
        }
    }
});

/// `FORWARD`, `FORWARD-TX` or `FORWARD-BLOCK`, as the leader's side port reads them.
fn forward_request(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let Ok(Some(Frame::Array(items))) = resp::parse(&mut buf) else { return };
    let Some((Frame::Bulk(verb), args)) = items.split_first() else { return };
    if !ForwardRequest::is_verb(verb) {
        return;
    }
    let Ok(request) = ForwardRequest::decode(verb, args) else { return };
    let mut out = BytesMut::new();
    request.encode(&mut out);
    let Ok(Some(Frame::Array(items))) = resp::parse(&mut out) else { panic!("an encoded request is a command") };
    let Some((Frame::Bulk(verb), args)) = items.split_first() else { panic!("an encoded request has a verb") };
    assert_eq!(ForwardRequest::decode(verb, args), Ok(request));
}

/// A forwarded command's reply, as a follower reads it back from the leader.
fn forward_reply(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let Ok(Some(frame)) = resp::parse(&mut buf) else { return };
    let Ok((raw, reflects)) = read_reply_frame(frame) else { return };
    assert_eq!(read_reply_frame(reply_frame(Ok(raw.clone()), reflects)), Ok((raw, reflects)));
}
