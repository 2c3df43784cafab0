//! One simulated cluster's object store: objects by type, a cluster-wide `resourceVersion`,
//! a bounded event history for watches, and the API server's write rules (optimistic
//! concurrency, status subresource, generation, namespaces).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::resources::{RESOURCES, ResourceType, idx};

/// A stored object. Shared between the store, the history and watchers.
pub type Obj = Arc<Value>;

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created (or started matching a watch's selectors).
    Added,
    /// The object changed.
    Modified,
    /// The object was deleted (or stopped matching a watch's selectors).
    Deleted,
}

impl EventType {
    /// Wire name of the event type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change, kept in wire form so that history and watch fan-out hold compact
/// bytes rather than parsed objects.
#[derive(Debug)]
pub struct Change {
    /// The cluster revision of the change.
    pub rv: u64,
    /// Index into [`RESOURCES`].
    pub resource: usize,
    /// What happened.
    pub kind: EventType,
    /// Namespace of the object ("" for cluster-scoped).
    pub namespace: String,
    /// The object after the change (the last state for deletions), as JSON.
    pub object: Bytes,
    /// The object before the change, as JSON, for selector transitions.
    pub previous: Option<Bytes>,
}

/// A stored object and its wire JSON (serialised once per write, shared by lists, watches and
/// the history).
#[derive(Debug, Clone)]
struct Stored {
    value: Obj,
    json: Bytes,
}

impl Stored {
    fn new(value: Obj) -> Self {
        let json = Bytes::from(serde_json::to_vec(&*value).expect("JSON values serialise"));
        Self { value, json }
    }
}

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason`.
    pub reason: &'static str,
    /// Human-readable message, worded as the real API server words it.
    pub message: String,
    /// `Status.details` (`kind`, `name`, `group`, causes), when known.
    pub details: Option<Value>,
}

impl ApiError {
    /// Build an error without details.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, res: usize, name: &str) -> Self {
        let r = &RESOURCES[res];
        self.details = Some(json!({"name": name, "group": r.group, "kind": r.plural}));
        self
    }

    /// 404 for a named object.
    pub fn not_found(res: usize, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(res)),
        )
        .with_details(res, name)
    }

    /// 409 AlreadyExists.
    pub fn already_exists(res: usize, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(res)),
        )
        .with_details(res, name)
    }

    /// 409 Conflict for a stale `resourceVersion`.
    pub fn conflict(res: usize, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified(res)
            ),
        )
        .with_details(res, name)
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422 Invalid, naming the field.
    pub fn invalid(res: usize, name: &str, field: &str, why: &str) -> Self {
        let r = &RESOURCES[res];
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {field}: {why}", r.kind),
        );
        e.details = Some(json!({
            "name": name, "group": r.group, "kind": r.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": why, "field": field}],
        }));
        e
    }

    /// 410 Expired for a watch or list from a compacted `resourceVersion`.
    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// Whether `metadata.finalizers` holds anything.
pub fn has_finalizers(o: &Value) -> bool {
    o["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// Whether an object marked for deletion may now be removed: no finalizers left, and for a
/// pod its grace period run out (the kubelet sets it to 0); a namespace goes through its own
/// controller.
fn deletion_finished(res: usize, o: &Value) -> bool {
    !o["metadata"]["deletionTimestamp"].is_null()
        && !has_finalizers(o)
        && res != idx::NAMESPACES
        && (res != idx::PODS || o["metadata"]["deletionGracePeriodSeconds"].as_i64() == Some(0))
}

/// `pods`, or `poddisruptionbudgets.policy` for named groups, as error messages print it.
fn qualified(res: usize) -> String {
    let r = &RESOURCES[res];
    if r.group.is_empty() {
        r.plural.to_string()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

/// Now as RFC 3339 UTC with second precision, as `metav1.Time` serialises.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Format Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parse the RFC 3339 UTC form [`rfc3339`] writes back to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days-from-civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// A random suffix as `generateName` uses (no vowels, no ambiguous characters).
pub fn random_suffix(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn valid_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

type Key = (String, String);

/// Retained changes after a revision, and a receiver for later ones.
pub type WatchStart = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

/// Changes buffered per cluster for live watchers; a watcher further behind is closed and
/// resumes from the history (each slot costs memory in every cluster, so keep it modest).
const BROADCAST_CAPACITY: usize = 256;

/// Default number of changes a cluster keeps for watches to resume from.
pub const DEFAULT_HISTORY: usize = 2_000;

/// The object store of one simulated cluster.
pub struct Store {
    objects: Vec<BTreeMap<Key, Stored>>,
    rv: u64,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    compacted_through: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

impl Store {
    /// An empty store with the namespaces every cluster has.
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let mut s = Self {
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_through: 0,
            tx,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            s.create(idx::NAMESPACES, "", json!({"metadata": {"name": ns}}))
                .expect("fresh namespace");
        }
        s
    }

    /// The newest `resourceVersion` in the cluster.
    pub fn revision(&self) -> u64 {
        self.rv
    }

    /// The oldest revision a watch can still resume from.
    pub fn compacted_through(&self) -> u64 {
        self.compacted_through
    }

    /// Drop history so that watches from before `rv` get 410 (used by tests and faults).
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_through = self.rv;
    }

    /// One object.
    pub fn get(&self, res: usize, ns: &str, name: &str) -> Result<Obj, ApiError> {
        self.objects[res]
            .get(&(ns.to_string(), name.to_string()))
            .map(|s| s.value.clone())
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of a type, in (namespace, name) order, optionally within a namespace and after
    /// a key (for `continue`).
    pub fn iter<'a>(
        &'a self,
        res: usize,
        ns: Option<&'a str>,
        after: Option<(&str, &str)>,
    ) -> impl Iterator<Item = &'a Obj> + 'a {
        self.iter_json(res, ns, after).map(|(o, _)| o)
    }

    /// Like [`Store::iter`], with each object's wire JSON.
    pub fn iter_json<'a>(
        &'a self,
        res: usize,
        ns: Option<&'a str>,
        after: Option<(&str, &str)>,
    ) -> impl Iterator<Item = (&'a Obj, &'a Bytes)> + 'a {
        use std::ops::Bound;
        let map = &self.objects[res];
        let start: Bound<Key> = match (after, ns) {
            (Some((ans, aname)), _) => Bound::Excluded((ans.to_string(), aname.to_string())),
            (None, Some(ns)) => Bound::Included((ns.to_string(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        map.range((start, Bound::Unbounded))
            .take_while(move |((kns, _), _)| ns.is_none_or(|ns| kns == ns))
            .map(|(_, v)| (&v.value, &v.json))
    }

    /// Number of objects of a type.
    pub fn count(&self, res: usize) -> usize {
        self.objects[res].len()
    }

    /// Subscribe to changes after `rv`: the retained changes newer than `rv` and a receiver
    /// for later ones. 410 when changes after `rv` have been compacted away.
    pub fn watch_from(&self, rv: u64) -> Result<WatchStart, ApiError> {
        if rv < self.compacted_through {
            return Err(ApiError::expired(rv, self.compacted_through));
        }
        let backlog = self.history.iter().filter(|c| c.rv > rv).cloned().collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// Subscribe to changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    fn commit(
        &mut self,
        res: usize,
        kind: EventType,
        ns: &str,
        object: Bytes,
        previous: Option<Bytes>,
    ) {
        let change = Arc::new(Change {
            rv: self.rv,
            resource: res,
            kind,
            namespace: ns.to_string(),
            object,
            previous,
        });
        if self.history.len() >= self.history_limit
            && let Some(old) = self.history.pop_front()
        {
            self.compacted_through = old.rv;
        }
        self.history.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(change);
    }

    fn check_namespace(&self, res: usize, ns: &str) -> Result<(), ApiError> {
        if RESOURCES[res].namespaced {
            if ns.is_empty() {
                return Err(ApiError::bad_request(
                    "the namespace of the object is required",
                ));
            }
            match self.objects[idx::NAMESPACES].get(&(String::new(), ns.to_string())) {
                None => return Err(ApiError::not_found(idx::NAMESPACES, ns)),
                Some(n) if !n.value["metadata"]["deletionTimestamp"].is_null() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "unable to create new content in namespace {ns} because it is being terminated"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn check_type_meta(res: usize, obj: &Value) -> Result<(), ApiError> {
        let r = &RESOURCES[res];
        if let Some(kind) = obj.get("kind").and_then(Value::as_str)
            && kind != r.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind of the provided object ({kind}) does not match the resource ({})",
                r.kind
            )));
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
            && av != r.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the apiVersion of the provided object ({av}) does not match the resource ({})",
                r.api_version()
            )));
        }
        Ok(())
    }

    /// The 400 a real server sends for a body its decoder refuses (we add the field).
    fn undecodable(r: &ResourceType, why: &str) -> ApiError {
        ApiError::bad_request(format!(
            "{kind} in version \"{v}\" cannot be handled as a {kind}: {why}",
            kind = r.kind,
            v = r.version
        ))
    }

    /// Create an object in `ns` ("" for cluster-scoped types).
    pub fn create(&mut self, res: usize, ns: &str, mut obj: Value) -> Result<Obj, ApiError> {
        let r = &RESOURCES[res];
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        Self::check_type_meta(res, &obj)?;
        if !r.is_custom() {
            crate::quantity::normalize(&mut obj).map_err(|e| Self::undecodable(r, &e))?;
        }
        let meta = obj
            .as_object_mut()
            .expect("object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if !meta.is_object() {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if r.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    name = format!("{prefix}{}", random_suffix(5));
                }
                _ => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ));
                }
            }
        }
        if !valid_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                res,
                &name,
                "metadata.name",
                "Invalid value: a lowercase RFC 1123 subdomain must consist of lower case \
                 alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            ));
        }
        let ns = if r.namespaced { ns } else { "" };
        self.check_namespace(res, ns).map_err(|mut e| {
            if e.code == 403 {
                e.message = format!("{} \"{name}\" is forbidden: {}", qualified(res), e.message);
            }
            e
        })?;
        let key = (ns.to_string(), name.clone());
        if self.objects[res].contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        self.rv += 1;
        let m = meta.as_object_mut().expect("object");
        m.insert("name".into(), json!(name));
        if r.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        let o = obj.as_object_mut().expect("object");
        o.insert("apiVersion".into(), json!(r.api_version()));
        o.insert("kind".into(), json!(r.kind));
        if res == idx::NAMESPACES {
            o.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            o.insert("status".into(), json!({"phase": "Active"}));
        }
        let obj: Obj = Arc::new(obj);
        let stored = Stored::new(obj.clone());
        let json = stored.json.clone();
        self.objects[res].insert(key, stored);
        self.commit(res, EventType::Added, ns, json, None);
        Ok(obj)
    }

    /// Replace an object (PUT), or only its status when `status_only`.
    ///
    /// A `metadata.resourceVersion` in the body must equal the stored one (409 otherwise);
    /// an absent one is an unconditional update. A write that changes nothing does not bump
    /// the revision, as on a real API server.
    pub fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        mut obj: Value,
        status_only: bool,
    ) -> Result<Obj, ApiError> {
        let r = &RESOURCES[res];
        let ns = if r.namespaced { ns } else { "" };
        let key = (ns.to_string(), name.to_string());
        let old_stored = self.objects[res]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let old = old_stored.value.clone();
        if !obj.is_object() || !obj["metadata"].is_object() && !obj["metadata"].is_null() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        Self::check_type_meta(res, &obj)?;
        if !r.is_custom() {
            crate::quantity::normalize(&mut obj).map_err(|e| Self::undecodable(r, &e))?;
        }
        let body_name = obj["metadata"]["name"].as_str().unwrap_or(name);
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && rv != old["metadata"]["resourceVersion"].as_str().unwrap_or("")
        {
            return Err(ApiError::conflict(res, name));
        }
        let mut new = if status_only {
            let mut n = (*old).clone();
            n["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            n
        } else {
            if r.has_status {
                match old.get("status") {
                    Some(s) => obj["status"] = s.clone(),
                    None => {
                        obj.as_object_mut().expect("object").remove("status");
                    }
                }
            }
            // Identity fields are the server's.
            for f in [
                "uid",
                "creationTimestamp",
                "generation",
                "namespace",
                "name",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match old["metadata"].get(f) {
                    Some(v) => obj["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = obj["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            obj
        };
        let o = new.as_object_mut().expect("object");
        o.insert("apiVersion".into(), json!(r.api_version()));
        o.insert("kind".into(), json!(r.kind));
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == *old {
            return Ok(old);
        }
        if !status_only && new.get("spec") != old.get("spec") {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        let new = self.write_modified(res, ns, key, old_stored.json, new);
        // The last finalizer of an object being deleted lets it go, as the registry's
        // update path does (a pod only once its kubelet has finished, grace period 0).
        if deletion_finished(res, &new) {
            return self.delete(res, ns, name);
        }
        Ok(new)
    }

    /// Begin a graceful deletion: set `deletionTimestamp` (now + `grace_seconds`) and
    /// `deletionGracePeriodSeconds`; a namespace also turns `Terminating`. An object already
    /// being deleted keeps its timestamp; only a shorter grace period is taken.
    pub fn mark_deleted(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        grace_seconds: i64,
    ) -> Result<Obj, ApiError> {
        let cur = self.get(res, ns, name)?;
        let mut new = (*cur).clone();
        let m = &mut new["metadata"];
        let current_grace = m["deletionGracePeriodSeconds"].as_i64();
        if current_grace.is_some_and(|g| g <= grace_seconds) {
            return Ok(cur);
        }
        if m["deletionTimestamp"].is_null() || grace_seconds == 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            m["deletionTimestamp"] = json!(rfc3339(now + grace_seconds.max(0) as u64));
        }
        m["deletionGracePeriodSeconds"] = json!(grace_seconds);
        if res == idx::NAMESPACES {
            new["status"]["phase"] = json!("Terminating");
        }
        self.replace(res, ns, name, new)
    }

    /// Write a changed object as the server's own (no client rules), bumping the revision.
    fn replace(&mut self, res: usize, ns: &str, name: &str, new: Value) -> Result<Obj, ApiError> {
        let key = (ns.to_string(), name.to_string());
        let old_json = self.objects[res]
            .get(&key)
            .map(|s| s.json.clone())
            .ok_or_else(|| ApiError::not_found(res, name))?;
        Ok(self.write_modified(res, ns, key, old_json, new))
    }

    /// Store a changed object under the next revision and tell the watchers.
    fn write_modified(
        &mut self,
        res: usize,
        ns: &str,
        key: Key,
        old_json: Bytes,
        mut new: Value,
    ) -> Obj {
        self.rv += 1;
        new["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let new: Obj = Arc::new(new);
        let stored = Stored::new(new.clone());
        let json = stored.json.clone();
        self.objects[res].insert(key, stored);
        self.commit(res, EventType::Modified, ns, json, Some(old_json));
        new
    }

    /// Delete an object; namespaces take their objects with them.
    pub fn delete(&mut self, res: usize, ns: &str, name: &str) -> Result<Obj, ApiError> {
        let r = &RESOURCES[res];
        let ns = if r.namespaced { ns } else { "" };
        let key = (ns.to_string(), name.to_string());
        let old_stored = self.objects[res]
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let old = old_stored.value;
        if res == idx::NAMESPACES {
            for (i, t) in RESOURCES.iter().enumerate() {
                if t.namespaced {
                    let keys: Vec<Key> = self.objects[i]
                        .keys()
                        .filter(|(kns, _)| kns == name)
                        .cloned()
                        .collect();
                    for (kns, kname) in keys {
                        let _ = self.delete(i, &kns, &kname);
                    }
                }
            }
        }
        self.rv += 1;
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let last = Stored::new(Arc::new(last));
        self.commit(
            res,
            EventType::Deleted,
            ns,
            last.json,
            Some(old_stored.json),
        );
        Ok(last.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_update_delete_bump_the_revision() {
        let mut s = Store::new(100);
        let start = s.revision();
        let p = s
            .create(
                idx::PODS,
                "default",
                json!({"metadata": {"name": "p"}, "spec": {"a": 1}}),
            )
            .unwrap();
        assert_eq!(
            p["metadata"]["resourceVersion"],
            json!((start + 1).to_string())
        );
        assert_eq!(p["kind"], "Pod");
        // Stale resourceVersion → 409.
        let mut stale = (*p).clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        assert_eq!(
            s.update(idx::PODS, "default", "p", stale, false)
                .unwrap_err()
                .code,
            409
        );
        // A no-op update keeps the revision.
        let same = s
            .update(idx::PODS, "default", "p", (*p).clone(), false)
            .unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            p["metadata"]["resourceVersion"]
        );
        // A spec change bumps generation; status is kept on main-resource writes.
        let mut changed = (*p).clone();
        changed["spec"]["a"] = json!(2);
        changed["status"] = json!({"phase": "Hacked"});
        let u = s.update(idx::PODS, "default", "p", changed, false).unwrap();
        assert_eq!(u["metadata"]["generation"], 2);
        assert!(u.get("status").is_none());
        let st = s
            .update(
                idx::PODS,
                "default",
                "p",
                json!({"status": {"phase": "Running"}}),
                true,
            )
            .unwrap();
        assert_eq!(st["status"]["phase"], "Running");
        assert_eq!(st["spec"]["a"], 2);
        let d = s.delete(idx::PODS, "default", "p").unwrap();
        assert_eq!(
            d["metadata"]["resourceVersion"],
            json!(s.revision().to_string())
        );
        assert_eq!(s.get(idx::PODS, "default", "p").unwrap_err().code, 404);
    }

    #[test]
    fn create_rules() {
        let mut s = Store::new(100);
        let e = s
            .create(idx::PODS, "nope", json!({"metadata": {"name": "p"}}))
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (404, "namespaces \"nope\" not found")
        );
        let e = s
            .create(
                idx::PODS,
                "default",
                json!({"metadata": {"name": "Bad_Name"}}),
            )
            .unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("metadata.name"));
        let g = s
            .create(
                idx::PODS,
                "default",
                json!({"metadata": {"generateName": "web-"}}),
            )
            .unwrap();
        assert!(g["metadata"]["name"].as_str().unwrap().starts_with("web-"));
        s.create(idx::NODES, "", json!({"metadata": {"name": "n"}}))
            .unwrap();
        let e = s
            .create(idx::NODES, "", json!({"metadata": {"name": "n"}}))
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
        let e = s
            .create(
                idx::NODES,
                "",
                json!({"kind": "Pod", "metadata": {"name": "x"}}),
            )
            .unwrap_err();
        assert_eq!(e.code, 400);
    }

    #[test]
    fn watch_history_expires() {
        let mut s = Store::new(3);
        let base = s.revision();
        for i in 0..5 {
            s.create(
                idx::CONFIGMAPS,
                "default",
                json!({"metadata": {"name": format!("c{i}")}}),
            )
            .unwrap();
        }
        assert_eq!(s.watch_from(base).unwrap_err().code, 410);
        let (backlog, _) = s.watch_from(s.revision() - 2).unwrap();
        assert_eq!(backlog.len(), 2);
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects() {
        let mut s = Store::new(100);
        s.create(idx::NAMESPACES, "", json!({"metadata": {"name": "team"}}))
            .unwrap();
        s.create(idx::CONFIGMAPS, "team", json!({"metadata": {"name": "c"}}))
            .unwrap();
        s.delete(idx::NAMESPACES, "", "team").unwrap();
        assert_eq!(s.count(idx::CONFIGMAPS), 0);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(parse_rfc3339("2026-11-18T11:06:40Z"), Some(1_795_000_000));
        assert_eq!(parse_rfc3339(&rfc3339(951_782_400)), Some(951_782_400));
    }
}
