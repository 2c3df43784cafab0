use super::*;

fn raw(json: &str) -> RawSpec {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

const MINIMAL: &str = r#"{
  "name": "driver-550",
  "pool": {"name": "gpu-a100"},
  "green": {"clusterApi": {"version": "v1.31.2"}},
  "stages": [{"name": "all"}]
}"#;

#[test]
fn defaults_follow_the_peers() {
    let s = raw(MINIMAL).validate().unwrap();
    assert_eq!(s.surge, Amount::Percent(100));
    assert_eq!(s.batch, Amount::Percent(10));
    assert_eq!(s.batch_soak, Duration::from_secs(15 * 60));
    assert_eq!(s.final_soak, Duration::from_secs(3600));
    assert_eq!(s.drain.timeout_per_node, Duration::from_secs(30 * 60));
    assert_eq!(s.drain.on_undrainable, OnUndrainable::Pause);
    assert!(s.drain.ignore_daemon_sets);
    assert!(!s.drain.delete_empty_dir_data && !s.drain.force);
    assert_eq!(s.stages[0].max_concurrency, Amount::Count(1));
    assert_eq!(s.failure_budget_per_stage, Amount::Count(0));
    assert_eq!(s.failure_budget_per_campaign, None);
    assert!(!s.traffic_shift);
    assert_eq!(s.health.green_gpu_allocatable_percent, 100);
    assert_eq!(s.unreachable_timeout, Duration::from_secs(5 * 60));
}

#[test]
fn amounts_round_as_documented() {
    // (amount, total, rounding, expected)
    let cases = [
        (Amount::Percent(10), 10, Round::Up, 1),
        (Amount::Percent(10), 11, Round::Up, 2),
        (Amount::Percent(10), 11, Round::Down, 1),
        (Amount::Percent(50), 3, Round::Down, 1),
        (Amount::Percent(50), 3, Round::Up, 2),
        (Amount::Percent(1), 50, Round::Down, 0),
        (Amount::Percent(100), 7, Round::Up, 7),
        (Amount::Count(3), 100, Round::Up, 3),
    ];
    for (a, total, round, want) in cases {
        assert_eq!(a.of(total, round), want, "{a:?} of {total} {round:?}");
    }
    let s = raw(MINIMAL).validate().unwrap();
    // Batches: 10% of blue, rounded up, at least 1, at most the pool.
    assert_eq!(s.batch_size(10), 1);
    assert_eq!(s.batch_size(25), 3);
    assert_eq!(s.batch_size(0), 1);
    // Surge: 100% of blue.
    assert_eq!(s.surge_nodes(10), 10);
}

#[test]
fn amounts_parse_counts_and_percentages() {
    let ok = [
        (RawAmount::Number(3), Amount::Count(3)),
        (RawAmount::Text("3".into()), Amount::Count(3)),
        (RawAmount::Text("25%".into()), Amount::Percent(25)),
        (RawAmount::Text(" 100% ".into()), Amount::Percent(100)),
    ];
    for (r, want) in ok {
        assert_eq!(Amount::parse("x", &r), Ok(want), "{r:?}");
    }
    for bad in ["101%", "ten", "-1", "5 nodes", "%"] {
        let e = Amount::parse("surge", &RawAmount::Text(bad.into())).unwrap_err();
        assert_eq!(e.field, "surge", "{bad}");
    }
}

#[test]
fn a_full_spec_validates() {
    let s = raw(
        r#"{
      "name": "k8s-131",
      "pool": {"machineDeployment": "gpu-a100"},
      "green": {"clusterApi": {"template": {"infrastructureRef": {"name": "gpu-a100-v2"}}}},
      "surge": "25%",
      "stages": [
        {"name": "canary", "clusters": {"matchLabels": {"ring": "canary"}},
         "afterGates": ["approval", {"wait": "10m"}]},
        {"name": "rest", "sortBy": "region", "maxConcurrency": "50%",
         "beforeGates": [{"approval": {"name": "go-rest"}}],
         "afterGates": [{"healthy": {"duration": "5m", "name": "settled"}}]}
      ],
      "blueGreen": {"batch": 2, "batchSoak": "0s", "finalSoak": "0s",
        "onUndrainable": "forceAfter(10m)", "gracePeriod": "30s",
        "podRules": [
          {"selector": {"matchLabels": {"app": "trainer"}}, "action": "waitCompleted", "deadline": "2h"},
          {"selector": {"matchLabels": {"app": "cache"}}, "action": "skip"}]},
      "trafficShift": true,
      "healthGates": {"endpointsReadyPercent": 90},
      "failureBudget": {"perStage": 1, "perCampaign": "10%"}
    }"#,
    )
    .validate()
    .unwrap();
    assert_eq!(s.surge, Amount::Percent(25));
    assert_eq!(s.stages[1].max_concurrency, Amount::Percent(50));
    assert_eq!(
        s.stages[0].after_gates,
        vec![
            Gate {
                name: "canary-after-0".into(),
                kind: GateKind::Approval
            },
            Gate {
                name: "canary-after-1".into(),
                kind: GateKind::Wait(Duration::from_secs(600))
            },
        ]
    );
    assert_eq!(s.stages[1].before_gates[0].name, "go-rest");
    assert_eq!(
        s.stages[1].after_gates[0].kind,
        GateKind::Healthy(Duration::from_secs(300))
    );
    assert_eq!(
        s.drain.on_undrainable,
        OnUndrainable::ForceAfter(Duration::from_secs(600))
    );
    assert_eq!(
        s.drain.pod_rules[0].action,
        PodAction::WaitCompleted(Duration::from_secs(7200))
    );
    assert_eq!(s.drain.pod_rules[1].action, PodAction::Skip);
    assert_eq!(s.gate("go-rest").map(|(i, _)| i), Some(1));
    assert_eq!(s.failure_budget_per_campaign, Some(Amount::Percent(10)));
}

