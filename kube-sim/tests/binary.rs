//! The `flotilla-kube-sim` binary: scenario errors, start-up line, kubeconfigs, control API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla-kube-sim");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 exchange (the control API is plain HTTP on loopback).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn bad_scenarios_fail_with_the_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, "clusters:\n  - name: a\n    pools:\n      - name: p\n        count: 1\n        colour: red\n").unwrap();
    let o = Command::new(BIN)
        .arg("--scenario")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("colour") && err.contains('6'), "{err}");

    std::fs::write(
        &f,
        "clusters:\n  - name: a\n    pools:\n      - name: p\n        count: 100000\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("--scenario")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("clusters[0].pools[0].count"), "{err}");
}

#[test]
fn serves_kubeconfigs_and_takes_faults_over_the_control_api() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("s.yaml");
    std::fs::write(
        &f,
        "clusters:\n  - name: one\n    pools:\n      - name: gpu\n        count: 1\n        \
         gpu: {vendor: nvidia, product: NVIDIA-L4, memory_mib: 23034, count: 4, family: ada-lovelace}\n",
    )
    .unwrap();
    let control = free_port();
    let kc_dir = dir.path().join("kc");
    let mut child = Command::new(BIN)
        .arg("--scenario")
        .arg(&f)
        .arg("--control")
        .arg(format!("127.0.0.1:{control}"))
        .arg("--kubeconfig-dir")
        .arg(&kc_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains("SIMULATED"),
        "start-up line must say it is a simulation: {first}"
    );
    // Wait for the control API line, which comes last.
    for line in lines.by_ref() {
        if line.unwrap().contains("control API") {
            break;
        }
    }
    let kubeconfig = std::fs::read_to_string(kc_dir.join("one.kubeconfig")).unwrap();
    assert!(
        kubeconfig.contains("server: https://127.0.0.1:") && kubeconfig.contains("token: "),
        "{kubeconfig}"
    );

    let (code, body) = http(control, "GET", "/v1/clusters", "");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"one\"") && body.contains("\"simulated\":true"),
        "{body}"
    );
    let (code, body) = http(
        control,
        "POST",
        "/v1/clusters/one/faults",
        r#"{"type":"api-latency","millis":5}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(
        control,
        "POST",
        "/v1/clusters/one/faults",
        r#"{"type":"node-not-ready","node":"nope"}"#,
    );
    assert_eq!(code, 404, "{body}");
    let (code, body) = http(
        control,
        "POST",
        "/v1/clusters/one/faults",
        r#"{"type":"meteor"}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("meteor"), "{body}");
    let (code, _) = http(control, "DELETE", "/v1/clusters/one/faults", "");
    assert_eq!(code, 200);
    let (code, _) = http(
        control,
        "POST",
        "/v1/clusters/two/faults",
        r#"{"type":"unreachable"}"#,
    );
    assert_eq!(code, 404);
    child.kill().unwrap();
    child.wait().unwrap();
}
