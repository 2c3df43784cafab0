//! `flotilla-failover-bench`: how available the replicated store stays when its leader fails,
//! with three `flotilla-hub` members as processes on loopback.
//!
//! Writers keep one `StoreClient` (all three endpoints) busy. Each round kills (SIGKILL) or
//! pauses (SIGSTOP) the current leader and measures how long until a write that *started
//! after* the fault succeeds. A killed member is restarted with its original flags and timed
//! until it serves a linearizable read itself; a paused one is resumed after `--pause-seconds`.
//! A last phase restarts a member while its `--join` target is down.
//!
//!     cargo build --release -p flotilla-hub
//!     ./target/release/flotilla-failover-bench --rounds 10

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_api::v1;
use flotilla_core::kv::{KvBackend, TxnRequest};
use flotilla_raft_store::client::StoreClient;
use procs::{Procs, member_command, start_members, status, wait_for};
use tokio::sync::Mutex;

#[derive(Parser, Debug)]
#[command(about = "Store availability under leader kills and pauses (3 members on loopback)")]
struct Args {
    /// Fault rounds, alternating kill and pause of the leader.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 10)]
    rounds: usize,
    /// Concurrent writers.
    #[arg(long, env = "BENCH_WRITERS", default_value_t = 16)]
    writers: usize,
    /// How long a paused leader stays paused, in seconds.
    #[arg(long, env = "BENCH_PAUSE_SECONDS", default_value_t = 5)]
    pause_seconds: u64,
    /// Successful writes before the first fault (they grow the log a restart re-applies).
    #[arg(long, env = "BENCH_PRELOAD", default_value_t = 20_000)]
    preload: u64,
}

/// Successful writes as (start, end) in microseconds since the benchmark began.
type Log = Arc<Mutex<Vec<(u64, u64)>>>;

