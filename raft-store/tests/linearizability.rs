//! Linearizability under faults: concurrent clients run put / get / compare-and-swap on a few
//! keys while a seeded nemesis partitions, isolates, delays, kills and restarts members. Each
//! recorded history is checked with `flotilla_core::lincheck` (Wing & Gong with memoization).
//!
//! `cargo test` runs one short schedule; `FLOTILLA_LINCHECK_SCHEDULES=N` runs N seeds
//! (and `FLOTILLA_LINCHECK_SEED=S` starts from seed S).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, fast_tuning};
use flotilla_core::kv::{Compare, KeyRange, KvBackend, KvError, Op, RangeRequest, TxnRequest};
use flotilla_core::lincheck::{self, HistoryOp, RegOp, RegRet};
use flotilla_raft_store::client::StoreClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: [&str; 3] = ["/lin/a", "/lin/b", "/lin/c"];

fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

async fn client_loop(
    id: u64,
    seed: u64,
    client: StoreClient,
    ops: usize,
    start: Instant,
    history: Arc<Mutex<Vec<HistoryOp>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = || start.elapsed().as_nanos() as u64;
    for seq in 0..ops as u64 {
        let key = KEYS[rng.random_range(0..KEYS.len())];
        let value = id * 1_000_000 + seq;
        let call = now();
        let (op, outcome): (RegOp, Result<RegRet, KvError>) = match rng.random_range(0..3) {
            0 => {
                let r = client
                    .txn(TxnRequest::put(key, value.to_string()))
                    .await
                    .map(|_| RegRet::Ok);
                (RegOp::Put(value), r)
            }
            1 => {
                let r = client.range(RangeRequest::new(KeyRange::key(key))).await;
                (
                    RegOp::Get,
                    r.map(|r| RegRet::Value(r.kvs.first().map(|kv| parse(&kv.value)))),
                )
            }
            _ => {
                // Expect either absence or a recently written value, so some CAS succeed.
                let expected = if rng.random_bool(0.2) {
                    None
                } else {
                    Some(
                        rng.random_range(1..=id.max(1)) * 1_000_000
                            + seq.saturating_sub(rng.random_range(0..3)),
                    )
                };
                let compare = match expected {
                    None => Compare::exists(key, false),
                    Some(e) => Compare::value(key, e.to_string()),
                };
                let t = TxnRequest {
                    compare: vec![compare],
                    success: vec![Op::put(key, value.to_string())],
                    failure: vec![],
                };
                let r = client.txn(t).await.map(|r| RegRet::CasResult(r.succeeded));
                (
                    RegOp::Cas {
                        expected,
                        new: value,
                    },
                    r,
                )
            }
        };
        let ret = now();
        let entry = match outcome {
            Ok(result) => Some(HistoryOp {
                key: key.into(),
                call,
                ret: Some(ret),
                op,
                result: Some(result),
            }),
            // Unknown: it may have happened at any time after the call, or never.
            Err(KvError::OutcomeUnknown(_)) => Some(HistoryOp {
                key: key.into(),
                call,
                ret: None,
                op,
                result: None,
            }),
            // The server said it was not applied (or it was a read): no effect to account for.
            Err(_) => None,
        };
        if let Some(e) = entry {
            history.lock().unwrap().push(e);
        }
    }
}

async fn nemesis(
    cluster: &mut Cluster,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut log = Vec::new();
    let ids = cluster.ids();
    let mut dead: Option<u64> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..500))).await;
        match rng.random_range(0..5) {
            0 => {
                let n = ids[rng.random_range(0..ids.len())];
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != n).collect();
                cluster.faults.isolate(n, &others);
                log.push(format!("isolate {n}"));
            }
            1 => {
                cluster.faults.heal();
                log.push("heal".into());
            }
            2 => {
                let d = Duration::from_millis(rng.random_range(0..20));
                cluster.faults.set_delay(d);
                log.push(format!("delay {d:?}"));
            }
            3 if dead.is_none() => {
                let n = ids[rng.random_range(0..ids.len())];
                cluster.kill(n).await;
                dead = Some(n);
                log.push(format!("kill {n}"));
            }
            _ => {
                if let Some(n) = dead.take() {
                    cluster.restart(n).await;
                    log.push(format!("restart {n}"));
                }
            }
        }
    }
    cluster.faults.heal();
    if let Some(n) = dead.take() {
        cluster.restart(n).await;
    }
    log
}

async fn run_schedule(seed: u64, clients: u64, ops: usize) {
    let mut cluster = Cluster::start(3, fast_tuning()).await;
    cluster.leader().await;
    let addrs: Vec<String> = cluster.addrs.iter().map(|a| a.to_string()).collect();
    let history = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for id in 1..=clients {
        // Each client prefers a different member first.
        let mut mine = addrs.clone();
        mine.rotate_left(id as usize % addrs.len());
        let client = StoreClient::new(&mine)
            .unwrap()
            .with_timeout(Duration::from_secs(3))
            .with_max_retries(4);
        tasks.push(tokio::spawn(client_loop(
            id,
            seed * 1000 + id,
            client,
            ops,
            start,
            history.clone(),
        )));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = {
        let stop = stop.clone();
        tokio::spawn(async move {
            for t in tasks {
                t.await.unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let faults = nemesis(&mut cluster, seed, stop).await;
    done.await.unwrap();
    let history = history.lock().unwrap().clone();
    let known = history.iter().filter(|h| h.ret.is_some()).count();
    println!(
        "seed {seed}: {} operations recorded ({known} with known outcome); faults: {faults:?}",
        history.len()
    );
    assert!(known > 0, "seed {seed}: some operations completed");
    if let Err(e) = lincheck::check(&history) {
        panic!("seed {seed}: {e}; faults: {faults:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_under_faults_are_linearizable() {
    let schedules: u64 = std::env::var("FLOTILLA_LINCHECK_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let first: u64 = std::env::var("FLOTILLA_LINCHECK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ops = if schedules > 1 { 150 } else { 80 };
    for seed in first..first + schedules {
        run_schedule(seed, 4, ops).await;
    }
}
