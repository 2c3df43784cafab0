//! Request bodies in Kubernetes protobuf (`application/vnd.kubernetes.protobuf`), decoded to
//! the JSON the rest of kube-sim works with.
//!
//! kubectl 1.32 and later write built-in types in protobuf, and a real API server decodes
//! them; client-go falls back to JSON only for CBOR, never for protobuf (decision 0018). A
//! body is the `k8s\0` magic and a `runtime.Unknown` envelope whose `raw` is the object; the
//! object is decoded with the field table in [`schema`], generated from the k8s-pb and
//! k8s-openapi crates.

pub mod openapi;
mod schema;

use base64::Engine;
use serde_json::{Map, Value, json};

/// The protobuf media type of built-in Kubernetes types.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The four bytes before every protobuf-encoded Kubernetes object.
const MAGIC: &[u8] = b"k8s\x00";

/// How a field is encoded on the wire and shown in JSON.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Bytes,
    I32,
    I64,
    Bool,
    /// A nested message (index into `MESSAGES`).
    Msg(usize),
    /// A Go struct embedded inline: nested in protobuf, flat in JSON.
    Inline(usize),
    MapStr,
    MapBytes,
    MapMsg(usize),
}

/// One field: tag, JSON name, kind, repeated.
#[derive(Debug)]
struct Field(u32, &'static str, Kind, bool);

/// One message type.
#[derive(Debug)]
struct Message {
    name: &'static str,
    fields: &'static [Field],
}

/// Whether a request's `Content-Type` is Kubernetes protobuf.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or("").trim() == CONTENT_TYPE
}

