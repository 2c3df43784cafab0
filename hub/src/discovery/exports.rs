//! An agent stream's exports: what the store holds for its cluster, and the one transaction
//! that makes it what the agent reports. Only this stream writes `/exports/<cluster>/`, so
//! no compare is needed; an unchanged export is not written again.

use std::collections::BTreeMap;

use flotilla_api::convert::discovery::{export_to_wire, exports_from_wire};
use flotilla_api::convert::fleet::Invalid;
use flotilla_api::v1;
use flotilla_core::kv::{KeyRange, KvBackend, KvError, Op, RangeRequest, TxnRequest};
use prost::Message;

use crate::store::keys;

/// What the store holds for one cluster: `(namespace, name)` → encoded record.
#[derive(Debug, Clone, Default)]
pub struct HeldExports {
    records: BTreeMap<(String, String), Vec<u8>>,
}

impl HeldExports {
    /// Read what the store holds for `cluster` (linearizably: writes are skipped against it).
    pub async fn load<B: KvBackend>(b: &B, cluster: &str) -> Result<Self, KvError> {
        let r = b
            .range(RangeRequest::new(KeyRange::prefix(keys::exports_of(
                cluster,
            ))))
            .await?;
        let prefix = keys::exports_of(cluster);
        let records = r
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let k = String::from_utf8(kv.key).ok()?;
                let (ns, name) = k.strip_prefix(&prefix)?.split_once('/')?;
                Some(((ns.to_string(), name.to_string()), kv.value))
            })
            .collect();
        Ok(Self { records })
    }

    /// Exports held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The writes that take the store from `held` to `next` (puts of what changed, deletes of
/// what is gone), and `next` itself. Validation errors name the field; nothing is written.
pub fn plan(
    cluster: &str,
    held: &HeldExports,
    snapshot: Option<&[v1::ServiceExport]>,
    upsert: &[v1::ServiceExport],
    remove: &[String],
    at: &str,
) -> Result<(Vec<Op>, HeldExports), Invalid> {
    let mut next = match snapshot {
        Some(_) => HeldExports::default(),
        None => held.clone(),
    };
    let incoming = exports_from_wire(snapshot.unwrap_or(upsert), cluster, at)?;
    for e in &incoming {
        // Stored with the cluster the session proved, whatever the agent wrote.
        next.records.insert(
            (e.namespace.clone(), e.name.clone()),
            export_to_wire(e).encode_to_vec(),
        );
    }
    for (i, r) in remove.iter().enumerate() {
        let Some((ns, name)) = r.split_once('/') else {
            return Err(Invalid {
                field: format!("{at}.remove[{i}]"),
                reason: format!("{r:?}: want namespace/name"),
            });
        };
        next.records.remove(&(ns.to_string(), name.to_string()));
    }
    if next.records.len() > flotilla_api::convert::discovery::MAX_EXPORTS {
        return Err(Invalid {
            field: at.into(),
            reason: format!(
                "the cluster would export {} services, over the limit of {}",
                next.records.len(),
                flotilla_api::convert::discovery::MAX_EXPORTS
            ),
        });
    }
    let mut ops = Vec::new();
    for ((ns, name), v) in &next.records {
        if held.records.get(&(ns.clone(), name.clone())) != Some(v) {
            ops.push(Op::put(keys::export_key(cluster, ns, name), v.clone()));
        }
    }
    for (ns, name) in held.records.keys() {
        if !next.records.contains_key(&(ns.clone(), name.clone())) {
            ops.push(Op::delete(keys::export_key(cluster, ns, name)));
        }
    }
    Ok((ops, next))
}

/// Write `ops` in one transaction; the revision, or 0 when there was nothing to write.
pub async fn write<B: KvBackend>(b: &B, ops: Vec<Op>) -> Result<i64, KvError> {
    if ops.is_empty() {
        return Ok(0);
    }
    let r = b
        .txn(TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        })
        .await?;
    Ok(r.revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(name: &str, port: u32) -> v1::ServiceExport {
        v1::ServiceExport {
            namespace: "ml".into(),
            name: name.into(),
            r#type: v1::ServiceType::ClusterSetIp as i32,
            ports: vec![v1::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port,
                app_protocol: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_writes_what_changed_and_deletes_what_is_gone() {
        let (ops, held) = plan(
            "c",
            &HeldExports::default(),
            Some(&[export("a", 1), export("b", 1)]),
            &[],
            &[],
            "exports",
        )
        .unwrap();
        assert_eq!(ops.len(), 2);
        let (ops, held2) = plan(
            "c",
            &held,
            Some(&[export("a", 1), export("b", 2)]),
            &[],
            &[],
            "exports",
        )
        .unwrap();
        assert_eq!(ops.len(), 1, "only b changed");
        let (ops, held3) = plan("c", &held2, Some(&[export("b", 2)]), &[], &[], "exports").unwrap();
        assert!(matches!(&ops[..], [Op::Delete { .. }]), "a is gone");
        assert_eq!(held3.len(), 1);
        let (ops, _) = plan("c", &held3, None, &[], &["ml/b".into()], "exports_delta").unwrap();
        assert_eq!(ops.len(), 1);
    }

    #[test]
    fn a_bad_export_writes_nothing() {
        let mut bad = export("a", 1);
        bad.ports[0].port = 0;
        let e = plan(
            "c",
            &HeldExports::default(),
            Some(&[export("ok", 1), bad]),
            &[],
            &[],
            "exports",
        )
        .unwrap_err();
        assert_eq!(e.field, "exports[1].ports[0].port");
        let e = plan(
            "c",
            &HeldExports::default(),
            None,
            &[],
            &["nope".into()],
            "exports_delta",
        )
        .unwrap_err();
        assert_eq!(e.field, "exports_delta.remove[0]");
    }
}
