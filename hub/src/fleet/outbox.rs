//! Per-cluster outboxes: what leader-side producers want a cluster's agent to have. A
//! producer puts a message under a key (the latest one per key wins) or removes it; each
//! stream of that cluster sends every entry it has not sent yet, and a new stream starts with
//! all of them, so a reconnected agent gets the current campaign step again without the
//! producer knowing streams exist. New producers need no change to the stream loop.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use flotilla_api::v1;
use tokio::sync::watch;

/// Every cluster's outbox.
#[derive(Default)]
pub struct Outboxes {
    boxes: Mutex<HashMap<String, Arc<Outbox>>>,
}

impl Outboxes {
    /// The outbox of `cluster` (created empty on first use).
    pub fn of(&self, cluster: &str) -> Arc<Outbox> {
        self.boxes
            .lock()
            .expect("outboxes lock")
            .entry(cluster.to_string())
            .or_default()
            .clone()
    }
}

/// One cluster's outbox.
pub struct Outbox {
    entries: Mutex<BTreeMap<String, (u64, v1::HubMessage)>>,
    /// The newest version put; streams wait on it.
    version: watch::Sender<u64>,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            version: watch::Sender::new(0),
        }
    }
}

impl Outbox {
    /// Put `msg` under `key`, replacing what was there; streams send it once each.
    pub fn put(&self, key: &str, msg: v1::HubMessage) {
        let mut entries = self.entries.lock().expect("outbox lock");
        if entries.get(key).is_some_and(|(_, m)| *m == msg) {
            return;
        }
        let v = *self.version.borrow() + 1;
        entries.insert(key.to_string(), (v, msg));
        self.version.send_replace(v);
    }

    /// Remove `key` (streams that sent it are not told: the entry only stops being resent).
    pub fn remove(&self, key: &str) {
        self.entries.lock().expect("outbox lock").remove(key);
    }

    /// The keys held now.
    pub fn keys(&self) -> Vec<String> {
        self.entries
            .lock()
            .expect("outbox lock")
            .keys()
            .cloned()
            .collect()
    }

    /// A reader for one stream: it has sent nothing yet.
    pub fn reader(self: &Arc<Self>) -> OutboxReader {
        OutboxReader {
            outbox: self.clone(),
            sent: HashMap::new(),
            changes: self.version.subscribe(),
        }
    }
}

/// One stream's view of an outbox: which version of each key it has sent.
pub struct OutboxReader {
    outbox: Arc<Outbox>,
    sent: HashMap<String, u64>,
    changes: watch::Receiver<u64>,
}

impl OutboxReader {
    /// Wait until something was put since the last [`OutboxReader::take`].
    pub async fn changed(&mut self) {
        // The sender lives as long as the outbox, which this reader holds.
        let _ = self.changes.changed().await;
    }

    /// The entries not yet sent on this stream, in key order; marks them sent.
    pub fn take(&mut self) -> Vec<v1::HubMessage> {
        self.changes.borrow_and_update();
        let entries = self.outbox.entries.lock().expect("outbox lock");
        self.sent.retain(|k, _| entries.contains_key(k));
        let mut out = Vec::new();
        for (k, (v, m)) in entries.iter() {
            if self.sent.get(k) != Some(v) {
                self.sent.insert(k.clone(), *v);
                out.push(m.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> v1::HubMessage {
        v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Command(v1::StepCommand {
                campaign: "c".into(),
                seq,
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn each_stream_sends_each_version_once_and_a_new_stream_everything() {
        let boxes = Outboxes::default();
        let ob = boxes.of("east");
        ob.put("campaign/c", msg(1));
        let mut first = ob.reader();
        assert_eq!(first.take(), [msg(1)]);
        assert!(first.take().is_empty(), "sent once");
        // The same message again is not a change.
        ob.put("campaign/c", msg(1));
        assert!(first.take().is_empty());
        ob.put("campaign/c", msg(2));
        ob.put("campaign/d", msg(9));
        tokio::time::timeout(std::time::Duration::from_secs(5), first.changed())
            .await
            .unwrap();
        assert_eq!(first.take(), [msg(2), msg(9)]);
        // A reconnected agent's stream gets what is held now.
        let mut second = boxes.of("east").reader();
        assert_eq!(second.take(), [msg(2), msg(9)]);
        ob.remove("campaign/d");
        assert_eq!(ob.keys(), ["campaign/c"]);
        assert!(second.take().is_empty());
        // Another cluster's outbox is its own.
        assert!(boxes.of("west").reader().take().is_empty());
    }
}