/// Each case: a JSON merge onto MINIMAL, and the field the error must name.
#[test]
fn errors_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (r#"{"name": "Driver_550"}"#, "name"),
        (r#"{"unreachableTimeout": "soon"}"#, "unreachableTimeout"),
        (r#"{"pool": {}}"#, "pool"),
        (
            r#"{"pool": {"name": "a", "machineDeployment": "b"}}"#,
            "pool",
        ),
        (r#"{"pool": {"nodeSelector": {}}}"#, "pool.nodeSelector"),
        (
            r#"{"pool": {"machineDeployment": "Not a name"}}"#,
            "pool.machineDeployment",
        ),
        (r#"{"green": {}}"#, "green"),
        (r#"{"green": {"clusterApi": {}}}"#, "green.clusterApi"),
        (
            r#"{"green": {"clusterApi": {"template": 3}}}"#,
            "green.clusterApi.template",
        ),
        (
            r#"{"green": {"external": {"nodeSelector": {}}}}"#,
            "green.external.nodeSelector",
        ),
        (r#"{"surge": 0}"#, "surge"),
        (r#"{"surge": "150%"}"#, "surge"),
        (r#"{"stages": []}"#, "stages"),
        (
            r#"{"stages": [{"name": "a"}, {"name": "a"}]}"#,
            "stages[1].name",
        ),
        (
            r#"{"stages": [{"name": "a", "maxConcurrency": 0}]}"#,
            "stages[0].maxConcurrency",
        ),
        (
            r#"{"stages": [{"name": "a", "beforeGates": ["aproval"]}]}"#,
            "stages[0].beforeGates[0]",
        ),
        (
            r#"{"stages": [{"name": "a", "afterGates": ["wait"]}]}"#,
            "stages[0].afterGates[0].wait",
        ),
        (
            r#"{"stages": [{"name": "a", "afterGates": [{"wait": "soon"}]}]}"#,
            "stages[0].afterGates[0].wait",
        ),
        (
            r#"{"stages": [{"name": "a", "afterGates": [{"approval": {"name": "x"}}]},
                           {"name": "b", "beforeGates": [{"approval": {"name": "x"}}]}]}"#,
            "stages[1].beforeGates[0].name",
        ),
        (
            r#"{"stages": [{"name": "a", "clusters": {"matchExpressions": [{"key": "r", "operator": "In"}]}}]}"#,
            "stages[0].clusters.matchExpressions[0].values",
        ),
        (r#"{"blueGreen": {"batch": "0%"}}"#, "blueGreen.batch"),
        (
            r#"{"blueGreen": {"drainTimeoutPerNode": "0s"}}"#,
            "blueGreen.drainTimeoutPerNode",
        ),
        (
            r#"{"blueGreen": {"finalSoak": "90d"}}"#,
            "blueGreen.finalSoak",
        ),
        (
            r#"{"blueGreen": {"finalSoak": "900h"}}"#,
            "blueGreen.finalSoak",
        ),
        (
            r#"{"blueGreen": {"onUndrainable": "force"}}"#,
            "blueGreen.onUndrainable",
        ),
        (
            r#"{"blueGreen": {"maxBlockedNodes": 2}}"#,
            "blueGreen.maxBlockedNodes",
        ),
        (
            r#"{"blueGreen": {"podRules": [{"selector": {}, "action": "waitCompleted"}]}}"#,
            "blueGreen.podRules[0].deadline",
        ),
        (
            r#"{"blueGreen": {"podRules": [{"selector": {}, "action": "evict"}]}}"#,
            "blueGreen.podRules[0].action",
        ),
        (
            r#"{"healthGates": {"endpointsReadyPercent": 120}}"#,
            "healthGates.endpointsReadyPercent",
        ),
        (
            r#"{"failureBudget": {"perStage": "x"}}"#,
            "failureBudget.perStage",
        ),
    ];
    for (patch, field) in cases {
        let mut v: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        let p: serde_json::Value = serde_json::from_str(patch).unwrap();
        for (k, val) in p.as_object().unwrap() {
            v[k] = val.clone();
        }
        let spec: RawSpec = serde_json::from_value(v).unwrap_or_else(|e| panic!("{patch}: {e}"));
        let e = spec.validate().expect_err(patch);
        assert_eq!(e.field, *field, "{patch}: {e}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let mut v: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
    v["blueGreen"] = serde_json::json!({"batchSize": 2});
    let e = serde_json::from_value::<RawSpec>(v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batchSize"), "{e}");
}

#[test]
fn structural_errors_name_their_path() {
    let text = MINIMAL.replace(r#""stages""#, r#""blueGreen": {"batchSize": 2}, "stages""#);
    let e = parse_json(&text).unwrap_err();
    assert_eq!(e.field, "blueGreen.batchSize", "{e}");
    let e = parse_json(&MINIMAL.replace(r#""name": "all""#, r#""name": 3"#)).unwrap_err();
    assert_eq!(e.field, "stages[0].name", "{e}");
    assert!(parse_json(MINIMAL).is_ok());
}
