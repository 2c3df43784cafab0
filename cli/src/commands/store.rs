//! `flotctl store snapshot save FILE` / `restore FILE`: the fleet's whole keyspace at one
//! revision, to a file and back, through the hub's `Kv` API — the same on the Raft store and
//! on etcd, so it is both the backup of the embedded store and the way to move a fleet from
//! one backend to the other (docs/operations.md).
//!
//! The file is JSON lines: a header (format, revision, key count), one `{"key","value"}` line
//! per key (base64), and a footer with the SHA-256 of those lines. A restore checks all of it
//! before writing anything, and writes only into an empty store.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use flotilla_api::v1;
use flotilla_api::v1::kv_client::KvClient;
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use super::{Ctx, Failure};

/// The format name in a snapshot's header.
const FORMAT: &str = "flotilla-store-snapshot";
/// The format version this flotctl writes and reads.
const VERSION: u64 = 1;
/// Keys fetched at once while saving.
const FETCH_CONCURRENCY: usize = 16;
/// Most keys per restore transaction (each with a compare: 2 operations a key).
const BATCH_KEYS: usize = 60;
/// Most value bytes per restore transaction (the gRPC message limit is 4 MiB).
const BATCH_BYTES: usize = 1 << 20;

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum Store {
    /// Snapshots of the whole store.
    Snapshot {
        /// Save or restore.
        #[command(subcommand)]
        what: Snapshot,
    },
}

/// `store snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum Snapshot {
    /// Write every key at one revision to FILE (written whole, then renamed into place).
    Save {
        /// Where to write the snapshot.
        file: PathBuf,
    },
    /// Write FILE's keys into the hub's store, which must be empty (a new hub cluster, or a
    /// hub on an unused etcd prefix).
    Restore {
        /// The snapshot to restore.
        file: PathBuf,
    },
}

/// Runs `store`.
pub async fn run(ctx: &mut Ctx, s: Store) -> Result<(), Failure> {
    let Store::Snapshot { what } = s;
    let mut kv = KvClient::new(ctx.channel.clone());
    match what {
        Snapshot::Save { file } => save(ctx, &mut kv, &file).await,
        Snapshot::Restore { file } => restore(ctx, &mut kv, &file).await,
    }
}

fn every_key() -> v1::RangeRequest {
    v1::RangeRequest {
        key: Vec::new(),
        prefix: true,
        ..Default::default()
    }
}

