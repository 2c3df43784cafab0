//! The hub's side of one agent stream after the hello, as a pure state machine: each input (a
//! message from the agent, a producer's change, a timer, the result of a write it asked for)
//! gives the actions to perform, in order. The executor in [`super::agent`] does the I/O and
//! feeds results back as inputs. A new producer is an input and an action here, not an edit
//! to a long loop; the table tests below cover every input.

use std::collections::HashSet;

use flotilla_api::convert::fleet as conv;
use flotilla_api::v1;
use flotilla_core::health::Signals;
use tonic::Status;

use crate::discovery::ImportsChanged;
use crate::discovery::imports::MAX_IMPORT_NAMESPACES;

/// What happened to the stream.
#[derive(Debug)]
pub enum Input {
    /// The welcome went out; the stream is open.
    Opened,
    /// A message from the agent. `leads`: whether this replica still leads.
    Message {
        /// The message.
        msg: v1::AgentMessage,
        /// Whether this replica leads now.
        leads: bool,
    },
    /// The agent's side ended (cleanly, or with the transport's error).
    Ended,
    /// The join slot's time is up.
    JoinDeadline,
    /// A [`Action::Store`] or [`Action::Observe`] finished, with the reply to send.
    Done(Result<Option<v1::HubMessage>, Status>),
    /// Discovery rebuilt this cluster's export statuses.
    Statuses(Vec<v1::ExportStatus>),
    /// A leader-side producer put something in the cluster's outbox.
    Outbox,
    /// An import batch decided these services again (`None`: everything, after a missed one).
    Imports(ImportsChanged),
    /// The import feed closed.
    ImportsClosed,
}

/// What the executor does, in order.
#[derive(Debug)]
pub enum Action {
    /// Send a message to the agent.
    Send(v1::HubMessage),
    /// Send the outbox entries this stream has not sent yet.
    SendOutbox,
    /// Send the imports that changed (`None`: the whole set).
    SendImports(ImportsChanged),
    /// Import only for these namespaces from now on.
    SetNamespaces(HashSet<String>),
    /// Write a report (snapshot, delta, exports, networks); answer with [`Input::Done`].
    Store(v1::AgentMessage),
    /// Keep load samples (soft state); answer with [`Input::Done`].
    Observe(v1::InferenceLoads),
    /// Record the cluster's health signals.
    Health(Signals),
    /// The cluster leaves the fleet.
    Leave,
    /// Hand a campaign step's status to the campaign controller.
    Forward(v1::StepStatusReport),
    /// Sign a renewal CSR and send the certificate back.
    Renew(Vec<u8>),
    /// Give the join slot back.
    ReleaseJoinSlot,
    /// Count one message of this kind (or `rejected`).
    Count(&'static str),
    /// Tell the agent this replica does not lead, and close.
    NotLeader,
    /// Send this error and close.
    Reject(Status),
    /// Close the stream.
    Close,
}

/// One stream's state.
#[derive(Debug)]
pub struct Stream {
    join_slot: bool,
    want_imports: bool,
    by_namespace: bool,
    namespaces_known: bool,
    sent_status: Option<Vec<v1::ExportStatus>>,
    /// The kind of the write in flight.
    pending: Option<&'static str>,
    closed: bool,
}

/// Largest CSR accepted (a P-256 or RSA-4096 request is well under this).
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// The metrics label of a message.
pub fn kind(msg: &v1::AgentMessage) -> &'static str {
    use v1::agent_message::Msg;
    match &msg.msg {
        Some(Msg::Hello(_)) => "hello",
        Some(Msg::Snapshot(_)) => "snapshot",
        Some(Msg::Delta(_)) => "delta",
        Some(Msg::Heartbeat(_)) => "heartbeat",
        Some(Msg::Leave(_)) => "leave",
        Some(Msg::Exports(_)) => "exports",
        Some(Msg::ExportsDelta(_)) => "exports_delta",
        Some(Msg::Loads(_)) => "loads",
        Some(Msg::Networks(_)) => "networks",
        Some(Msg::ImportNamespaces(_)) => "import_namespaces",
        Some(Msg::StepStatus(_)) => "step_status",
        Some(Msg::Renew(_)) => "renew",
        None => "other",
    }
}

