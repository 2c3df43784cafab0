//! Key-value store messages ↔ `flotilla_core::kv`.

use flotilla_core::kv as core;

use crate::v1;

impl From<core::KeyValue> for v1::KeyValue {
    fn from(kv: core::KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

impl From<v1::KeyValue> for core::KeyValue {
    fn from(kv: v1::KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

fn range_of(key: Vec<u8>, prefix: bool) -> core::KeyRange {
    core::KeyRange { key, prefix }
}

impl From<v1::RangeRequest> for core::RangeRequest {
    fn from(r: v1::RangeRequest) -> Self {
        let consistency = match v1::Consistency::try_from(r.consistency) {
            Ok(v1::Consistency::Serializable) => core::Consistency::Serializable,
            _ => core::Consistency::Linearizable,
        };
        Self {
            range: range_of(r.key, r.prefix),
            limit: r.limit,
            revision: r.revision,
            consistency,
            keys_only: r.keys_only,
        }
    }
}

impl From<core::RangeRequest> for v1::RangeRequest {
    fn from(r: core::RangeRequest) -> Self {
        let consistency = match r.consistency {
            core::Consistency::Linearizable => v1::Consistency::Linearizable,
            core::Consistency::Serializable => v1::Consistency::Serializable,
        };
        Self {
            key: r.range.key,
            prefix: r.range.prefix,
            limit: r.limit,
            revision: r.revision,
            consistency: consistency as i32,
            keys_only: r.keys_only,
        }
    }
}

/// Builds a wire response header.
pub fn header(
    revision: i64,
    raft_term: u64,
    member_id: u64,
    compact_revision: i64,
) -> v1::ResponseHeader {
    v1::ResponseHeader {
        revision,
        raft_term,
        member_id,
        compact_revision,
    }
}

/// A wire range response from a domain result.
pub fn range_response(r: core::RangeResult, header: v1::ResponseHeader) -> v1::RangeResponse {
    v1::RangeResponse {
        header: Some(header),
        kvs: r.kvs.into_iter().map(Into::into).collect(),
        more: r.more,
        count: r.count,
    }
}

/// A domain range result from a wire response.
pub fn range_result(r: v1::RangeResponse) -> core::RangeResult {
    core::RangeResult {
        revision: r.header.map_or(0, |h| h.revision),
        kvs: r.kvs.into_iter().map(Into::into).collect(),
        more: r.more,
        count: r.count,
    }
}

/// Converts a wire compare, naming the field on an unknown enum value.
pub fn compare_from_wire(i: usize, c: v1::Compare) -> Result<core::Compare, core::KvError> {
    use v1::compare::{Op, Operand, Target};
    let field = format!("compare[{i}]");
    let op = match Op::try_from(c.op) {
        Ok(Op::Equal) => core::CompareOp::Equal,
        Ok(Op::NotEqual) => core::CompareOp::NotEqual,
        Ok(Op::Greater) => core::CompareOp::Greater,
        Ok(Op::Less) => core::CompareOp::Less,
        Err(_) => {
            return Err(core::KvError::invalid(
                format!("{field}.op"),
                format!("unknown value {}", c.op),
            ));
        }
    };
    let target = Target::try_from(c.target).map_err(|_| {
        core::KvError::invalid(
            format!("{field}.target"),
            format!("unknown value {}", c.target),
        )
    })?;
    let target = match (target, c.operand) {
        (Target::Version, Some(Operand::Version(v))) => core::CompareTarget::Version(v),
        (Target::CreateRevision, Some(Operand::CreateRevision(v))) => {
            core::CompareTarget::CreateRevision(v)
        }
        (Target::ModRevision, Some(Operand::ModRevision(v))) => core::CompareTarget::ModRevision(v),
        (Target::Value, Some(Operand::Value(v))) => core::CompareTarget::Value(v),
        (Target::Exists, Some(Operand::Exists(e))) => core::CompareTarget::Exists(e),
        // proto3 drops zero-valued oneof members only when unset; treat "unset" as the zero operand.
        (Target::Version, None) => core::CompareTarget::Version(0),
        (Target::CreateRevision, None) => core::CompareTarget::CreateRevision(0),
        (Target::ModRevision, None) => core::CompareTarget::ModRevision(0),
        (Target::Value, None) => core::CompareTarget::Value(Vec::new()),
        (Target::Exists, None) => core::CompareTarget::Exists(false),
        (t, Some(_)) => {
            return Err(core::KvError::invalid(
                format!("{field}.operand"),
                format!("does not match target {}", t.as_str_name()),
            ));
        }
    };
    Ok(core::Compare {
        key: c.key,
        op,
        target,
    })
}

impl From<core::Compare> for v1::Compare {
    fn from(c: core::Compare) -> Self {
        use v1::compare::{Op, Operand, Target};
        let op = match c.op {
            core::CompareOp::Equal => Op::Equal,
            core::CompareOp::NotEqual => Op::NotEqual,
            core::CompareOp::Greater => Op::Greater,
            core::CompareOp::Less => Op::Less,
        };
        let (target, operand) = match c.target {
            core::CompareTarget::Version(v) => (Target::Version, Operand::Version(v)),
            core::CompareTarget::CreateRevision(v) => {
                (Target::CreateRevision, Operand::CreateRevision(v))
            }
            core::CompareTarget::ModRevision(v) => (Target::ModRevision, Operand::ModRevision(v)),
            core::CompareTarget::Value(v) => (Target::Value, Operand::Value(v)),
            core::CompareTarget::Exists(e) => (Target::Exists, Operand::Exists(e)),
        };
        Self {
            key: c.key,
            target: target as i32,
            op: op as i32,
            operand: Some(operand),
        }
    }
}

fn op_from_wire(field: String, op: v1::RequestOp) -> Result<core::Op, core::KvError> {
    use v1::request_op::Request;
    match op.request {
        Some(Request::Range(r)) => Ok(core::Op::Range(r.into())),
        Some(Request::Put(p)) => Ok(core::Op::Put {
            key: p.key,
            value: p.value,
            prev_kv: p.prev_kv,
        }),
        Some(Request::Delete(d)) => Ok(core::Op::Delete {
            range: range_of(d.key, d.prefix),
            prev_kv: d.prev_kv,
        }),
        None => Err(core::KvError::invalid(field, "operation not set")),
    }
}

impl From<core::Op> for v1::RequestOp {
    fn from(op: core::Op) -> Self {
        use v1::request_op::Request;
        let request = match op {
            core::Op::Range(r) => Request::Range(r.into()),
            core::Op::Put {
                key,
                value,
                prev_kv,
            } => Request::Put(v1::PutRequest {
                key,
                value,
                prev_kv,
            }),
            core::Op::Delete { range, prev_kv } => Request::Delete(v1::DeleteRequest {
                key: range.key,
                prefix: range.prefix,
                prev_kv,
            }),
        };
        Self {
            request: Some(request),
        }
    }
}

/// Converts a wire transaction, naming the field of any malformed part.
pub fn txn_from_wire(t: v1::TxnRequest) -> Result<core::TxnRequest, core::KvError> {
    let compare = t
        .compare
        .into_iter()
        .enumerate()
        .map(|(i, c)| compare_from_wire(i, c))
        .collect::<Result<_, _>>()?;
    let success = t
        .success
        .into_iter()
        .enumerate()
        .map(|(i, o)| op_from_wire(format!("success[{i}]"), o))
        .collect::<Result<_, _>>()?;
    let failure = t
        .failure
        .into_iter()
        .enumerate()
        .map(|(i, o)| op_from_wire(format!("failure[{i}]"), o))
        .collect::<Result<_, _>>()?;
    Ok(core::TxnRequest {
        compare,
        success,
        failure,
    })
}

impl From<core::TxnRequest> for v1::TxnRequest {
    fn from(t: core::TxnRequest) -> Self {
        Self {
            compare: t.compare.into_iter().map(Into::into).collect(),
            success: t.success.into_iter().map(Into::into).collect(),
            failure: t.failure.into_iter().map(Into::into).collect(),
        }
    }
}

/// A wire txn response from a domain result.
pub fn txn_response(t: core::TxnResult, header: v1::ResponseHeader) -> v1::TxnResponse {
    use v1::response_op::Response;
    let responses = t
        .results
        .into_iter()
        .map(|r| v1::ResponseOp {
            response: Some(match r {
                core::OpResult::Range(rr) => Response::Range(range_response(rr, header)),
                core::OpResult::Put { prev_kv } => Response::Put(v1::PutResponse {
                    header: Some(header),
                    prev_kv: prev_kv.map(Into::into),
                }),
                core::OpResult::Delete { deleted, prev_kvs } => {
                    Response::Delete(v1::DeleteResponse {
                        header: Some(header),
                        deleted,
                        prev_kvs: prev_kvs.into_iter().map(Into::into).collect(),
                    })
                }
            }),
        })
        .collect();
    v1::TxnResponse {
        header: Some(header),
        succeeded: t.succeeded,
        responses,
    }
}

/// A domain txn result from a wire response.
pub fn txn_result(t: v1::TxnResponse) -> core::TxnResult {
    use v1::response_op::Response;
    let results = t
        .responses
        .into_iter()
        .filter_map(|r| r.response)
        .map(|r| match r {
            Response::Range(rr) => core::OpResult::Range(range_result(rr)),
            Response::Put(p) => core::OpResult::Put {
                prev_kv: p.prev_kv.map(Into::into),
            },
            Response::Delete(d) => core::OpResult::Delete {
                deleted: d.deleted,
                prev_kvs: d.prev_kvs.into_iter().map(Into::into).collect(),
            },
        })
        .collect();
    core::TxnResult {
        succeeded: t.succeeded,
        revision: t.header.map_or(0, |h| h.revision),
        results,
    }
}

impl From<core::Event> for v1::Event {
    fn from(e: core::Event) -> Self {
        let ty = match e.kind {
            core::EventKind::Put => v1::event::Type::Put,
            core::EventKind::Delete => v1::event::Type::Delete,
        };
        Self {
            r#type: ty as i32,
            kv: Some(e.kv.into()),
            prev_kv: e.prev_kv.map(Into::into),
        }
    }
}

impl From<v1::Event> for core::Event {
    fn from(e: v1::Event) -> Self {
        let kind = match v1::event::Type::try_from(e.r#type) {
            Ok(v1::event::Type::Delete) => core::EventKind::Delete,
            _ => core::EventKind::Put,
        };
        Self {
            kind,
            kv: e.kv.map(Into::into).unwrap_or_default(),
            prev_kv: e.prev_kv.map(Into::into),
        }
    }
}

impl From<v1::WatchRequest> for core::WatchRequest {
    fn from(w: v1::WatchRequest) -> Self {
        Self {
            range: range_of(w.key, w.prefix),
            start_revision: w.start_revision,
            prev_kv: w.prev_kv,
        }
    }
}

impl From<core::WatchRequest> for v1::WatchRequest {
    fn from(w: core::WatchRequest) -> Self {
        Self {
            key: w.range.key,
            prefix: w.range.prefix,
            start_revision: w.start_revision,
            prev_kv: w.prev_kv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_round_trips() {
        let t = core::TxnRequest {
            compare: vec![
                core::Compare::mod_revision("a", 3),
                core::Compare::exists("b", false),
            ],
            success: vec![core::Op::put("a", "1"), core::Op::delete("b")],
            failure: vec![core::Op::Range(core::RangeRequest::new(
                core::KeyRange::prefix("/x/"),
            ))],
        };
        let wire: v1::TxnRequest = t.clone().into();
        assert_eq!(txn_from_wire(wire).unwrap(), t);
    }

    #[test]
    fn unknown_enum_names_field() {
        let c = v1::Compare {
            key: b"k".to_vec(),
            target: 99,
            op: 0,
            operand: None,
        };
        let e = txn_from_wire(v1::TxnRequest {
            compare: vec![c],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(e, core::KvError::InvalidArgument { ref field, .. } if field == "compare[0].target")
        );
    }

    #[test]
    fn empty_op_names_field() {
        let t = v1::TxnRequest {
            success: vec![v1::RequestOp { request: None }],
            ..Default::default()
        };
        let e = txn_from_wire(t).unwrap_err();
        assert!(
            matches!(e, core::KvError::InvalidArgument { ref field, .. } if field == "success[0]")
        );
    }
}

/// gRPC metadata key carrying a [`core::KvError`] label; its presence means the server itself
/// decided the outcome (so, e.g., UNAVAILABLE with it means "not applied").
pub const ERROR_LABEL_KEY: &str = "flotilla-error";
/// gRPC response metadata key with the leader's address (host:port), a routing hint.
pub const LEADER_HINT_KEY: &str = "flotilla-leader";
/// Request metadata: answer from this member or fail (UNAVAILABLE with the leader hint); do
/// not forward to the leader. Clients that follow hints send it, so a leader that stopped
/// answering holds none of their requests on a follower's forward.
pub const NO_FORWARD_KEY: &str = "flotilla-no-forward";
/// gRPC metadata key naming the invalid field.
pub const ERROR_FIELD_KEY: &str = "flotilla-field";
/// gRPC metadata key with the oldest available revision after a compaction error.
pub const COMPACT_REVISION_KEY: &str = "flotilla-compact-revision";
/// gRPC metadata key with the revision asked for (compacted or future).
pub const REQUESTED_REVISION_KEY: &str = "flotilla-requested-revision";

/// Maps a store error to a gRPC status whose code tells the caller what to do.
pub fn to_status(e: core::KvError) -> tonic::Status {
    use tonic::Code;
    let code = match &e {
        core::KvError::InvalidArgument { .. } => Code::InvalidArgument,
        core::KvError::Compacted { .. } => Code::OutOfRange,
        core::KvError::Unavailable(_) => Code::Unavailable,
        core::KvError::OutcomeUnknown(_) => Code::Unknown,
        core::KvError::Internal(_) => Code::Internal,
    };
    let mut s = tonic::Status::new(code, e.to_string());
    let md = s.metadata_mut();
    md.insert(
        ERROR_LABEL_KEY,
        tonic::metadata::MetadataValue::from_static(e.label()),
    );
    match &e {
        core::KvError::InvalidArgument { field, .. } => {
            if let Ok(v) = field.parse() {
                md.insert(ERROR_FIELD_KEY, v);
            }
        }
        core::KvError::Compacted { requested, oldest } => {
            md.insert(COMPACT_REVISION_KEY, (*oldest).into());
            md.insert(REQUESTED_REVISION_KEY, (*requested).into());
        }
        _ => {}
    }
    s
}

/// Maps a gRPC status back to a store error. `write` says whether the call was a write: a
/// failure the server did not itself report (a broken connection, a timeout) leaves a write's
/// outcome unknown, but a read can simply be retried.
pub fn from_status(s: &tonic::Status, write: bool) -> core::KvError {
    let md = s.metadata();
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let num = |k: &str| get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    match get(ERROR_LABEL_KEY).as_deref() {
        Some("invalid_argument") => core::KvError::InvalidArgument {
            field: get(ERROR_FIELD_KEY).unwrap_or_default(),
            reason: s.message().to_string(),
        },
        Some("compacted") => core::KvError::Compacted {
            requested: num(REQUESTED_REVISION_KEY),
            oldest: num(COMPACT_REVISION_KEY),
        },
        Some("unavailable") => core::KvError::Unavailable(s.message().to_string()),
        Some("outcome_unknown") => core::KvError::OutcomeUnknown(s.message().to_string()),
        Some(_) => core::KvError::Internal(s.message().to_string()),
        None => {
            let msg = format!("{}: {}", s.code(), s.message());
            // A request that never left (connection refused) was certainly not applied.
            let lower = msg.to_ascii_lowercase();
            let not_sent = s.code() == tonic::Code::Unavailable
                && [
                    "tcp connect error",
                    "connection refused",
                    "error trying to connect",
                ]
                .iter()
                .any(|p| lower.contains(p));
            if write && !not_sent {
                core::KvError::OutcomeUnknown(msg)
            } else {
                core::KvError::Unavailable(msg)
            }
        }
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_status() {
        for e in [
            core::KvError::invalid("success[0].put.key", "must not be empty"),
            core::KvError::Compacted {
                requested: 3,
                oldest: 10,
            },
            core::KvError::Unavailable("no leader".into()),
        ] {
            let s = to_status(e.clone());
            let back = from_status(&s, true);
            match (&e, &back) {
                (
                    core::KvError::InvalidArgument { field: a, .. },
                    core::KvError::InvalidArgument { field: b, .. },
                ) => {
                    assert_eq!(a, b)
                }
                (core::KvError::Unavailable(_), core::KvError::Unavailable(_)) => {}
                _ => assert_eq!(e, back),
            }
        }
        assert_eq!(
            to_status(core::KvError::invalid("key", "x")).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn transport_failure_of_a_write_is_outcome_unknown() {
        let s = tonic::Status::unavailable("connection reset");
        assert!(matches!(
            from_status(&s, true),
            core::KvError::OutcomeUnknown(_)
        ));
        assert!(matches!(
            from_status(&s, false),
            core::KvError::Unavailable(_)
        ));
        let refused = tonic::Status::unavailable("tcp connect error: Connection refused");
        assert!(matches!(
            from_status(&refused, true),
            core::KvError::Unavailable(_)
        ));
    }
}
