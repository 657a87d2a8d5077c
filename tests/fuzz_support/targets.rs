//! The fuzz targets' bodies, shared by `fuzz/fuzz_targets/*.rs` (cargo-fuzz) and by
//! `tests/fuzz_corpus.rs` (an ordinary test over the stored corpus and seeded random input).
//! Each must return without panicking, hanging or allocating without bound, whatever the bytes.

#![allow(dead_code)]

use blocksnap::api::{IdKind, Request, SnapshotId};
use blocksnap::nbd::proto;
use blocksnap::store::{format, Manifest, MemBackend, NoProgress, RestoreMode, SharedMem, Store};
use std::sync::Arc;

/// `Request::parse` on a control-socket body.
pub fn request_parse(data: &[u8]) {
    if let Ok(req) = Request::parse(data) {
        // Whatever parsed must be printable (handlers log it).
        let _ = format!("{req:?}");
        // The control command sends `to_body()`: it must mean the same request.
        let again = Request::parse(req.to_body().to_string().as_bytes());
        assert_eq!(again.as_ref(), Ok(&req), "to_body() does not round-trip");
        // Ids the daemon would accept are safe to join to a path; the others are refused
        // with a short message free of control characters.
        for (kind, ids) in ids_of(&req) {
            match kind.check_all(&ids) {
                Ok(()) => {
                    for id in &ids {
                        assert!(kind.is_valid(id));
                        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
                        assert!(!id.is_empty() && id.len() <= 16, "{id:?}");
                    }
                }
                Err(e) => {
                    // At most 64 characters of the id, each escaped to at most 10
                    // (`\u{10ffff}`), plus the explanation.
                    assert!(e.message.len() < 64 * 10 + 160, "{}", e.message);
                    assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
                }
            }
        }
    }
}

/// The ids a request names, by kind.
fn ids_of(req: &Request) -> Vec<(IdKind, Vec<String>)> {
    let one = |s: &Option<String>| s.iter().cloned().collect::<Vec<_>>();
    match req {
        Request::DescribeVolumes(p) => vec![(IdKind::Volume, p.volumes.clone())],
        Request::AttachVolumes(p) => vec![(IdKind::Volume, p.volumes.clone())],
        Request::DetachVolumes(p) => vec![(IdKind::Volume, p.volumes.clone())],
        Request::ResizeVolumes(p) => vec![(IdKind::Volume, p.volumes.clone())],
        Request::DeleteVolumes(p) => vec![(IdKind::Volume, p.volumes.clone())],
        Request::CreateSnapshots(p) => vec![(IdKind::Volume, p.resources.clone())],
        Request::DescribeSnapshots(p) => vec![
            (IdKind::Snapshot, p.snapshots.clone()),
            (IdKind::Volume, one(&p.resource_id)),
        ],
        Request::DeleteSnapshots(p) => vec![(IdKind::Snapshot, p.snapshots.clone())],
        Request::ApplySnapshots(p) => vec![(IdKind::Snapshot, p.snapshots.clone())],
        Request::VerifySnapshots(p) => vec![(IdKind::Snapshot, p.snapshots.clone())],
        Request::CreateVolumeFromSnapshot(p) => vec![(IdKind::Snapshot, one(&p.snapshot))],
        Request::ModifySnapshotAttributes(p) => vec![(IdKind::Snapshot, one(&p.snapshot))],
        Request::DescribeJobs(p) => vec![(IdKind::Job, p.jobs.clone())],
        Request::CreateVolumes(_) => Vec::new(),
    }
}

/// The NBD parsers; the first byte chooses which.
pub fn nbd_proto(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 6 {
        0 => {
            let mut b = [0u8; proto::OPTION_HEADER_LEN];
            let n = rest.len().min(b.len());
            b[..n].copy_from_slice(&rest[..n]);
            let _ = proto::parse_option_header(&b);
        }
        1 => {
            let _ = proto::parse_export_name(rest);
        }
        2 => {
            let _ = proto::parse_info_request(rest);
        }
        3 => {
            if let Ok(m) = proto::parse_meta_context_request(rest) {
                let _ = format!("{m:?}");
            }
        }
        4 => {
            if rest.len() >= 4 {
                let f = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let _ = proto::parse_client_flags(f);
            }
        }
        _ => {
            let mut b = [0u8; proto::REQUEST_HEADER_LEN];
            let n = rest.len().min(b.len());
            b[..n].copy_from_slice(&rest[..n]);
            if let Ok(h) = proto::parse_request_header(&b) {
                let extra = &rest[n..];
                let size = extra
                    .get(..8)
                    .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
                    .unwrap_or(1 << 30);
                let flags = extra.get(8).copied().unwrap_or(0);
                let caps = proto::SessionCaps {
                    size,
                    structured: flags & 1 != 0,
                    block_status: flags & 2 != 0,
                    read_only: flags & 4 != 0,
                };
                let _ = proto::check_request(&h, &caps);
            }
        }
    }
}