/// The namespaces an `ImportNamespaces` names, validated: DNS labels, at most
/// [`MAX_IMPORT_NAMESPACES`].
pub fn import_namespaces(n: &v1::ImportNamespaces) -> Result<HashSet<String>, Status> {
    if n.names.len() > MAX_IMPORT_NAMESPACES {
        return Err(conv::Invalid {
            field: "import_namespaces.names".into(),
            reason: format!(
                "{} namespaces, over the limit of {MAX_IMPORT_NAMESPACES}",
                n.names.len()
            ),
        }
        .to_status());
    }
    n.names
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            if conv::is_dns_label(ns) {
                Ok(ns.clone())
            } else {
                Err(conv::Invalid {
                    field: format!("import_namespaces.names[{i}]"),
                    reason: format!("{ns:?} is not a namespace name (a DNS label)"),
                }
                .to_status())
            }
        })
        .collect()
}

impl Stream {
    /// A stream opened by `hello`, holding a join slot until its first report is stored.
    pub fn new(hello: &v1::Hello) -> Self {
        Self {
            join_slot: true,
            want_imports: hello.imports,
            by_namespace: hello.imports_by_namespace,
            namespaces_known: false,
            sent_status: None,
            pending: None,
            closed: false,
        }
    }

    /// Whether import changes should be read for this stream: the agent wants imports and, if
    /// it reports its namespaces, has named them.
    pub fn wants_imports(&self) -> bool {
        self.want_imports && (!self.by_namespace || self.namespaces_known)
    }

    /// Whether the stream still holds its join slot.
    pub fn holds_join_slot(&self) -> bool {
        self.join_slot
    }

    /// Whether the stream is closed.
    pub fn closed(&self) -> bool {
        self.closed
    }