async fn save(ctx: &Ctx, kv: &mut KvClient<Channel>, file: &Path) -> Result<(), Failure> {
    // The key list fixes the revision; every value is then read at that revision, so the
    // snapshot is one consistent state even while the fleet keeps writing.
    let keys = kv
        .range(v1::RangeRequest {
            keys_only: true,
            ..every_key()
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let revision = keys.header.as_ref().map_or(0, |h| h.revision);
    let names: Vec<Vec<u8>> = keys.kvs.into_iter().map(|kv| kv.key).collect();
    let fetches = futures::stream::iter(names.into_iter().map(|key| {
        let mut kv = kv.clone();
        async move {
            let r = kv
                .range(v1::RangeRequest {
                    key: key.clone(),
                    revision,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>((key, r.kvs.into_iter().next().map(|kv| kv.value)))
        }
    }))
    .buffered(FETCH_CONCURRENCY);
    tokio::pin!(fetches);
    let mut lines = Vec::new();
    while let Some(r) = fetches.next().await {
        let (key, value) = r.map_err(|s| ctx.explain(s))?;
        let value = value.ok_or_else(|| {
            (
                format!(
                    "key {} vanished at revision {revision}",
                    String::from_utf8_lossy(&key)
                ),
                1,
            )
        })?;
        lines.push(json!({"key": B64.encode(&key), "value": B64.encode(&value)}).to_string());
    }
    let mut hash = Sha256::new();
    for l in &lines {
        hash.update(l.as_bytes());
        hash.update(b"\n");
    }
    let header = json!({
        "format": FORMAT,
        "version": VERSION,
        "revision": revision,
        "keys": lines.len(),
        "hub": ctx.hub,
        "taken_at": jiff::Timestamp::now().to_string(),
    });
    let footer = json!({"sha256": hex(&hash.finalize())});
    let tmp = file.with_extension("partial");
    let write = || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(w, "{header}")?;
        for l in &lines {
            writeln!(w, "{l}")?;
        }
        writeln!(w, "{footer}")?;
        w.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, file)
    };
    write().map_err(|e| (format!("{}: {e}", file.display()), 1))?;
    println!(
        "saved {} keys at revision {revision} from {} to {}",
        lines.len(),
        ctx.hub,
        file.display()
    );
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A snapshot file read and checked whole.
/// A snapshot file's contents.
pub struct Loaded {
    /// The store revision it was taken at.
    pub revision: i64,
    /// Every key and value.
    pub kvs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn load(file: &Path) -> Result<Loaded, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    parse(std::io::BufReader::new(f))
}

/// Reads a snapshot file's lines: the header, every key, the footer with its checksum.
pub fn parse(reader: impl BufRead) -> Result<Loaded, String> {
    let mut lines = reader.lines();
    let mut next = |what: &str| -> Result<String, String> {
        match lines.next() {
            Some(Ok(l)) => Ok(l),
            Some(Err(e)) => Err(e.to_string()),
            None => Err(format!("the file ends before its {what}: truncated?")),
        }
    };
    let header: serde_json::Value =
        serde_json::from_str(&next("header")?).map_err(|e| format!("header: {e}"))?;
    if header["format"] != FORMAT {
        return Err(format!("not a {FORMAT} file (header: {header})"));
    }
    if header["version"].as_u64() != Some(VERSION) {
        return Err(format!(
            "format version {} (this flotctl reads {VERSION})",
            header["version"]
        ));
    }
    let count = header["keys"].as_u64().ok_or("header: no key count")? as usize;
    let revision = header["revision"].as_i64().unwrap_or(0);
    let mut hash = Sha256::new();
    // The count is the file's word: reserve no more than a modest start on it.
    let mut kvs = Vec::with_capacity(count.min(1 << 16));
    for i in 0..count {
        let l = next(&format!("key {} of {count}", i + 1))?;
        hash.update(l.as_bytes());
        hash.update(b"\n");
        let v: serde_json::Value =
            serde_json::from_str(&l).map_err(|e| format!("line {}: {e}", i + 2))?;
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let s = v[name]
                .as_str()
                .ok_or_else(|| format!("line {}: no {name}", i + 2))?;
            B64.decode(s)
                .map_err(|e| format!("line {}: {name}: {e}", i + 2))
        };
        kvs.push((field("key")?, field("value")?));
    }
    let footer: serde_json::Value =
        serde_json::from_str(&next("footer")?).map_err(|e| format!("footer: {e}"))?;
    let want = footer["sha256"].as_str().ok_or("footer: no sha256")?;
    if want != hex(&hash.finalize()) {
        return Err("sha256 mismatch: the file is damaged".into());
    }
    Ok(Loaded { revision, kvs })
}

async fn restore(ctx: &Ctx, kv: &mut KvClient<Channel>, file: &Path) -> Result<(), Failure> {
    let snap = load(file).map_err(|e| (format!("{}: {e}; nothing restored", file.display()), 2))?;
    // The hub's own audit log (which records this very call) does not make a store used.
    let held = kv
        .range(v1::RangeRequest {
            keys_only: true,
            ..every_key()
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner()
        .kvs
        .iter()
        .filter(|k| !k.key.starts_with(b"/audit/"))
        .count();
    if held > 0 {
        return Err((
            format!(
                "the store behind {} holds {held} keys; a restore goes into an empty store \
                 (a new hub cluster, or a hub on an unused etcd prefix); nothing restored",
                ctx.hub
            ),
            2,
        ));
    }
    let mut written = 0;
    let mut batch: Vec<&(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut bytes = 0;
    for (i, kv_pair) in snap.kvs.iter().enumerate() {
        batch.push(kv_pair);
        bytes += kv_pair.1.len();
        let last = i + 1 == snap.kvs.len();
        let full = batch.len() >= BATCH_KEYS
            || snap
                .kvs
                .get(i + 1)
                .is_some_and(|n| bytes + n.1.len() > BATCH_BYTES);
        if !(last || full) {
            continue;
        }
        write_batch(kv, &batch).await.map_err(|s| {
            let (msg, code) = ctx.explain(s);
            (
                format!(
                    "{msg}; {written} of {} keys were restored before this: empty the store \
                     before trying again",
                    snap.kvs.len()
                ),
                code,
            )
        })?;
        written += batch.len();
        batch.clear();
        bytes = 0;
    }
    println!(
        "restored {written} keys (snapshot revision {}) into the store behind {}",
        snap.revision, ctx.hub
    );
    Ok(())
}

/// Puts `batch` in one transaction that holds only if none of its keys exists yet.
async fn write_batch(
    kv: &mut KvClient<Channel>,
    batch: &[&(Vec<u8>, Vec<u8>)],
) -> Result<(), tonic::Status> {
    let compare = batch
        .iter()
        .map(|(k, _)| v1::Compare {
            key: k.clone(),
            target: v1::compare::Target::Version as i32,
            op: v1::compare::Op::Equal as i32,
            operand: Some(v1::compare::Operand::Version(0)),
        })
        .collect();
    let success = batch
        .iter()
        .map(|(k, v)| v1::RequestOp {
            request: Some(v1::request_op::Request::Put(v1::PutRequest {
                key: k.clone(),
                value: v.clone(),
                prev_kv: false,
            })),
        })
        .collect();
    let r = kv
        .txn(v1::TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        })
        .await?
        .into_inner();
    if !r.succeeded {
        return Err(tonic::Status::aborted(
            "a key being restored was written by someone else meanwhile",
        ));
    }
    Ok(())
}
