//! OpenAPI documents for the served types: `/openapi/v2` (JSON, or the gnostic protobuf that
//! kubectl asks for) and `/openapi/v3` (an index, then one document per group version).
//!
//! The schemas come from the same field tables as the protobuf decoder (decision 0018):
//! every property's JSON name and type, references between types, and each kind's
//! `x-kubernetes-group-version-kind`, so `kubectl apply` validates manifests (an unknown or
//! mistyped field is refused as on a real cluster) and `kubectl explain` lists fields. They
//! carry no descriptions. The CRDs (MCS, Cluster API) are published as open objects, as a CRD
//! that preserves unknown fields is.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::schema::{MESSAGES, ROOTS};
use super::{Field, Kind};

/// The gnostic media type kubectl asks `/openapi/v2` for.
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
/// The `Content-Type` of that answer: the same, spelled so that Go's `mime` parser accepts it
/// (a `@` is not a token character), as kube-openapi answers.
pub const V2_PROTOBUF_CONTENT_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// The custom resources kube-sim serves: (group, versions, kind).
const CRDS: &[(&str, &[&str], &str)] = &[
    (
        "multicluster.x-k8s.io",
        &["v1alpha1", "v1beta1"],
        "ServiceExport",
    ),
    (
        "multicluster.x-k8s.io",
        &["v1alpha1", "v1beta1"],
        "ServiceImport",
    ),
    ("cluster.x-k8s.io", &["v1beta1"], "MachineDeployment"),
];

/// A definition's name, as the real documents spell it (`io.k8s.api.core.v1.Pod`).
fn def_name(message: &str) -> String {
    format!("io.k8s.{message}")
}

/// The schema of a type the JSON shows as something other than an object of its fields.
fn special(name: &str) -> Option<Value> {
    Some(match name {
        "apimachinery.pkg.api.resource.Quantity" => json!({"type": "string", "format": "quantity"}),
        "apimachinery.pkg.apis.meta.v1.Time" | "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            json!({"type": "string", "format": "date-time"})
        }
        "apimachinery.pkg.apis.meta.v1.Duration" => json!({"type": "string"}),
        "apimachinery.pkg.apis.meta.v1.FieldsV1" | "apimachinery.pkg.runtime.RawExtension" => {
            json!({"type": "object"})
        }
        "apimachinery.pkg.util.intstr.IntOrString" => {
            json!({"type": "string", "format": "int-or-string"})
        }
        "api.authorization.v1.ExtraValue" => json!({"type": "array", "items": {"type": "string"}}),
        _ => return None,
    })
}

fn reference(index: usize) -> Value {
    json!({"$ref": format!("#/definitions/{}", def_name(MESSAGES[index].name))})
}

fn field_schema(kind: Kind, repeated: bool) -> Value {
    let one = match kind {
        Kind::Str => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::I32 => json!({"type": "integer", "format": "int32"}),
        Kind::I64 => json!({"type": "integer", "format": "int64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Msg(i) | Kind::Inline(i) => reference(i),
        Kind::MapStr => json!({"type": "object", "additionalProperties": {"type": "string"}}),
        Kind::MapBytes => {
            json!({"type": "object", "additionalProperties": {"type": "string", "format": "byte"}})
        }
        Kind::MapMsg(i) => json!({"type": "object", "additionalProperties": reference(i)}),
    };
    match repeated {
        true => json!({"type": "array", "items": one}),
        false => one,
    }
}

/// A message's properties, with embedded (inline) structs flattened as JSON shows them.
fn properties(fields: &[Field], out: &mut serde_json::Map<String, Value>) {
    for &Field(_, name, kind, repeated) in fields {
        match kind {
            Kind::Inline(i) => properties(MESSAGES[i].fields, out),
            _ => {
                out.insert(name.to_string(), field_schema(kind, repeated));
            }
        }
    }
}

fn gvk(api_version: &str, kind: &str) -> Value {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    json!({"group": group, "version": version, "kind": kind})
}

/// Every definition, OpenAPI v2 style (`#/definitions/` references).
pub fn definitions() -> &'static BTreeMap<String, Value> {
    static DEFS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    DEFS.get_or_init(|| {
        let mut defs = BTreeMap::new();
        for m in MESSAGES {
            let schema = special(m.name).unwrap_or_else(|| {
                let mut props = serde_json::Map::new();
                properties(m.fields, &mut props);
                json!({"type": "object", "properties": props})
            });
            defs.insert(def_name(m.name), schema);
        }
        let mut kinds: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (api_version, kind, i) in ROOTS {
            kinds
                .entry(def_name(MESSAGES[*i].name))
                .or_default()
                .push(gvk(api_version, kind));
        }
        for (name, gvks) in kinds {
            let d = defs.get_mut(&name).expect("root");
            d["properties"]["apiVersion"] = json!({"type": "string"});
            d["properties"]["kind"] = json!({"type": "string"});
            d["x-kubernetes-group-version-kind"] = json!(gvks);
        }
        for (group, versions, kind) in CRDS {
            for v in *versions {
                let name = format!("{}.{v}.{kind}", group.split('.').rev().collect::<Vec<_>>().join("."));
                defs.insert(
                    name,
                    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                           "x-kubernetes-group-version-kind": [gvk(&format!("{group}/{v}"), kind)]}),
                );
            }
        }
        defs
    })
}

