//! The fuzz targets' seed corpora (`fuzz/seeds/<target>/`) replayed on stable, every input
//! through the same entry point the target calls: hostile input must never panic, and the DNS
//! handler's answers must keep their rules. A crash `cargo fuzz` finds is added to the seeds
//! (`crash-*`), so it stays fixed. A few seeds are also checked for the answer they should get, so
//! the corpus keeps reaching past the first parser.

use std::path::PathBuf;
use std::sync::Arc;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{}: an empty corpus", dir.display());
    out
}

#[test]
fn dns_query_corpus() {
    let zones = Arc::new(flotilla_dns::Zones::new(Some("fleet.example.com")).unwrap());
    let table = flotilla_dns::follow::empty_table();
    for (name, data) in corpus("dns_query") {
        let r =
            std::panic::catch_unwind(|| flotilla_dns::server::fuzz_datagram(&table, &zones, &data));
        assert!(r.is_ok(), "dns_query/{name}");
    }
}

#[test]
fn agent_message_corpus() {
    for (name, data) in corpus("agent_message") {
        let r = std::panic::catch_unwind(|| flotilla_api::fuzzing::agent_message(&data));
        assert!(r.is_ok(), "agent_message/{name}");
    }
}

#[test]
fn campaign_spec_corpus() {
    for (name, data) in corpus("campaign_spec") {
        let r = std::panic::catch_unwind(|| flotilla_api::fuzzing::campaign_spec(&data));
        assert!(r.is_ok(), "campaign_spec/{name}");
    }
    let dev = corpus("campaign_spec")
        .into_iter()
        .find(|(n, _)| n == "dev.json")
        .unwrap()
        .1;
    flotilla_core::campaign::spec::parse_json(std::str::from_utf8(&dev).unwrap())
        .expect("the dev campaign seed is a valid spec");
}

#[test]
fn routing_policy_corpus() {
    for (name, data) in corpus("routing_policy") {
        let r = std::panic::catch_unwind(|| flotilla_api::fuzzing::routing_policy(&data));
        assert!(r.is_ok(), "routing_policy/{name}");
    }
}

#[test]
fn snapshot_file_corpus() {
    for (name, data) in corpus("snapshot_file") {
        let r = std::panic::catch_unwind(|| flotctl::commands::store::parse(data.as_slice()));
        assert!(r.is_ok(), "snapshot_file/{name}");
        let parsed = r.unwrap();
        match name.as_str() {
            "one_key" => assert_eq!(parsed.map(|l| l.kvs.len()), Ok(1)),
            _ => assert!(parsed.is_err(), "snapshot_file/{name} was accepted"),
        }
    }
}