    fn release(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.join_slot) {
            out.push(Action::ReleaseJoinSlot);
        }
    }

    fn reject(&mut self, s: Status) -> Vec<Action> {
        self.closed = true;
        vec![Action::Count("rejected"), Action::Reject(s)]
    }

    /// The actions for `input`. A closed stream does nothing.
    pub fn on(&mut self, input: Input) -> Vec<Action> {
        if self.closed {
            return Vec::new();
        }
        let mut out = Vec::new();
        match input {
            Input::Opened => {
                if self.wants_imports() {
                    out.push(Action::SendImports(None));
                }
                out.push(Action::SendOutbox);
            }
            Input::Message { msg, leads } => return self.message(msg, leads),
            Input::Ended => {
                self.closed = true;
                out.push(Action::Close);
            }
            Input::JoinDeadline => self.release(&mut out),
            Input::Done(r) => {
                let kind = self.pending.take().unwrap_or("other");
                match r {
                    Ok(reply) => {
                        out.push(Action::Count(kind));
                        if let Some(reply) = reply {
                            // The join is done once its first report is stored.
                            self.release(&mut out);
                            out.push(Action::Send(reply));
                        }
                    }
                    // A bad report is rejected whole, and ends the stream.
                    Err(s) => return self.reject(s),
                }
            }
            Input::Statuses(s) => {
                let unchanged = self.sent_status.as_ref() == Some(&s)
                    || (s.is_empty() && self.sent_status.is_none());
                if !unchanged {
                    out.push(Action::Send(v1::HubMessage {
                        msg: Some(v1::hub_message::Msg::ExportStatus(v1::ExportStatuses {
                            exports: s.clone(),
                        })),
                    }));
                    self.sent_status = Some(s);
                }
            }
            Input::Outbox => out.push(Action::SendOutbox),
            Input::Imports(keys) => {
                if self.wants_imports() {
                    out.push(Action::SendImports(keys));
                }
            }
            Input::ImportsClosed => self.want_imports = false,
        }
        out
    }

    fn message(&mut self, msg: v1::AgentMessage, leads: bool) -> Vec<Action> {
        use v1::agent_message::Msg;
        if !leads {
            self.closed = true;
            return vec![Action::NotLeader];
        }
        let kind = kind(&msg);
        let Some(m) = msg.msg else {
            return self.reject(Status::invalid_argument("msg: empty message"));
        };
        match m {
            Msg::Hello(_) => self.reject(Status::invalid_argument("msg: hello was already sent")),
            Msg::Heartbeat(hb) => {
                match conv::signals_from_wire(hb.signals.as_ref(), "heartbeat.signals") {
                    Ok(s) => vec![Action::Count(kind), Action::Health(s)],
                    Err(e) => self.reject(e.to_status()),
                }
            }
            Msg::Leave(_) => vec![Action::Count(kind), Action::Leave],
            Msg::StepStatus(r) => vec![Action::Count(kind), Action::Forward(r)],
            Msg::Renew(r) if r.csr.is_empty() || r.csr.len() > MAX_CSR_BYTES => self.reject(
                Status::invalid_argument(format!("renew.csr: 1 to {MAX_CSR_BYTES} bytes of DER")),
            ),
            Msg::Renew(r) => vec![Action::Count(kind), Action::Renew(r.csr)],
            Msg::ImportNamespaces(n) => match import_namespaces(&n) {
                Ok(set) => {
                    self.namespaces_known = true;
                    let mut out = vec![Action::Count(kind), Action::SetNamespaces(set)];
                    if self.want_imports {
                        out.push(Action::SendImports(None));
                    }
                    out
                }
                Err(s) => self.reject(s),
            },
            Msg::Loads(l) => {
                self.pending = Some(kind);
                vec![Action::Observe(l)]
            }
            m @ (Msg::Snapshot(_)
            | Msg::Delta(_)
            | Msg::Exports(_)
            | Msg::ExportsDelta(_)
            | Msg::Networks(_)) => {
                self.pending = Some(kind);
                vec![Action::Store(v1::AgentMessage { msg: Some(m) })]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::agent_message::Msg;

    /// An action as a short line, so tables read as the protocol does.
    fn show(a: &Action) -> String {
        match a {
            Action::Send(m) => match &m.msg {
                Some(v1::hub_message::Msg::Ack(a)) => format!("send ack {}", a.revision),
                Some(v1::hub_message::Msg::ExportStatus(s)) => {
                    format!("send status {}", s.exports.len())
                }
                other => format!("send {other:?}"),
            },
            Action::SendOutbox => "send outbox".into(),
            Action::SendImports(None) => "send imports all".into(),
            Action::SendImports(Some(b)) => format!("send imports {}", b.len()),
            Action::SetNamespaces(s) => {
                let mut v: Vec<_> = s.iter().cloned().collect();
                v.sort();
                format!("namespaces {}", v.join(","))
            }
            Action::Store(m) => format!("store {}", kind(m)),
            Action::Observe(_) => "observe loads".into(),
            Action::Health(s) => format!("health nodes_not_ready={}", s.nodes_not_ready),
            Action::Leave => "leave".into(),
            Action::Forward(r) => format!("forward {}#{}", r.campaign, r.seq),
            Action::Renew(_) => "renew".into(),
            Action::ReleaseJoinSlot => "release join slot".into(),
            Action::Count(k) => format!("count {k}"),
            Action::NotLeader => "not leader".into(),
            Action::Reject(s) => format!("reject {:?}: {}", s.code(), s.message()),
            Action::Close => "close".into(),
        }
    }

    fn hello(imports: bool, by_namespace: bool) -> v1::Hello {
        v1::Hello {
            cluster: "east".into(),
            imports,
            imports_by_namespace: by_namespace,
            ..Default::default()
        }
    }

    fn msg(m: Msg) -> Input {
        Input::Message {
            msg: v1::AgentMessage { msg: Some(m) },
            leads: true,
        }
    }

    fn ack(revision: i64) -> Option<v1::HubMessage> {
        Some(v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Ack(v1::Ack { revision })),
        })
    }

    fn status(name: &str) -> v1::ExportStatus {
        v1::ExportStatus {
            namespace: "ml".into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn run(s: &mut Stream, inputs: Vec<Input>) -> Vec<String> {
        inputs
            .into_iter()
            .flat_map(|i| s.on(i))
            .map(|a| show(&a))
            .collect()
    }

    /// A case: its name, the hello's (imports, by_namespace), the inputs, and every action
    /// they give.
    type Case = (&'static str, (bool, bool), Vec<Input>, Vec<&'static str>);

    #[test]
    fn every_input_gives_its_actions() {
        let heartbeat = |n: u32, failed: i64| {
            msg(Msg::Heartbeat(v1::Heartbeat {
                signals: Some(v1::HealthSignals {
                    nodes_not_ready: n,
                    gpus_failed: failed,
                    ..Default::default()
                }),
            }))
        };
        let cases: Vec<Case> = vec![
            (
                "opening sends the outbox; imports only when wanted",
                (false, false),
                vec![Input::Opened],
                vec!["send outbox"],
            ),
            (
                "an importing agent gets the whole set at once",
                (true, false),
                vec![Input::Opened],
                vec!["send imports all", "send outbox"],
            ),
            (
                "an agent naming its namespaces gets nothing before it names them",
                (true, true),
                vec![
                    Input::Opened,
                    Input::Imports(None),
                    msg(Msg::ImportNamespaces(v1::ImportNamespaces {
                        names: vec!["web".into(), "ml".into()],
                    })),
                    Input::Imports(Some(Default::default())),
                ],
                vec![
                    "send outbox",
                    "count import_namespaces",
                    "namespaces ml,web",
                    "send imports all",
                    "send imports 0",
                ],
            ),
            (
                "a report is stored, counted, acknowledged, and gives the join slot back once",
                (false, false),
                vec![
                    msg(Msg::Snapshot(Default::default())),
                    Input::Done(Ok(ack(7))),
                    msg(Msg::Delta(Default::default())),
                    Input::Done(Ok(ack(8))),
                ],
                vec![
                    "store snapshot",
                    "count snapshot",
                    "release join slot",
                    "send ack 7",
                    "store delta",
                    "count delta",
                    "send ack 8",
                ],
            ),
            (
                "exports and networks are stored; networks have no reply",
                (false, false),
                vec![
                    msg(Msg::Exports(Default::default())),
                    Input::Done(Ok(ack(3))),
                    msg(Msg::Networks(Default::default())),
                    Input::Done(Ok(None)),
                ],
                vec![
                    "store exports",
                    "count exports",
                    "release join slot",
                    "send ack 3",
                    "store networks",
                    "count networks",
                ],
            ),
            (
                "a rejected report ends the stream; nothing after it is done",
                (false, false),
                vec![
                    msg(Msg::Delta(Default::default())),
                    Input::Done(Err(Status::invalid_argument("delta.upsert[0].name: empty"))),
                    heartbeat(0, 0),
                ],
                vec![
                    "store delta",
                    "count rejected",
                    "reject InvalidArgument: delta.upsert[0].name: empty",
                ],
            ),
            (
                "heartbeats report health with no reply",
                (false, false),
                vec![heartbeat(2, 0)],
                vec!["count heartbeat", "health nodes_not_ready=2"],
            ),
            (
                "impossible heartbeat signals are rejected by field",
                (false, false),
                vec![heartbeat(0, -1)],
                vec![
                    "count rejected",
                    "reject InvalidArgument: heartbeat.signals.gpus_failed: must not be negative (got -1)",
                ],
            ),
            (
                "leave",
                (false, false),
                vec![msg(Msg::Leave(Default::default()))],
                vec!["count leave", "leave"],
            ),
            (
                "a renewal is signed; an empty or oversized one is refused",
                (false, false),
                vec![
                    msg(Msg::Renew(v1::RenewCertificate { csr: vec![1; 10] })),
                    msg(Msg::Renew(v1::RenewCertificate { csr: vec![] })),
                ],
                vec![
                    "count renew",
                    "renew",
                    "count rejected",
                    "reject InvalidArgument: renew.csr: 1 to 8192 bytes of DER",
                ],
            ),
            (
                "step statuses go to the campaign controller",
                (false, false),
                vec![msg(Msg::StepStatus(v1::StepStatusReport {
                    campaign: "c1".into(),
                    seq: 4,
                    ..Default::default()
                }))],
                vec!["count step_status", "forward c1#4"],
            ),
            (
                "loads are observed, counted when kept, rejected when not",
                (false, false),
                vec![
                    msg(Msg::Loads(Default::default())),
                    Input::Done(Ok(None)),
                    msg(Msg::Loads(Default::default())),
                    Input::Done(Err(Status::invalid_argument("loads.samples: at most 1"))),
                ],
                vec![
                    "observe loads",
                    "count loads",
                    "observe loads",
                    "count rejected",
                    "reject InvalidArgument: loads.samples: at most 1",
                ],
            ),
            (
                "a second hello is refused",
                (false, false),
                vec![msg(Msg::Hello(Default::default()))],
                vec![
                    "count rejected",
                    "reject InvalidArgument: msg: hello was already sent",
                ],
            ),
            (
                "an empty message is refused",
                (false, false),
                vec![Input::Message {
                    msg: v1::AgentMessage { msg: None },
                    leads: true,
                }],
                vec![
                    "count rejected",
                    "reject InvalidArgument: msg: empty message",
                ],
            ),
            (
                "a replica that lost leadership sends the agent away",
                (false, false),
                vec![
                    Input::Message {
                        msg: v1::AgentMessage {
                            msg: Some(Msg::Heartbeat(Default::default())),
                        },
                        leads: false,
                    },
                    Input::Outbox,
                ],
                vec!["not leader"],
            ),
            (
                "export statuses go when they change, not when they repeat",
                (false, false),
                vec![
                    Input::Statuses(vec![]),
                    Input::Statuses(vec![status("a")]),
                    Input::Statuses(vec![status("a")]),
                    Input::Statuses(vec![status("a"), status("b")]),
                    Input::Statuses(vec![]),
                ],
                vec!["send status 1", "send status 2", "send status 0"],
            ),
            (
                "an outbox change sends the outbox",
                (false, false),
                vec![Input::Outbox],
                vec!["send outbox"],
            ),
            (
                "the join deadline gives the slot back once; a report after it does not again",
                (false, false),
                vec![
                    Input::JoinDeadline,
                    Input::JoinDeadline,
                    msg(Msg::Snapshot(Default::default())),
                    Input::Done(Ok(ack(1))),
                ],
                vec![
                    "release join slot",
                    "store snapshot",
                    "count snapshot",
                    "send ack 1",
                ],
            ),
            (
                "a closed import feed stops imports",
                (true, false),
                vec![Input::ImportsClosed, Input::Imports(None), Input::Opened],
                vec!["send outbox"],
            ),
            (
                "the agent's end closes the stream",
                (false, false),
                vec![Input::Ended, Input::Outbox],
                vec!["close"],
            ),
        ];
        for (name, (imports, by_ns), inputs, want) in cases {
            let mut s = Stream::new(&hello(imports, by_ns));
            assert_eq!(run(&mut s, inputs), want, "{name}");
        }
    }

    #[test]
    fn queries_follow_the_state() {
        let mut s = Stream::new(&hello(true, true));
        assert!(!s.wants_imports(), "namespaces not known yet");
        assert!(s.holds_join_slot());
        s.on(msg(Msg::ImportNamespaces(v1::ImportNamespaces {
            names: vec!["ml".into()],
        })));
        assert!(s.wants_imports());
        s.on(Input::JoinDeadline);
        assert!(!s.holds_join_slot());
        assert!(!s.closed());
        s.on(Input::Ended);
        assert!(s.closed());
    }

    #[test]
    fn import_namespaces_are_dns_labels_within_the_limit() {
        let ok = import_namespaces(&v1::ImportNamespaces {
            names: vec!["ml".into(), "web".into()],
        })
        .unwrap();
        assert_eq!(ok.len(), 2);
        let bad = import_namespaces(&v1::ImportNamespaces {
            names: vec!["ml".into(), "Not_A_Label".into()],
        })
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(
            bad.message().contains("import_namespaces.names[1]"),
            "{}",
            bad.message()
        );
        let many = import_namespaces(&v1::ImportNamespaces {
            names: (0..=MAX_IMPORT_NAMESPACES)
                .map(|i| format!("ns{i}"))
                .collect(),
        })
        .unwrap_err();
        assert!(
            many.message().contains("over the limit"),
            "{}",
            many.message()
        );
    }
}