/// The definition of a built-in kind, by `apiVersion` and `kind`.
fn root_definition(api_version: &str, kind: &str) -> Option<&'static Value> {
    ROOTS
        .iter()
        .find(|(av, k, _)| *av == api_version && *k == kind)
        .and_then(|(_, _, i)| definitions().get(&def_name(MESSAGES[*i].name)))
}

/// Decode `obj` as a real server's strict decoder would: a value of the wrong JSON type is
/// an error (the message Go's `encoding/json` writes), and the unknown fields come back by
/// path (`spec.template.spec.containers[0].imagePullPolcy`) for the caller to refuse or warn
/// about, as `fieldValidation` asks. Kinds without a schema (custom resources) pass.
pub fn check(api_version: &str, kind: &str, obj: &Value) -> Result<Vec<String>, String> {
    let Some(schema) = root_definition(api_version, kind) else {
        return Ok(Vec::new());
    };
    let mut unknown = Vec::new();
    walk(schema, kind, obj, "", &mut unknown)?;
    Ok(unknown)
}

fn resolve(schema: &Value) -> (&Value, Option<&str>) {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/definitions/");
            (definitions().get(name).unwrap_or(&Value::Null), Some(name))
        }
        None => (schema, None),
    }
}

/// How Go names a schema's type in an unmarshal error (`int32`, `[]v1.Container`).
fn go_type(schema: &Value) -> String {
    if let Some(r) = schema["$ref"].as_str() {
        let mut parts = r.rsplit('.');
        let ty = parts.next().unwrap_or("");
        return format!("{}.{ty}", parts.next().unwrap_or(""));
    }
    match (schema["type"].as_str(), schema["format"].as_str()) {
        (Some("integer"), Some(f)) => f.to_string(),
        (Some("boolean"), _) => "bool".into(),
        (Some("array"), _) => format!("[]{}", go_type(&schema["items"])),
        (Some("object"), _) => format!("map[string]{}", go_type(&schema["additionalProperties"])),
        _ => "string".into(),
    }
}

fn json_type(v: &Value) -> String {
    match v {
        Value::String(_) => "string".into(),
        Value::Number(n) => format!("number {n}"),
        Value::Bool(_) => "bool".into(),
        Value::Array(_) => "array".into(),
        _ => "object".into(),
    }
}

