//! The agent's side of one hub stream after the welcome, as a pure state machine: what the
//! cluster looks like now, a timer, a step status or a message from the hub goes in; what to
//! send, apply or end comes out. It holds what the hub was last sent, so only changes go.
//! [`crate::session`] reads the caches and does the I/O; the table tests below cover every
//! input.

use std::collections::BTreeMap;

use flotilla_api::convert::kv::LEADER_HINT_KEY;
use flotilla_api::v1;
use flotilla_core::report::{self, Digest};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The hub rejected the agent for good (bad token, bad name): retrying will not help.
    #[error("the hub refused this agent: {0}")]
    Refused(tonic::Status),
    /// Transport or hub trouble; the agent retries.
    #[error("hub session failed: {0}")]
    Retry(String),
    /// The replica could not be dialled; the agent tries another.
    #[error("cannot connect: {0}")]
    Unreachable(String),
    /// A live replica does not lead (and names the leader, if it knows one).
    #[error("not the leader ({message}); leader: {hint:?}")]
    NotLeader {
        /// The leader's address, from the replica.
        hint: Option<String>,
        /// The replica's message.
        message: String,
    },
}

/// What a hub's error status means for the agent.
pub fn classify(s: tonic::Status) -> SessionError {
    match s.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument => SessionError::Refused(s),
        tonic::Code::Unavailable => SessionError::NotLeader {
            hint: s
                .metadata()
                .get(LEADER_HINT_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            message: s.message().to_string(),
        },
        _ => SessionError::Retry(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// The cluster's nodes now, as sent: wire records and their digests by name, and the health
/// signals.
#[derive(Debug, Clone, Default)]
pub struct Now {
    /// Nodes by name.
    pub nodes: BTreeMap<String, v1::NodeInventory>,
    /// Their digests.
    pub digests: BTreeMap<String, Digest>,
    /// Health signals.
    pub signals: v1::HealthSignals,
}

impl Now {
    /// From the nodes and signals (digests computed).
    pub fn new(nodes: BTreeMap<String, v1::NodeInventory>, signals: v1::HealthSignals) -> Self {
        use prost::Message;
        let digests = nodes
            .iter()
            .map(|(name, n)| (name.clone(), report::digest(&n.encode_to_vec())))
            .collect();
        Self {
            nodes,
            digests,
            signals,
        }
    }
}

/// Exports by `namespace/name`, as sent.
pub type Exports = BTreeMap<String, v1::ServiceExport>;

/// What the session knows when the welcome arrives.
#[derive(Debug, Default)]
pub struct Opening {
    /// The digests the hub holds (from the welcome).
    pub held: BTreeMap<String, Digest>,
    /// The cluster now.
    pub now: Now,
    /// The exports now, when exports are watched.
    pub exports: Option<Exports>,
    /// The pod networks now.
    pub networks: Vec<String>,
    /// The namespaces to import for, when listed.
    pub namespaces: Option<Vec<String>>,
}

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// The cluster's nodes and signals now (after a watch change or a start-up deadline).
    Inventory(Now),
    /// The pod networks now.
    Networks(Vec<String>),
    /// The heartbeat timer, with the signals now.
    Tick(v1::HealthSignals),
    /// The exports now.
    Exports(Exports),
    /// The namespaces to import for.
    Namespaces(Vec<String>),
    /// A new inference load sample.
    Loads(v1::InferenceLoads),
    /// A campaign step's status.
    StepStatus(v1::StepStatusReport),
    /// Time to renew the certificate: this CSR (DER) asks for it.
    Renew(Vec<u8>),
    /// What the hub sent (`Ok(None)`: it closed the stream).
    Hub(Result<Option<v1::HubMessage>, tonic::Status>),
}

/// What the session does, in order.
#[derive(Debug)]
pub enum Action {
    /// Send to the hub.
    Send(v1::AgentMessage),
    /// Hand the hub's export status to the status writer.
    ApplyStatus(v1::ExportStatuses),
    /// Hand a campaign step to the runner.
    Submit(v1::StepCommand),
    /// Apply an imports update.
    ApplyImports(v1::ImportsUpdate),
    /// Keep a certificate the hub signed.
    Certificate(v1::IssuedCertificate),
    /// End the session.
    End(SessionError),
}

/// What the hub was last sent.
#[derive(Debug)]
pub struct Machine {
    sent: BTreeMap<String, Digest>,
    signals: v1::HealthSignals,
    exports: Exports,
    networks: Vec<String>,
}

fn msg(m: v1::agent_message::Msg) -> Action {
    Action::Send(v1::AgentMessage { msg: Some(m) })
}

/// The nodes to upsert and the names to remove to go from `held` to `now`.
fn delta_lists(
    held: &BTreeMap<String, Digest>,
    now: &Now,
) -> (Vec<v1::NodeInventory>, Vec<String>) {
    let d = report::delta(held, &now.digests);
    (
        d.upsert.iter().map(|n| now.nodes[*n].clone()).collect(),
        d.remove.iter().map(|n| n.to_string()).collect(),
    )
}

impl Machine {
    /// The session's first messages: only what the hub does not hold (a snapshot when it holds
    /// nothing), every export once (the hub writes only what differs), the networks, and the
    /// namespaces when listed.
    pub fn open(o: Opening) -> (Self, Vec<Action>) {
        use v1::agent_message::Msg;
        let (upsert, remove) = delta_lists(&o.held, &o.now);
        let signals = Some(o.now.signals.clone());
        let mut out = vec![if o.held.is_empty() {
            msg(Msg::Snapshot(v1::InventorySnapshot {
                nodes: upsert,
                signals,
            }))
        } else {
            msg(Msg::Delta(v1::InventoryDelta {
                upsert,
                remove,
                signals,
            }))
        }];
        if let Some(x) = &o.exports {
            out.push(msg(Msg::Exports(v1::ExportsSnapshot {
                exports: x.values().cloned().collect(),
            })));
        }
        out.push(msg(Msg::Networks(v1::Networks {
            cidrs: o.networks.clone(),
        })));
        if let Some(names) = o.namespaces {
            out.push(msg(Msg::ImportNamespaces(v1::ImportNamespaces { names })));
        }
        let m = Self {
            sent: o.now.digests,
            signals: o.now.signals,
            exports: o.exports.unwrap_or_default(),
            networks: o.networks,
        };
        (m, out)
    }

    /// The actions for `input`.
    pub fn on(&mut self, input: Input) -> Vec<Action> {
        use v1::agent_message::Msg;
        match input {
            Input::Inventory(now) => {
                let (upsert, remove) = delta_lists(&self.sent, &now);
                if upsert.is_empty() && remove.is_empty() && now.signals == self.signals {
                    return Vec::new();
                }
                self.sent = now.digests;
                self.signals = now.signals.clone();
                vec![msg(Msg::Delta(v1::InventoryDelta {
                    upsert,
                    remove,
                    signals: Some(now.signals),
                }))]
            }
            Input::Networks(cidrs) => {
                if cidrs == self.networks {
                    return Vec::new();
                }
                self.networks = cidrs.clone();
                vec![msg(Msg::Networks(v1::Networks { cidrs }))]
            }
            Input::Tick(signals) => {
                self.signals = signals.clone();
                vec![msg(Msg::Heartbeat(v1::Heartbeat {
                    signals: Some(signals),
                }))]
            }
            Input::Exports(now) => {
                let upsert: Vec<v1::ServiceExport> = now
                    .iter()
                    .filter(|(k, v)| self.exports.get(*k) != Some(*v))
                    .map(|(_, v)| v.clone())
                    .collect();
                let remove: Vec<String> = self
                    .exports
                    .keys()
                    .filter(|k| !now.contains_key(*k))
                    .cloned()
                    .collect();
                if upsert.is_empty() && remove.is_empty() {
                    return Vec::new();
                }
                self.exports = now;
                vec![msg(Msg::ExportsDelta(v1::ExportsDelta { upsert, remove }))]
            }
            Input::Namespaces(names) => {
                vec![msg(Msg::ImportNamespaces(v1::ImportNamespaces { names }))]
            }
            Input::Loads(l) => vec![msg(Msg::Loads(l))],
            Input::StepStatus(r) => vec![msg(Msg::StepStatus(r))],
            Input::Renew(csr) => vec![msg(Msg::Renew(v1::RenewCertificate { csr }))],
            Input::Hub(Ok(Some(m))) => {
                use v1::hub_message::Msg as Hub;
                match m.msg {
                    Some(Hub::ExportStatus(s)) => vec![Action::ApplyStatus(s)],
                    Some(Hub::Command(c)) => vec![Action::Submit(c)],
                    Some(Hub::Imports(u)) => vec![Action::ApplyImports(u)],
                    Some(Hub::Certificate(c)) => vec![Action::Certificate(c)],
                    // Acks, and anything newer than this agent.
                    _ => Vec::new(),
                }
            }
            Input::Hub(Ok(None)) => vec![Action::End(SessionError::Retry(
                "the hub closed the stream".into(),
            ))],
            Input::Hub(Err(s)) => vec![Action::End(classify(s))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, gpus: i64) -> v1::NodeInventory {
        v1::NodeInventory {
            name: name.into(),
            physical_gpus: gpus,
            ..Default::default()
        }
    }

    fn now(nodes: &[(&str, i64)], not_ready: u32) -> Now {
        Now::new(
            nodes
                .iter()
                .map(|(n, g)| (n.to_string(), node(n, *g)))
                .collect(),
            v1::HealthSignals {
                nodes_not_ready: not_ready,
                ..Default::default()
            },
        )
    }

    fn export(name: &str, port: u32) -> (String, v1::ServiceExport) {
        (
            format!("ml/{name}"),
            v1::ServiceExport {
                namespace: "ml".into(),
                name: name.into(),
                ports: vec![v1::ServicePort {
                    port,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    }

    /// An action as a short line, so tables read as the protocol does.
    fn show(a: &Action) -> String {
        use v1::agent_message::Msg;
        match a {
            Action::Send(m) => match &m.msg {
                Some(Msg::Snapshot(s)) => format!("snapshot {}", s.nodes.len()),
                Some(Msg::Delta(d)) => format!(
                    "delta +{:?} -{:?} not_ready={}",
                    d.upsert.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
                    d.remove,
                    d.signals.as_ref().map_or(0, |s| s.nodes_not_ready)
                ),
                Some(Msg::Heartbeat(h)) => format!(
                    "heartbeat not_ready={}",
                    h.signals.as_ref().map_or(0, |s| s.nodes_not_ready)
                ),
                Some(Msg::Exports(x)) => format!("exports {}", x.exports.len()),
                Some(Msg::ExportsDelta(d)) => format!(
                    "exports delta +{:?} -{:?}",
                    d.upsert.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
                    d.remove
                ),
                Some(Msg::Networks(n)) => format!("networks {:?}", n.cidrs),
                Some(Msg::ImportNamespaces(n)) => format!("namespaces {:?}", n.names),
                Some(Msg::Loads(_)) => "loads".into(),
                Some(Msg::StepStatus(r)) => format!("step status {}#{}", r.campaign, r.seq),
                Some(Msg::Renew(r)) => format!("renew {} bytes", r.csr.len()),
                other => format!("send {other:?}"),
            },
            Action::ApplyStatus(s) => format!("apply status {}", s.exports.len()),
            Action::Submit(c) => format!("submit {}#{}", c.campaign, c.seq),
            Action::ApplyImports(u) => format!("apply imports {}", u.upsert.len()),
            Action::Certificate(c) => format!("certificate until {}", c.not_after_unix),
            Action::End(SessionError::Refused(s)) => format!("end refused {:?}", s.code()),
            Action::End(e) => format!("end {e}"),
        }
    }

    fn shows(v: Vec<Action>) -> Vec<String> {
        v.iter().map(show).collect()
    }

    #[test]
    fn opening_sends_only_what_the_hub_lacks() {
        let fresh = Opening {
            now: now(&[("a", 8), ("b", 8)], 0),
            exports: Some([export("llm", 80)].into()),
            networks: vec!["10.0.0.0/16".into()],
            namespaces: Some(vec!["ml".into()]),
            ..Default::default()
        };
        let (_, out) = Machine::open(fresh);
        assert_eq!(
            shows(out),
            [
                "snapshot 2",
                "exports 1",
                "networks [\"10.0.0.0/16\"]",
                "namespaces [\"ml\"]"
            ]
        );
        // The hub holds `a` as it is and a `gone` node: only `b` and the removal go; no exports
        // message without an export watch, no namespaces when none are listed.
        let n = now(&[("a", 8), ("b", 8)], 0);
        let held = [
            ("a".to_string(), n.digests["a"]),
            ("gone".to_string(), [1; 32]),
        ]
        .into();
        let (_, out) = Machine::open(Opening {
            held,
            now: n,
            ..Default::default()
        });
        assert_eq!(
            shows(out),
            ["delta +[\"b\"] -[\"gone\"] not_ready=0", "networks []"]
        );
    }

    /// Each case: the inputs after opening on nodes `a` and `b`, export `llm`, no networks; and
    /// every action they give.
    #[test]
    fn every_input_gives_its_actions() {
        let status = |s: &str| v1::StepStatusReport {
            campaign: s.into(),
            seq: 2,
            ..Default::default()
        };
        let hub = |m: v1::hub_message::Msg| Input::Hub(Ok(Some(v1::HubMessage { msg: Some(m) })));
        let cases: Vec<(&str, Vec<Input>, Vec<&str>)> = vec![
            (
                "an unchanged cluster sends nothing; a change sends only itself",
                vec![
                    Input::Inventory(now(&[("a", 8), ("b", 8)], 0)),
                    Input::Inventory(now(&[("a", 8), ("b", 4)], 0)),
                    Input::Inventory(now(&[("a", 8)], 0)),
                ],
                vec![
                    "delta +[\"b\"] -[] not_ready=0",
                    "delta +[] -[\"b\"] not_ready=0",
                ],
            ),
            (
                "changed signals alone are a delta",
                vec![Input::Inventory(now(&[("a", 8), ("b", 8)], 1))],
                vec!["delta +[] -[] not_ready=1"],
            ),
            (
                "a heartbeat always goes, and carries the signals it set",
                vec![
                    Input::Tick(v1::HealthSignals {
                        nodes_not_ready: 1,
                        ..Default::default()
                    }),
                    Input::Inventory(now(&[("a", 8), ("b", 8)], 1)),
                ],
                vec!["heartbeat not_ready=1"],
            ),
            (
                "networks go when they change",
                vec![
                    Input::Networks(vec![]),
                    Input::Networks(vec!["10.1.0.0/16".into()]),
                    Input::Networks(vec!["10.1.0.0/16".into()]),
                ],
                vec!["networks [\"10.1.0.0/16\"]"],
            ),
            (
                "exports go as a delta of what changed",
                vec![
                    Input::Exports([export("llm", 80)].into()),
                    Input::Exports([export("llm", 8080), export("emb", 80)].into()),
                    Input::Exports([export("emb", 80)].into()),
                ],
                vec![
                    "exports delta +[\"emb\", \"llm\"] -[]",
                    "exports delta +[] -[\"ml/llm\"]",
                ],
            ),
            (
                "namespaces, loads and step statuses are passed on",
                vec![
                    Input::Namespaces(vec!["ml".into(), "web".into()]),
                    Input::Loads(Default::default()),
                    Input::StepStatus(status("c1")),
                ],
                vec!["namespaces [\"ml\", \"web\"]", "loads", "step status c1#2"],
            ),
            (
                "the hub's status, steps and imports are applied; acks are not",
                vec![
                    hub(v1::hub_message::Msg::ExportStatus(Default::default())),
                    hub(v1::hub_message::Msg::Command(v1::StepCommand {
                        campaign: "c1".into(),
                        seq: 3,
                        ..Default::default()
                    })),
                    hub(v1::hub_message::Msg::Imports(Default::default())),
                    hub(v1::hub_message::Msg::Ack(Default::default())),
                ],
                vec!["apply status 0", "submit c1#3", "apply imports 0"],
            ),
            (
                "a renewal goes to the hub, and the certificate it sends back is kept",
                vec![
                    Input::Renew(vec![7; 5]),
                    hub(v1::hub_message::Msg::Certificate(v1::IssuedCertificate {
                        not_after_unix: 99,
                        ..Default::default()
                    })),
                ],
                vec!["renew 5 bytes", "certificate until 99"],
            ),
            (
                "a closed stream is retried",
                vec![Input::Hub(Ok(None))],
                vec!["end hub session failed: the hub closed the stream"],
            ),
            (
                "a refusal is final",
                vec![Input::Hub(Err(tonic::Status::unauthenticated(
                    "hello.token: unknown join token",
                )))],
                vec!["end refused Unauthenticated"],
            ),
        ];
        for (name, inputs, want) in cases {
            let (mut m, _) = Machine::open(Opening {
                now: now(&[("a", 8), ("b", 8)], 0),
                exports: Some([export("llm", 80)].into()),
                ..Default::default()
            });
            let got: Vec<String> = inputs
                .into_iter()
                .flat_map(|i| m.on(i))
                .map(|a| show(&a))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_follower_names_the_leader() {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut()
            .insert(LEADER_HINT_KEY, "10.0.0.2:7400".parse().unwrap());
        match classify(s) {
            SessionError::NotLeader { hint, .. } => {
                assert_eq!(hint.as_deref(), Some("10.0.0.2:7400"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(tonic::Status::internal("boom")),
            SessionError::Retry(_)
        ));
    }
}