fn micros(origin: Instant, t: Instant) -> u64 {
    t.duration_since(origin).as_micros() as u64
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .context("run kill")?;
    if !ok.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

async fn leader(ports: &[u16], up: &[bool]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, p) in ports.iter().enumerate() {
            if up[i]
                && let Some(s) = status(*p).await
                && s.role == "leader"
            {
                return Ok(i + 1);
            }
        }
        if Instant::now() > deadline {
            bail!("no leader within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The earliest success among writes that started at or after `at`, waited for up to 60 s.
async fn first_write_after(log: &Log, origin: Instant, at: Instant) -> anyhow::Result<Duration> {
    let at_us = micros(origin, at);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let best = log
            .lock()
            .await
            .iter()
            .filter(|(s, _)| *s >= at_us)
            .map(|(_, e)| *e)
            .min();
        if let Some(e) = best {
            return Ok(Duration::from_micros(e - at_us));
        }
        if Instant::now() > deadline {
            bail!("no write succeeded within 60 s of the fault");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Time from `since` until the member on `port` answers a linearizable read (as any client
/// would send it: a follower forwards it to the leader).
async fn serving(port: u16, since: Instant) -> anyhow::Result<Duration> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(ch) = endpoint.connect().await {
            let mut kv = v1::kv_client::KvClient::new(ch);
            let mut r = tonic::Request::new(v1::RangeRequest {
                key: b"/probe".to_vec(),
                ..Default::default()
            });
            r.set_timeout(Duration::from_millis(500));
            if kv.range(r).await.is_ok() {
                return Ok(since.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("member on port {port} did not serve within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn summary(name: &str, xs: &mut [Duration]) {
    if xs.is_empty() {
        return;
    }
    xs.sort();
    println!(
        "{name}: median {:.2} s, max {:.2} s over {} ({})",
        xs[xs.len() / 2].as_secs_f64(),
        xs[xs.len() - 1].as_secs_f64(),
        xs.len(),
        xs.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (mut procs, ports, bin): (Procs, Vec<u16>, _) = start_members(dir.path(), 3).await?;
    let mut up = vec![true; 3];
    println!(
        "machine: {} cores; 3 members; {} writers; pause {} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.writers,
        args.pause_seconds
    );
    let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let client = StoreClient::new(&endpoints)?;
    let origin = Instant::now();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let (client, log, stop, written) =
            (client.clone(), log.clone(), stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/bench/{w}/{}", i % 1000);
                i += 1;
                let start = Instant::now();
                if client
                    .txn(TxnRequest::put(key, vec![0u8; 256]))
                    .await
                    .is_ok()
                {
                    let end = Instant::now();
                    log.lock()
                        .await
                        .push((micros(origin, start), micros(origin, end)));
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    wait_for("the preload", || async {
        written.load(Ordering::Relaxed) >= args.preload
    })
    .await?;

    let (mut kills, mut pauses, mut restarts) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let l = leader(&ports, &up).await?;
        let pid = procs.0[l - 1].id();
        let before = status(ports[l - 1]).await.context("leader status")?;
        let log_len = before.last_log_index.saturating_sub(before.snapshot_index);
        let at = Instant::now();
        if round % 2 == 0 {
            signal(pid, "-KILL")?;
            let _ = procs.0[l - 1].wait();
            up[l - 1] = false;
            let recovered = first_write_after(&log, origin, at).await?;
            let spawned = Instant::now();
            procs.0[l - 1] = member_command(&bin, dir.path(), &ports, l)
                .spawn()
                .context("restart member")?;
            up[l - 1] = true;
            let served = serving(ports[l - 1], spawned).await?;
            println!(
                "round {round}: kill leader {l}: writes again after {:.2} s; restarted ({log_len} log entries since its snapshot), serving after {:.2} s",
                recovered.as_secs_f64(),
                served.as_secs_f64()
            );
            kills.push(recovered);
            restarts.push(served);
        } else {
            signal(pid, "-STOP")?;
            let recovered = first_write_after(&log, origin, at).await?;
            tokio::time::sleep(
                Duration::from_secs(args.pause_seconds).saturating_sub(at.elapsed()),
            )
            .await;
            signal(pid, "-CONT")?;
            println!(
                "round {round}: pause leader {l} for {} s: writes again after {:.2} s",
                args.pause_seconds,
                recovered.as_secs_f64()
            );
            pauses.push(recovered);
        }
        // Settle: every member answers, then a second of normal load.
        wait_for("every member", || async {
            for p in &ports {
                if status(*p).await.is_none() {
                    return false;
                }
            }
            true
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // A member restarted with its original flags while its --join target (member 1) is down:
    // member 1 goes, a leader is elected among 2 and 3, the other one is killed and restarted
    // (its `--join` names member 1), and is timed until it serves again.
    signal(procs.0[0].id(), "-KILL")?;
    let _ = procs.0[0].wait();
    up[0] = false;
    let l = leader(&ports, &up).await?;
    let f = if l == 2 { 3 } else { 2 };
    signal(procs.0[f - 1].id(), "-KILL")?;
    let _ = procs.0[f - 1].wait();
    let spawned = Instant::now();
    procs.0[f - 1] = member_command(&bin, dir.path(), &ports, f)
        .spawn()
        .context("restart the member")?;
    let join_down = serving(ports[f - 1], spawned).await?;
    println!(
        "join target down: member {f} restarted with --join pointing at member 1 (down), serving after {:.2} s",
        join_down.as_secs_f64()
    );
    procs.0[0] = member_command(&bin, dir.path(), &ports, 1)
        .spawn()
        .context("restart member 1")?;

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    println!(
        "writes: {} acknowledged in {:.0} s",
        written.load(Ordering::Relaxed),
        origin.elapsed().as_secs_f64()
    );
    summary("leader kill -> writes again", &mut kills);
    summary("leader pause -> writes again", &mut pauses);
    summary("killed leader restart -> serving", &mut restarts);
    Ok(())
}