fn walk(
    schema: &Value,
    owner: &str,
    v: &Value,
    path: &str,
    unknown: &mut Vec<String>,
) -> Result<(), String> {
    if v.is_null() {
        return Ok(());
    }
    let (s, name) = resolve(schema);
    let owner = name.map_or(owner, |n| n.rsplit('.').next().unwrap_or(n));
    let wrong = || {
        Err(format!(
            "json: cannot unmarshal {} into Go struct field {owner}.{path} of type {}",
            json_type(v),
            go_type(schema)
        ))
    };
    let ok = match (s["type"].as_str(), s["format"].as_str()) {
        (Some("string"), Some("int-or-string")) => v.is_string() || v.is_i64() || v.is_u64(),
        (Some("string"), Some("quantity")) => v.is_string() || v.is_number(),
        (Some("string"), _) => v.is_string(),
        (Some("integer"), _) => v.is_i64() || v.is_u64(),
        (Some("boolean"), _) => v.is_boolean(),
        (Some("array"), _) => {
            let Some(items) = v.as_array() else {
                return wrong();
            };
            for (i, item) in items.iter().enumerate() {
                walk(&s["items"], owner, item, &format!("{path}[{i}]"), unknown)?;
            }
            true
        }
        (Some("object"), _) => {
            let Some(map) = v.as_object() else {
                return wrong();
            };
            let join = |k: &str| match path {
                "" => k.to_string(),
                p => format!("{p}.{k}"),
            };
            if let Some(props) = s["properties"].as_object() {
                for (k, sub) in map {
                    match props.get(k) {
                        Some(p) => walk(p, owner, sub, &join(k), unknown)?,
                        None => unknown.push(join(k)),
                    }
                }
            } else if let Some(extra) = s.get("additionalProperties") {
                for (k, sub) in map {
                    walk(extra, owner, sub, &join(k), unknown)?;
                }
            }
            true
        }
        _ => true,
    };
    if ok { Ok(()) } else { wrong() }
}

/// One served resource, as the documents' paths list it.
#[derive(Debug, Clone)]
pub struct Served {
    /// `v1`, `apps/v1`, ...
    pub group_version: String,
    /// Plural resource name.
    pub plural: &'static str,
    /// Object kind.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Only `create` (the access reviews).
    pub create_only: bool,
}

/// The query parameters of writes; `fieldValidation` tells kubectl the server validates
/// fields (so it sends `Strict` rather than checking on its side).
const WRITE_PARAMS: &[&str] = &["dryRun", "fieldManager", "fieldValidation"];

/// The operations of one resource, by path: (path, method, action, is_write).
fn operations(r: &Served) -> Vec<(String, &'static str, &'static str, bool)> {
    let base = match r.group_version.as_str() {
        "v1" => "/api/v1".to_string(),
        gv => format!("/apis/{gv}"),
    };
    let list = match r.namespaced {
        true => format!("{base}/namespaces/{{namespace}}/{}", r.plural),
        false => format!("{base}/{}", r.plural),
    };
    if r.create_only {
        return vec![(list, "post", "post", true)];
    }
    let item = format!("{list}/{{name}}");
    vec![
        (list.clone(), "get", "list", false),
        (list, "post", "post", true),
        (item.clone(), "get", "get", false),
        (item.clone(), "put", "put", true),
        (item.clone(), "patch", "patch", true),
        (item, "delete", "delete", false),
    ]
}

fn op_gvk(r: &Served) -> Value {
    let mut g = gvk(&r.group_version, r.kind);
    g.as_object_mut().expect("object").remove("apiVersion");
    g
}

/// Paths in OpenAPI v2 (`v3 == false`: parameters typed inline) or v3 (`schema`) form.
fn paths_json(served: &[Served], v3: bool) -> Value {
    let mut paths = serde_json::Map::new();
    for r in served {
        for (path, method, action, write) in operations(r) {
            let mut op = json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": op_gvk(r)});
            if write {
                let params: Vec<Value> = WRITE_PARAMS
                    .iter()
                    .map(|p| match v3 {
                        true => json!({"name": p, "in": "query", "schema": {"type": "string"}}),
                        false => json!({"name": p, "in": "query", "type": "string"}),
                    })
                    .collect();
                op["parameters"] = json!(params);
            }
            let entry = paths.entry(path).or_insert_with(|| json!({}));
            entry[method] = op;
        }
    }
    Value::Object(paths)
}

/// `/openapi/v2` as JSON.
pub fn v2_json(k8s_version: &str, served: &[Served]) -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes (kube-sim, a simulated API server)", "version": k8s_version},
        "paths": paths_json(served, false),
        "definitions": definitions(),
    })
}