fn fuzz_id() -> SnapshotId {
    "ss-fuzz0001".parse().unwrap()
}

/// The manifest decoder, directly and through a store on a `MemBackend`.
pub fn store_manifest(data: &[u8]) {
    if let Ok(body) = format::decode_manifest(data) {
        let _ = serde_json::from_slice::<Manifest>(body);
    }
    let mem = SharedMem::new();
    let inner: Arc<MemBackend> = mem.0.clone();
    let st = Store::with_backend(Arc::new(mem)).unwrap();
    inner.set("snapshots/ss-fuzz0001/manifest", data.to_vec());
    let _ = st.list();
    let _ = st.verify(&fuzz_id(), &NoProgress);
    let _ = st.chain(&fuzz_id());
}

/// A committed-looking manifest whose delta is `delta` (length and BLAKE3 match, so the
/// store's deeper checks run on the fuzzed bytes).
fn manifest_for(delta: &[u8], volume_size: u64) -> Manifest {
    let record_count = if delta.len() >= 40 {
        format::decode_footer(&delta[delta.len() - 40..], delta.len() as u64)
            .map(|f| f.record_count)
            .unwrap_or(0)
    } else {
        0
    };
    Manifest {
        id: fuzz_id(),
        volume_id: "vol-fuzz0001".parse().unwrap(),
        volume_name: "fuzz".into(),
        name: "fuzz".into(),
        description: String::new(),
        owner: "root".into(),
        parent: None,
        volume_size,
        block_size: 4096,
        snapshot_time: 0,
        create_time: 0,
        freeze_ms: 0,
        consistency: "crash".into(),
        stored_bytes: 0,
        record_count,
        generation: 0,
        delta_file: "delta.0".into(),
        delta_len: delta.len() as u64,
        delta_blake3: blake3::hash(delta).to_hex().to_string(),
        hashes_file: "hashes".into(),
    }
}

/// The record/index/footer/hash-file decoders, directly and through verify + restore.
pub fn store_records(data: &[u8]) {
    let id = fuzz_id();
    // Direct decoders.
    if data.len() >= 32 {
        let _ = format::decode_delta_header(&data[..32], &id);
    }
    let _ = format::decode_hashes(data, &id);
    let volume_size = 1u64 << 20;
    if data.len() >= 40 {
        let fb = &data[data.len() - 40..];
        if let Ok(f) = format::decode_footer(fb, data.len() as u64) {
            let start = f.index_pos as usize;
            let end = data.len() - 40;
            if start <= end {
                if let Ok(idx) = format::decode_index(&data[start..end], fb, &f, volume_size) {
                    for e in &idx {
                        let p = e.file_pos as usize;
                        if let Some(h) = data.get(p..p + 32) {
                            let _ = format::check_record_header(h, e);
                        }
                    }
                }
            }
        }
    }
    // Through the store: verify and restore of a snapshot whose delta is `data`.
    let mem = SharedMem::new();
    let inner: Arc<MemBackend> = mem.0.clone();
    let st = Store::with_backend(Arc::new(mem)).unwrap();
    let m = manifest_for(data, volume_size);
    let body = serde_json::to_vec(&m).unwrap();
    inner.set(
        "snapshots/ss-fuzz0001/manifest",
        format::encode_manifest(&body),
    );
    inner.set("snapshots/ss-fuzz0001/delta.0", data.to_vec());
    inner.set("snapshots/ss-fuzz0001/hashes", data.to_vec());
    let _ = st.verify(&id, &NoProgress);
    let _ = st.block_hashes(&m);
    if let Ok(target) = tempfile::tempfile() {
        let _ = st.restore(&id, &target, RestoreMode::Fresh, &NoProgress);
    }
}