/// Decode a protobuf request body into the object's JSON, `apiVersion` and `kind` included.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("the protobuf body does not start with the Kubernetes magic number")?;
    let mut type_meta = (String::new(), String::new());
    let mut raw: &[u8] = &[];
    let mut r = Reader(rest);
    while let Some((tag, wire)) = r.key()? {
        match (tag, wire) {
            (1, 2) => {
                let mut t = Reader(r.bytes()?);
                while let Some((tag, wire)) = t.key()? {
                    match (tag, wire) {
                        (1, 2) => type_meta.0 = t.string()?,
                        (2, 2) => type_meta.1 = t.string()?,
                        _ => t.skip(wire)?,
                    }
                }
            }
            (2, 2) => raw = r.bytes()?,
            _ => r.skip(wire)?,
        }
    }
    let (api_version, kind) = type_meta;
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    // DeleteOptions is registered in every group version; it is meta.k8s.io's.
    let root = schema::ROOTS
        .iter()
        .find(|(a, k, _)| *a == api_version && *k == kind)
        .or_else(|| {
            schema::ROOTS.iter().find(|(a, k, _)| {
                *k == kind
                    && (kind == "DeleteOptions" || a.rsplit_once('/').map_or("", |x| x.0) == group)
            })
        })
        .ok_or_else(|| {
            format!("kube-sim cannot decode protobuf for {api_version:?} kind {kind:?}")
        })?;
    let mut obj = message(root.2, raw)?;
    if let Value::Object(m) = &mut obj {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

/// Decode one message into its JSON form.
fn message(index: usize, bytes: &[u8]) -> Result<Value, String> {
    let msg = &schema::MESSAGES[index];
    let mut out = Map::new();
    fields_into(msg, bytes, &mut out)?;
    Ok(special(msg.name, out))
}

fn fields_into(msg: &Message, bytes: &[u8], out: &mut Map<String, Value>) -> Result<(), String> {
    let mut r = Reader(bytes);
    while let Some((tag, wire)) = r.key()? {
        let Some(f) = msg.fields.iter().find(|f| f.0 == tag) else {
            r.skip(wire)?;
            continue;
        };
        let Field(_, name, kind, repeated) = *f;
        let mut values = Vec::new();
        match kind {
            Kind::Inline(i) => {
                let m = &schema::MESSAGES[i];
                fields_into(m, r.bytes()?, out)?;
                continue;
            }
            Kind::MapStr | Kind::MapBytes | Kind::MapMsg(_) => {
                let (k, v) = map_entry(kind, r.bytes()?)?;
                let map = out.entry(name).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = map {
                    m.insert(k, v);
                }
                continue;
            }
            Kind::I32 | Kind::I64 | Kind::Bool if wire == 2 => {
                // A packed repeated scalar.
                let mut p = Reader(r.bytes()?);
                while !p.0.is_empty() {
                    values.push(scalar(kind, p.varint()?));
                }
            }
            Kind::I32 | Kind::I64 | Kind::Bool => values.push(scalar(kind, r.varint()?)),
            Kind::Str => values.push(Value::String(r.string()?)),
            Kind::Bytes => values.push(json!(
                base64::engine::general_purpose::STANDARD.encode(r.bytes()?)
            )),
            Kind::Msg(i) => values.push(message(i, r.bytes()?)?),
        }
        for v in values {
            // gogo-protobuf writes non-pointer strings even when empty; JSON omits them
            // (`omitempty`), and kube-sim reads "" and absent alike only in some places.
            if v.as_str() == Some("") && !repeated {
                continue;
            }
            if repeated {
                let list = out.entry(name).or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(a) = list {
                    a.push(v);
                }
            } else {
                out.insert(name.to_string(), v);
            }
        }
    }
    Ok(())
}

fn map_entry(kind: Kind, bytes: &[u8]) -> Result<(String, Value), String> {
    let mut r = Reader(bytes);
    let mut key = String::new();
    let mut value = match kind {
        Kind::MapMsg(i) => message(i, &[])?,
        _ => json!(""),
    };
    while let Some((tag, wire)) = r.key()? {
        match (tag, kind) {
            (1, _) => key = r.string()?,
            (2, Kind::MapStr) => value = Value::String(r.string()?),
            (2, Kind::MapBytes) => {
                value = json!(base64::engine::general_purpose::STANDARD.encode(r.bytes()?))
            }
            (2, Kind::MapMsg(i)) => value = message(i, r.bytes()?)?,
            _ => r.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn scalar(kind: Kind, v: u64) -> Value {
    match kind {
        Kind::Bool => json!(v != 0),
        Kind::I32 => json!(v as i64 as i32),
        _ => json!(v as i64),
    }
}

/// The types whose JSON is not an object of their fields.
fn special(name: &str, m: Map<String, Value>) -> Value {
    let int = |k: &str| m.get(k).and_then(Value::as_i64).unwrap_or(0);
    let raw_json = || {
        m.get("raw")
            .and_then(Value::as_str)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .unwrap_or(Value::Null)
    };
    match name {
        "apimachinery.pkg.api.resource.Quantity" => m.get("string").cloned().unwrap_or(json!("0")),
        // A zero time is marshalled as an empty message.
        "apimachinery.pkg.apis.meta.v1.Time" | "apimachinery.pkg.apis.meta.v1.MicroTime"
            if m.is_empty() =>
        {
            Value::Null
        }
        "apimachinery.pkg.apis.meta.v1.Time" => time(int("seconds"), None),
        "apimachinery.pkg.apis.meta.v1.MicroTime" => time(int("seconds"), Some(int("nanos"))),
        "apimachinery.pkg.apis.meta.v1.Duration" => json!(go_duration(int("duration"))),
        "apimachinery.pkg.apis.meta.v1.FieldsV1" | "apimachinery.pkg.runtime.RawExtension" => {
            raw_json()
        }
        "apimachinery.pkg.util.intstr.IntOrString" => match int("type") {
            1 => m.get("strVal").cloned().unwrap_or(json!("")),
            _ => json!(int("intVal")),
        },
        "api.authorization.v1.ExtraValue" => m.get("items").cloned().unwrap_or(json!([])),
        _ => Value::Object(m),
    }
}

/// RFC 3339 UTC, to the second for `Time` and the microsecond for `MicroTime`; times before
/// 1970 (Go's zero time among them) are `null`, as kube-sim never writes them.
fn time(seconds: i64, nanos: Option<i64>) -> Value {
    if seconds < 0 {
        return Value::Null;
    }
    let s = crate::store::rfc3339(seconds as u64);
    match nanos {
        None => json!(s),
        Some(n) => json!(format!("{}.{:06}Z", s.trim_end_matches('Z'), n / 1000)),
    }
}

/// A `time.Duration` as Go prints it (`1h2m3.5s`, `150ms`, `0s`).
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let ns = ns.unsigned_abs();
    if ns < 1_000_000_000 {
        let (unit, div) = match ns {
            0..1_000 => ("ns", 1),
            1_000..1_000_000 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        return format!("{sign}{}{unit}", trim_fraction(ns, div));
    }
    let h = ns / 3_600_000_000_000;
    let m = ns / 60_000_000_000 % 60;
    let s = trim_fraction(ns % 60_000_000_000, 1_000_000_000);
    match (h, m) {
        (0, 0) => format!("{sign}{s}s"),
        (0, m) => format!("{sign}{m}m{s}s"),
        (h, m) => format!("{sign}{h}h{m}m{s}s"),
    }
}

/// `n / div` with the fraction's trailing zeros dropped (`1500, 1000` → `1.5`).
fn trim_fraction(n: u64, div: u64) -> String {
    let whole = n / div;
    let frac = n % div;
    if frac == 0 {
        return whole.to_string();
    }
    let width = div.to_string().len() - 1;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// A protobuf wire-format reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first().ok_or("a truncated varint")?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    /// The next field's (tag, wire type), or `None` at the end.
    fn key(&mut self) -> Result<Option<(u32, u8)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some(((k >> 3) as u32, (k & 7) as u8)))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        if n > self.0.len() {
            return Err(format!(
                "a field of {n} bytes runs past the end of the body"
            ));
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string field is not UTF-8".into())
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if self.0.len() < N {
            return Err("a truncated fixed-width field".into());
        }
        let (b, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(b.try_into().expect("length checked"))
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.fixed::<8>().map(drop),
            2 => self.bytes().map(drop),
            5 => self.fixed::<4>().map(drop),
            w => Err(format!("unsupported protobuf wire type {w}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf writer for the tests.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn ld(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
        varint(u64::from(tag) << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    fn int(tag: u32, v: u64, out: &mut Vec<u8>) {
        varint(u64::from(tag) << 3, out);
        varint(v, out);
    }
    fn envelope(api: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = Vec::new();
        ld(1, api.as_bytes(), &mut tm);
        ld(2, kind.as_bytes(), &mut tm);
        let mut out = MAGIC.to_vec();
        ld(1, &tm, &mut out);
        ld(2, raw, &mut out);
        out
    }

    #[test]
    fn a_deployment_decodes_to_its_json() {
        // metadata{name, labels{app: web}}, spec{replicas: 0, template.spec.containers[{name,
        // image, resources.requests{nvidia.com/gpu: 1}}], strategy.rollingUpdate.maxSurge "25%"}.
        let mut meta = Vec::new();
        ld(1, b"web", &mut meta);
        ld(2, b"", &mut meta); // generateName "" as gogo writes it: omitted in JSON
        let mut label = Vec::new();
        ld(1, b"app", &mut label);
        ld(2, b"web", &mut label);
        ld(11, &label, &mut meta);
        let mut qty = Vec::new();
        ld(1, b"1", &mut qty);
        let mut req = Vec::new();
        ld(1, b"nvidia.com/gpu", &mut req);
        ld(2, &qty, &mut req);
        let mut resources = Vec::new();
        ld(2, &req, &mut resources);
        let mut container = Vec::new();
        ld(1, b"server", &mut container);
        ld(2, b"nginx", &mut container);
        ld(8, &resources, &mut container);
        let mut pod_spec = Vec::new();
        ld(2, &container, &mut pod_spec);
        let mut template = Vec::new();
        ld(2, &pod_spec, &mut template);
        let mut surge = Vec::new();
        int(1, 1, &mut surge);
        ld(3, b"25%", &mut surge);
        let mut rolling = Vec::new();
        ld(2, &surge, &mut rolling);
        let mut strategy = Vec::new();
        ld(1, b"RollingUpdate", &mut strategy);
        ld(2, &rolling, &mut strategy);
        let mut spec = Vec::new();
        int(1, 0, &mut spec);
        ld(3, &template, &mut spec);
        ld(4, &strategy, &mut spec);
        let mut dep = Vec::new();
        ld(1, &meta, &mut dep);
        ld(2, &spec, &mut dep);
        let v = decode(&envelope("apps/v1", "Deployment", &dep)).unwrap();
        assert_eq!(v["apiVersion"], "apps/v1");
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(
            v["metadata"],
            json!({"name": "web", "labels": {"app": "web"}})
        );
        assert_eq!(v["spec"]["replicas"], 0, "an explicit zero is kept");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "nginx");
        assert_eq!(c["resources"]["requests"]["nvidia.com/gpu"], "1");
        assert_eq!(v["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    }

    #[test]
    fn embedded_structs_are_flat_and_times_are_rfc3339() {
        // Volume{name, volumeSource{emptyDir{}}}: VolumeSource is inline in JSON.
        let mut source = Vec::new();
        ld(2, &[], &mut source);
        let mut volume = Vec::new();
        ld(1, b"cache", &mut volume);
        ld(2, &source, &mut volume);
        let mut pod_spec = Vec::new();
        ld(1, &volume, &mut pod_spec);
        let mut ts = Vec::new();
        int(1, 1_700_000_000, &mut ts);
        let mut meta = Vec::new();
        ld(1, b"p", &mut meta);
        ld(9, &ts, &mut meta); // deletionTimestamp
        let mut pod = Vec::new();
        ld(1, &meta, &mut pod);
        ld(2, &pod_spec, &mut pod);
        let v = decode(&envelope("v1", "Pod", &pod)).unwrap();
        assert_eq!(
            v["spec"]["volumes"][0],
            json!({"name": "cache", "emptyDir": {}})
        );
        assert_eq!(v["metadata"]["deletionTimestamp"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn delete_options_decode_in_any_group_version() {
        let mut opts = Vec::new();
        int(1, 30, &mut opts); // gracePeriodSeconds
        let v = decode(&envelope("apps/v1", "DeleteOptions", &opts)).unwrap();
        assert_eq!(v["gracePeriodSeconds"], 30);
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        assert!(decode(b"{}").unwrap_err().contains("magic"));
        let e = decode(&envelope("v1", "Widget", &[])).unwrap_err();
        assert!(e.contains("Widget"), "{e}");
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&[0x12, 0x40, 0x01]);
        assert!(decode(&bad).unwrap_err().contains("runs past the end"));
    }

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(300_000_000_000), "5m0s");
        assert_eq!(go_duration(3_723_000_000_000), "1h2m3s");
        assert_eq!(go_duration(150_000_000), "150ms");
    }
}