/// The group versions `/openapi/v3` lists (`api/v1`, `apis/apps/v1`, ...).
pub fn v3_paths(served: &[Served]) -> Value {
    let hash = v3_hash();
    let mut paths = serde_json::Map::new();
    for r in served {
        let path = match r.group_version.as_str() {
            "v1" => "api/v1".to_string(),
            gv => format!("apis/{gv}"),
        };
        let url = format!("/openapi/v3/{path}?hash={hash}");
        paths.insert(path, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// A content hash of the schemas, so that clients cache each document until it changes.
fn v3_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serde_json::to_vec(definitions()).expect("json") {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// One group version's OpenAPI v3 document: its resources' operations and every schema
/// (`#/components/schemas/`).
pub fn v3_document(k8s_version: &str, group_version: &str, served: &[Served]) -> Value {
    let mine: Vec<Served> = served
        .iter()
        .filter(|r| r.group_version == group_version)
        .cloned()
        .collect();
    let schemas: serde_json::Map<String, Value> = definitions()
        .iter()
        .map(|(k, v)| {
            let text = serde_json::to_string(v)
                .expect("json")
                .replace("#/definitions/", "#/components/schemas/");
            (k.clone(), serde_json::from_str(&text).expect("json"))
        })
        .collect();
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kube-sim, a simulated API server)", "version": k8s_version},
        "paths": paths_json(&mine, true),
        "components": {"schemas": schemas},
    })
}

/// `/openapi/v2` in gnostic's protobuf (`openapi_v2.Document`), which client-go decodes:
/// the definitions, and the PATCH operations that declare `fieldValidation`.
pub fn v2_protobuf(k8s_version: &str, served: &[Served]) -> Vec<u8> {
    let mut info = Vec::new();
    put_str(
        &mut info,
        1,
        "Kubernetes (kube-sim, a simulated API server)",
    );
    put_str(&mut info, 2, k8s_version);
    let mut paths = Vec::new();
    for r in served {
        for (path, method, _, _) in operations(r) {
            if method != "patch" {
                continue;
            }
            let mut op = Vec::new();
            for p in WRITE_PARAMS {
                let mut query = Vec::new();
                put_str(&mut query, 2, "query");
                put_str(&mut query, 4, p);
                put_str(&mut query, 6, "string");
                let mut non_body = Vec::new();
                put_msg(&mut non_body, 3, &query);
                let mut param = Vec::new();
                put_msg(&mut param, 2, &non_body);
                let mut item = Vec::new();
                put_msg(&mut item, 1, &param);
                put_msg(&mut op, 8, &item);
            }
            let (group, version) = r
                .group_version
                .split_once('/')
                .unwrap_or(("", &r.group_version));
            let yaml = format!("group: \"{group}\"\nkind: {}\nversion: {version}\n", r.kind);
            put_msg(
                &mut op,
                13,
                &named_any("x-kubernetes-group-version-kind", &yaml),
            );
            let mut item = Vec::new();
            put_msg(&mut item, 8, &op);
            let mut named = Vec::new();
            put_str(&mut named, 1, &path);
            put_msg(&mut named, 2, &item);
            put_msg(&mut paths, 2, &named);
        }
    }
    let mut defs = Vec::new();
    for (name, schema) in definitions() {
        let mut named = Vec::new();
        put_str(&mut named, 1, name);
        put_msg(&mut named, 2, &schema_pb(schema));
        put_msg(&mut defs, 1, &named);
    }
    let mut doc = Vec::new();
    put_str(&mut doc, 1, "2.0");
    put_msg(&mut doc, 2, &info);
    put_msg(&mut doc, 8, &paths);
    put_msg(&mut doc, 9, &defs);
    doc
}

/// A vendor extension: its value travels as YAML text in a `NamedAny`.
fn named_any(name: &str, yaml: &str) -> Vec<u8> {
    let mut any = Vec::new();
    put_str(&mut any, 2, yaml);
    let mut named = Vec::new();
    put_str(&mut named, 1, name);
    put_msg(&mut named, 2, &any);
    named
}

/// One `openapi_v2.Schema`: the fields the definitions use.
fn schema_pb(s: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(r) = s["$ref"].as_str() {
        put_str(&mut out, 1, r);
    }
    if let Some(f) = s["format"].as_str() {
        put_str(&mut out, 2, f);
    }
    if let Some(extra) = s.get("additionalProperties") {
        let mut item = Vec::new();
        put_msg(&mut item, 1, &schema_pb(extra));
        put_msg(&mut out, 21, &item);
    }
    if let Some(t) = s["type"].as_str() {
        let mut ty = Vec::new();
        put_str(&mut ty, 1, t);
        put_msg(&mut out, 22, &ty);
    }
    if let Some(items) = s.get("items") {
        let mut it = Vec::new();
        put_msg(&mut it, 1, &schema_pb(items));
        put_msg(&mut out, 23, &it);
    }
    if let Some(props) = s["properties"].as_object() {
        let mut p = Vec::new();
        for (name, sub) in props {
            let mut named = Vec::new();
            put_str(&mut named, 1, name);
            put_msg(&mut named, 2, &schema_pb(sub));
            put_msg(&mut p, 1, &named);
        }
        put_msg(&mut out, 25, &p);
    }
    if let Some(gvks) = s["x-kubernetes-group-version-kind"].as_array() {
        // Vendor extensions travel as YAML text in a NamedAny.
        let yaml: String = gvks
            .iter()
            .map(|g| {
                format!(
                    "- group: \"{}\"\n  kind: {}\n  version: {}\n",
                    g["group"].as_str().unwrap_or(""),
                    g["kind"].as_str().unwrap_or(""),
                    g["version"].as_str().unwrap_or("")
                )
            })
            .collect();
        put_msg(
            &mut out,
            31,
            &named_any("x-kubernetes-group-version-kind", &yaml),
        );
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_msg(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_varint(out, u64::from(tag << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_str(out: &mut Vec<u8>, tag: u32, s: &str) {
    put_msg(out, tag, s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_their_gvk_and_typed_properties() {
        let d = &definitions()["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            d["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert_eq!(d["properties"]["apiVersion"]["type"], "string");
        assert_eq!(
            d["properties"]["spec"]["$ref"],
            "#/definitions/io.k8s.api.apps.v1.DeploymentSpec"
        );
        let spec = &definitions()["io.k8s.api.apps.v1.DeploymentSpec"];
        assert_eq!(spec["properties"]["replicas"]["type"], "integer");
        let pod = &definitions()["io.k8s.api.core.v1.PodSpec"];
        assert_eq!(pod["properties"]["containers"]["type"], "array");
        let q = &definitions()["io.k8s.apimachinery.pkg.api.resource.Quantity"];
        assert_eq!(q["type"], "string");
        let md = &definitions()["io.x-k8s.cluster.v1beta1.MachineDeployment"];
        assert_eq!(
            md["x-kubernetes-group-version-kind"][0]["group"],
            "cluster.x-k8s.io"
        );
        // Every reference resolves.
        let text = serde_json::to_string(definitions()).unwrap();
        for r in text.split("\"#/definitions/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(definitions().contains_key(name), "{name}");
        }
    }

    #[test]
    fn strict_decoding_finds_unknown_fields_and_wrong_types() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}, "creationTimestamp": null},
            "spec": {"replicas": 2, "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "x", "imagePullPolcy": "Always",
                        "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}}});
        assert_eq!(
            check("apps/v1", "Deployment", &d).unwrap(),
            ["spec.template.spec.containers[0].imagePullPolcy"]
        );
        let mut bad = d.clone();
        bad["spec"]["replicas"] = json!("two");
        assert_eq!(
            check("apps/v1", "Deployment", &bad).unwrap_err(),
            "json: cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32"
        );
        bad["spec"]["replicas"] = json!(2);
        bad["spec"]["template"]["spec"]["containers"] = json!({"name": "c"});
        assert_eq!(
            check("apps/v1", "Deployment", &bad).unwrap_err(),
            "json: cannot unmarshal object into Go struct field PodSpec.spec.template.spec.containers of type []v1.Container"
        );
        // Custom resources have no schema here: anything goes.
        assert!(
            check(
                "cluster.x-k8s.io/v1beta1",
                "MachineDeployment",
                &json!({"spec": {"x": 1}})
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn the_protobuf_document_starts_as_gnostic_expects() {
        let pb = v2_protobuf("v1.34.2", &[]);
        // Field 1 (swagger), length 3, "2.0".
        assert_eq!(&pb[..5], b"\x0a\x032.0");
        let served = [Served {
            group_version: "apps/v1".into(),
            plural: "deployments",
            kind: "Deployment",
            namespaced: true,
            create_only: false,
        }];
        let doc = v3_document("v1.34.2", "apps/v1", &served);
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(patch["parameters"].to_string().contains("fieldValidation"));
        let v3 = doc.to_string();
        assert!(!v3.contains("#/definitions/"));
    }
}
