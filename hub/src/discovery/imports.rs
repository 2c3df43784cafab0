//! What each member cluster imports: every fleet-wide service, as its agent writes it (the MCS
//! `ServiceImport` and one EndpointSlice per exporting cluster). Read from the routing table
//! the stream's replica holds; each agent stream keeps what it sent and sends the difference.

use std::collections::HashMap;

use flotilla_api::convert::discovery::import_to_wire;
use flotilla_api::v1;
use flotilla_core::export::ServiceKey;
use flotilla_core::routing_table::RoutingTable;

/// The imports one agent stream has sent.
#[derive(Default)]
pub struct SentImports {
    sent: HashMap<ServiceKey, v1::ImportedService>,
    started: bool,
}

fn import_of(t: &RoutingTable, cluster: &str, key: &ServiceKey) -> Option<v1::ImportedService> {
    let r = t.get(&key.namespace, &key.name)?;
    let region = t.regions.get(cluster).map(String::as_str);
    Some(import_to_wire(
        &r.service,
        r.decision(Some(cluster), region),
    ))
}

impl SentImports {
    /// The update to send after a table build that decided `keys` again (`None`: everything,
    /// sent whole). `None` when nothing the agent holds changed.
    pub fn update(
        &mut self,
        t: &RoutingTable,
        cluster: &str,
        keys: Option<&[ServiceKey]>,
    ) -> Option<v1::ImportsUpdate> {
        let mut out = v1::ImportsUpdate::default();
        match keys {
            Some(keys) if self.started => {
                for k in keys {
                    match import_of(t, cluster, k) {
                        Some(i) if self.sent.get(k) != Some(&i) => {
                            self.sent.insert(k.clone(), i.clone());
                            out.upsert.push(i);
                        }
                        Some(_) => {}
                        None => {
                            if self.sent.remove(k).is_some() {
                                out.remove.push(format!("{}/{}", k.namespace, k.name));
                            }
                        }
                    }
                }
                if out.upsert.is_empty() && out.remove.is_empty() {
                    return None;
                }
            }
            _ => {
                self.started = true;
                self.sent = t
                    .services
                    .keys()
                    .filter_map(|k| Some((k.clone(), import_of(t, cluster, k)?)))
                    .collect();
                out.full = true;
                out.upsert = self.sent.values().cloned().collect();
                out.upsert
                    .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            }
        }
        Some(out)
    }
}
