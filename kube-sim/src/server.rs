//! The HTTP side: routing Kubernetes REST paths to the store, list/watch wire format,
//! Status errors, bearer-token auth, and the per-request API faults.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::cluster_core::ClusterCore;
use crate::faults::reason_for;
use crate::patch::{self, PatchKind};
use crate::resources::{self, RESOURCES, ResourceType, idx};
use crate::selector::{FieldSelector, LabelSelector};
use crate::sim::DeleteOptions;
use crate::store::{ApiError, Change, EventType, Obj};
use crate::table::IncludeObject;
use crate::versions::{self, DRA_GROUP, MCS_GROUP};

/// Response body: whole JSON documents or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// Largest accepted request body (the API server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).expect("json")))
        .expect("response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    // The API server turns details.retryAfterSeconds into a Retry-After header.
    if let Some(secs) = e
        .details
        .as_ref()
        .and_then(|d| d["retryAfterSeconds"].as_u64())
    {
        r.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    r
}

/// Parsed query string.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let mut m = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            m.insert(dec(k), dec(v));
        }
        Self(m)
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

/// A resolved REST path.
#[derive(Debug)]
struct Target {
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn resolve(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let find = |plural: &str| resources::lookup(group, version, plural);
    let t = |res, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        res,
        ns: ns.map(String::from),
        name: name.map(String::from),
        sub: sub.map(String::from),
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..]
            if find(plural).is_some_and(|r| RESOURCES[r].namespaced) =>
        {
            let res = find(plural)?;
            match tail {
                [] => Some(t(res, Some(ns), None, None)),
                [name] => Some(t(res, Some(ns), Some(name), None)),
                [name, sub] => Some(t(res, Some(ns), Some(name), Some(sub))),
                _ => None,
            }
        }
        [plural] => Some(t(find(plural)?, None, None, None)),
        [plural, name] => Some(t(find(plural)?, None, Some(name), None)),
        [plural, name, sub] => Some(t(find(plural)?, None, Some(name), Some(sub))),
        _ => None,
    }
}

fn verb_of(method: &Method, t: &Target, q: &Query) -> &'static str {
    match (method.as_str(), t.name.is_some()) {
        ("GET", false) if q.flag("watch") => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// Handle one request for a cluster.
pub async fn handle(
    core: Arc<ClusterCore>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let q = Query::parse(req.uri().query());
    // Public endpoints, as on a real API server (system:public-info-viewer).
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => {
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full("ok"))
                .expect("response"));
        }
        "/version" => return Ok(json_response(200, &core.version_info())),
        _ => {}
    }
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|t| t == core.token);
    if !authorized {
        return Ok(error_response(&ApiError::new(
            401,
            "Unauthorized",
            "Unauthorized",
        )));
    }
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let addr = core.addr_string();
    if let ["openapi", ..] = segs.as_slice() {
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .unwrap_or("");
        return Ok(openapi(&core, &segs[1..], accept).unwrap_or_else(|| not_found_path(&path)));
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api"] => return Ok(json_response(200, &resources::core_versions(&addr))),
        ["apis"] => {
            let mut groups = resources::group_list();
            versions::filter_groups(&mut groups, DRA_GROUP, core.dra_versions());
            versions::filter_groups(&mut groups, MCS_GROUP, &core.mcs_versions());
            return Ok(json_response(200, &groups));
        }
        ["apis", g] if *g == DRA_GROUP || *g == MCS_GROUP => {
            let served = core.versions_of(g);
            let mut doc = resources::group(g).expect("served");
            versions::filter_groups(&mut doc, g, &served);
            return Ok(match served.is_empty() {
                true => not_found_path(&path),
                false => json_response(200, &doc),
            });
        }
        ["apis", g, v] if *g == DRA_GROUP || *g == MCS_GROUP => {
            if !core.versions_of(g).contains(v) {
                return Ok(not_found_path(&path));
            }
            let mut doc = resources::resource_list(g, versions::storage_of(g)).expect("served");
            doc["groupVersion"] = json!(format!("{g}/{v}"));
            return Ok(json_response(200, &doc));
        }
        ["api", "v1"] => {
            return Ok(json_response(
                200,
                &resources::resource_list("", "v1").expect("core"),
            ));
        }
        ["apis", g] => {
            return Ok(match resources::group(g) {
                Some(v) => json_response(200, &v),
                None => not_found_path(&path),
            });
        }
        ["apis", g, v] => {
            return Ok(match resources::resource_list(g, v) {
                Some(l) => json_response(200, &l),
                None => not_found_path(&path),
            });
        }
        ["apis", resources::AUTHZ_GROUP, "v1", kind] if req.method() == Method::POST => {
            let kind = kind.to_string();
            return Ok(match access_review(&core, &kind, req).await {
                Ok(v) => json_response(201, &v),
                Err(e) => error_response(&e),
            });
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Ok(not_found_path(&path)),
    };
    // DRA and MCS objects are stored in one version and shown in the version the client
    // asked for, if this cluster serves it.
    let versioned = group == DRA_GROUP || group == MCS_GROUP;
    let asked: Option<&'static str> = match versioned {
        true => match core.versions_of(group).into_iter().find(|v| *v == version) {
            Some(v) => Some(v),
            None => return Ok(not_found_path(&path)),
        },
        false => None,
    };
    let stored_version = match versioned {
        true => versions::storage_of(group),
        false => version,
    };
    // The pod proxy (`pods/NAME[:PORT]/proxy/PATH`): only `/metrics` of pods that serve it.
    if let (["namespaces", ns, "pods", pod_port, "proxy", tail @ ..], "") = (rest, group) {
        let faults = core.api_faults();
        if let Some(d) = faults.latency {
            tokio::time::sleep(d).await;
        }
        if let Some(code) = faults.error_for("get", "pods") {
            return Ok(error_response(&ApiError::new(
                code,
                reason_for(code),
                "injected fault (kube-sim): proxy pods",
            )));
        }
        let pod = pod_port.split(':').next().unwrap_or_default();
        let r = match (req.method() == Method::GET, tail) {
            (true, ["metrics"]) => core.read(|s| s.pod_metrics(ns, pod)),
            _ => Err(ApiError::new(
                404,
                "NotFound",
                format!("kube-sim serves only GET .../proxy/metrics (asked {path})"),
            )),
        };
        return Ok(match r {
            Ok(text) => Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(text))
                .expect("response"),
            Err(e) => error_response(&e),
        });
    }
    let Some(target) = resolve(group, stored_version, rest) else {
        return Ok(not_found_path(&path));
    };
    let verb = verb_of(req.method(), &target, &q);
    let plural = RESOURCES[target.res].plural;
    if core.rbac_deny.iter().any(|d| d == plural) {
        return Ok(error_response(&forbidden(verb, &target, group)));
    }
    let faults = core.api_faults();
    if let Some(d) = faults.latency {
        tokio::time::sleep(d).await;
    }
    if let Some(code) = faults.error_for(verb, RESOURCES[target.res].plural) {
        let e = ApiError::new(
            code,
            reason_for(code),
            format!(
                "injected fault (kube-sim): {verb} {}",
                RESOURCES[target.res].plural
            ),
        );
        return Ok(error_response(&e));
    }
    let table = match req
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
    {
        false => None,
        true => match IncludeObject::parse(q.get("includeObject")) {
            Ok(i) => Some(i),
            Err(e) => return Ok(error_response(&ApiError::bad_request(e))),
        },
    };
    let mut content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let method = req.method().clone();
    let mut body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return Ok(error_response(&e)),
    };
    // kubectl 1.32+ writes built-in types in protobuf; custom resources are JSON only, and
    // a real server answers 415 for them.
    if crate::protobuf::is_protobuf(&content_type) && !body.is_empty() {
        if RESOURCES[target.res].is_custom() {
            return Ok(error_response(&ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type}: {} are custom resources)",
                    RESOURCES[target.res].plural
                ),
            )));
        }
        match crate::protobuf::decode(&body) {
            Ok(obj) => {
                body = Bytes::from(serde_json::to_vec(&obj).expect("json"));
                content_type = "application/json".into();
            }
            Err(e) => {
                return Ok(error_response(&ApiError::bad_request(format!(
                    "the protobuf request body cannot be decoded: {e}"
                ))));
            }
        }
    }
    let converted = asked.filter(|v| *v != stored_version);
    if let Some(v) = converted
        && content_type.starts_with("application/json")
        && let Ok(mut obj) = serde_json::from_slice::<Value>(&body)
    {
        versions::to_storage_of(&mut obj, group, v);
        body = Bytes::from(serde_json::to_vec(&obj).expect("json"));
    }
    let resp = match dispatch(
        &core,
        &method,
        verb,
        &target,
        &q,
        &body,
        &content_type,
        table,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    let group: &'static str = if group == MCS_GROUP {
        MCS_GROUP
    } else {
        DRA_GROUP
    };
    Ok(match converted {
        Some(v) if table.is_none() => in_version(resp, group, v),
        _ => resp,
    })
}

/// A response whose documents (one per frame: a whole body, or one watch event) are
/// converted for a client of `version`.
fn in_version(resp: Response<Body>, group: &'static str, version: &'static str) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let body = body.map_frame(move |f| {
        f.map_data(|d| {
            let Ok(mut doc) = serde_json::from_slice::<Value>(&d) else {
                return d;
            };
            versions::convert_doc(&mut doc, group, version);
            let mut out = serde_json::to_vec(&doc).expect("json");
            if d.ends_with(b"\n") {
                out.push(b'\n');
            }
            Bytes::from(out)
        })
    });
    Response::from_parts(parts, BodyExt::boxed(body))
}

/// `/openapi/v2` (gnostic protobuf when asked, as kubectl does, else JSON) and `/openapi/v3`
/// with a document per served group version.
fn openapi(core: &ClusterCore, rest: &[&str], accept: &str) -> Option<Response<Body>> {
    use crate::protobuf::openapi as oa;
    match rest {
        ["v2"] if accept.contains(oa::V2_PROTOBUF) => Some(
            Response::builder()
                .header(header::CONTENT_TYPE, oa::V2_PROTOBUF_CONTENT_TYPE)
                .body(full(oa::v2_protobuf(&core.version, &served(core))))
                .expect("response"),
        ),
        ["v2"] => Some(json_response(
            200,
            &oa::v2_json(&core.version, &served(core)),
        )),
        ["v3"] => Some(json_response(200, &oa::v3_paths(&served(core)))),
        ["v3", tail @ ..] => {
            let gv = match tail {
                ["api", "v1"] => "v1".to_string(),
                ["apis", g, v] => format!("{g}/{v}"),
                _ => return None,
            };
            let served = served(core);
            served
                .iter()
                .any(|r| r.group_version == gv)
                .then(|| json_response(200, &oa::v3_document(&core.version, &gv, &served)))
        }
        _ => None,
    }
}

/// Every resource this cluster serves, in each served version, as discovery lists them.
fn served(core: &ClusterCore) -> Vec<crate::protobuf::openapi::Served> {
    use crate::protobuf::openapi::Served;
    let mut out = Vec::new();
    for r in RESOURCES.iter() {
        let versions: Vec<&str> = match r.group {
            g if g == DRA_GROUP || g == MCS_GROUP => core.versions_of(g),
            _ => vec![r.version],
        };
        for v in versions {
            out.push(Served {
                group_version: match r.group {
                    "" => v.to_string(),
                    g => format!("{g}/{v}"),
                },
                plural: r.plural,
                kind: r.kind,
                namespaced: r.namespaced,
                create_only: false,
            });
        }
    }
    for (plural, kind) in [
        ("selfsubjectaccessreviews", "SelfSubjectAccessReview"),
        ("selfsubjectrulesreviews", "SelfSubjectRulesReview"),
    ] {
        out.push(Served {
            group_version: format!("{}/v1", resources::AUTHZ_GROUP),
            plural,
            kind,
            namespaced: false,
            create_only: true,
        });
    }
    out
}

/// `SelfSubjectAccessReview` and `SelfSubjectRulesReview` (`kubectl auth can-i [--list]`),
/// answered from what the token may do: everything but the scenario's `rbac_deny`.
async fn access_review(
    core: &Arc<ClusterCore>,
    kind: &str,
    req: Request<Incoming>,
) -> Result<Value, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = read_body(req).await?;
    let review = if crate::protobuf::is_protobuf(&content_type) {
        crate::protobuf::decode(&body).map_err(|e| {
            ApiError::bad_request(format!("the protobuf request body cannot be decoded: {e}"))
        })?
    } else {
        parse_json(&body)?
    };
    let denied = |plural: &str| core.rbac_deny.iter().any(|d| d == plural);
    let status = match kind {
        "selfsubjectaccessreviews" => {
            let plural = review["spec"]["resourceAttributes"]["resource"]
                .as_str()
                .unwrap_or("");
            let allowed = !denied(plural);
            let mut s = json!({"allowed": allowed});
            if !allowed {
                s["reason"] = json!(format!(
                    "kube-sim: the scenario's rbac_deny leaves out {plural}"
                ));
            }
            s
        }
        "selfsubjectrulesreviews" => {
            let mut by_group: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for r in RESOURCES.iter().filter(|r| !denied(r.plural)) {
                by_group.entry(r.group).or_default().push(r.plural);
            }
            let rules: Vec<Value> = by_group
                .iter()
                .map(|(g, rs)| json!({"verbs": ["*"], "apiGroups": [g], "resources": rs}))
                .collect();
            json!({
                "resourceRules": rules,
                "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs":
                    ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/version"]}],
                "incomplete": false,
            })
        }
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let kind_name = if kind == "selfsubjectaccessreviews" {
        "SelfSubjectAccessReview"
    } else {
        "SelfSubjectRulesReview"
    };
    Ok(json!({
        "kind": kind_name,
        "apiVersion": format!("{}/v1", resources::AUTHZ_GROUP),
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    }))
}

/// The 403 a real API server sends a token whose RBAC role leaves this resource out.
fn forbidden(verb: &str, t: &Target, group: &str) -> ApiError {
    let r = &RESOURCES[t.res];
    let scope = match &t.ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let qualified = match group {
        "" => r.plural.to_string(),
        g => format!("{}.{g}", r.plural),
    };
    let mut e = ApiError::new(
        403,
        "Forbidden",
        format!(
            "{qualified} is forbidden: User \"system:serviceaccount:flotilla:flotilla-agent\" cannot {verb} resource \"{}\" in API group \"{group}\" {scope}",
            r.plural
        ),
    );
    e.details = Some(json!({"group": group, "kind": r.plural}));
    e
}

fn not_found_path(path: &str) -> Response<Body> {
    error_response(&ApiError::new(
        404,
        "NotFound",
        format!("the server could not find the requested resource ({path})"),
    ))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(_) => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body exceeds the limit of {MAX_BODY} bytes"),
        )),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    core: &Arc<ClusterCore>,
    method: &Method,
    verb: &str,
    t: &Target,
    q: &Query,
    body: &Bytes,
    content_type: &str,
    table: Option<IncludeObject>,
) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    if !r.namespaced && t.ns.is_some() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("{} is not namespaced", r.plural),
        ));
    }
    let ns = t.ns.clone().unwrap_or_default();
    let dry_run = q.get("dryRun").is_some();
    match (t.sub.as_deref(), t.name.as_deref()) {
        (None, None) => match verb {
            "list" => list(core, t, q, table),
            "watch" => watch(core, t, q, table).await,
            "create" => {
                let obj = parse_json(body)?;
                let warnings = check_fields(r, &obj, q)?;
                if dry_run {
                    return Ok(with_warnings(json_response(201, &obj), &warnings));
                }
                let created = core.write(|s| s.create(t.res, &ns, obj))?;
                Ok(with_warnings(json_response(201, &created), &warnings))
            }
            "deletecollection" => {
                let (labels, fields) = selectors(r, q)?;
                let victims: Vec<(String, String)> = core.read(|s| {
                    s.store
                        .iter(t.res, t.ns.as_deref(), None)
                        .filter(|o| labels.matches(o) && fields.matches(o))
                        .map(|o| {
                            (
                                o["metadata"]["namespace"]
                                    .as_str()
                                    .unwrap_or("")
                                    .to_string(),
                                o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                });
                let opts = delete_options(body, q)?;
                let mut items = Vec::new();
                for (ons, oname) in victims {
                    if let Ok(o) =
                        core.write(|s| s.delete_object(t.res, &ons, &oname, &opts, dry_run))
                    {
                        items.push((*o).clone());
                    }
                }
                Ok(json_response(
                    200,
                    &list_doc(r, core.read(|s| s.store.revision()), items, None),
                ))
            }
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported on a collection"),
            )),
        },
        (None, Some(name)) => match verb {
            "get" => {
                let o = core.read(|s| s.store.get(t.res, &ns, name))?;
                if let Some(include) = table {
                    return Ok(json_response(
                        200,
                        &crate::table::table(
                            r,
                            std::slice::from_ref(&o),
                            &o["metadata"]["resourceVersion"],
                            None,
                            include,
                        ),
                    ));
                }
                Ok(json_response(200, &o))
            }
            "update" => {
                let obj = parse_json(body)?;
                let warnings = check_fields(r, &obj, q)?;
                let o = core.write(|s| s.store.update(t.res, &ns, name, obj, false))?;
                Ok(with_warnings(json_response(200, &o), &warnings))
            }
            "patch" => {
                let (o, warnings) = patch_object(
                    core,
                    t.res,
                    &ns,
                    name,
                    content_type,
                    body,
                    false,
                    dry_run,
                    q,
                )?;
                Ok(with_warnings(json_response(200, &o), &warnings))
            }
            "delete" => {
                let opts = delete_options(body, q)?;
                let o = core.write(|s| s.delete_object(t.res, &ns, name, &opts, dry_run))?;
                Ok(json_response(200, &o))
            }
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported on an object"),
            )),
        },
        (Some("status"), Some(name)) if r.has_status => match verb {
            "get" => {
                let o = core.read(|s| s.store.get(t.res, &ns, name))?;
                Ok(json_response(200, &o))
            }
            "update" => {
                let obj = parse_json(body)?;
                let warnings = check_fields(r, &obj, q)?;
                let o = core.write(|s| s.store.update(t.res, &ns, name, obj, true))?;
                Ok(with_warnings(json_response(200, &o), &warnings))
            }
            "patch" => {
                let (o, warnings) =
                    patch_object(core, t.res, &ns, name, content_type, body, true, dry_run, q)?;
                Ok(with_warnings(json_response(200, &o), &warnings))
            }
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "status supports get, update and patch",
            )),
        },
        (Some("scale"), Some(name)) if r.has_scale() => {
            scale(core, verb, t.res, &ns, name, body, content_type, dry_run)
        }
        (Some("eviction"), Some(name)) if t.res == idx::PODS && verb == "create" => {
            let ev = parse_json(body)?;
            let dry = dry_run
                || ev["deleteOptions"]["dryRun"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty());
            let opts = DeleteOptions::parse(&ev["deleteOptions"], None)?;
            core.write(|s| s.evict(&ns, name, &opts, dry))?;
            Ok(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        _ => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// An object's `autoscaling/v1` Scale: `spec.replicas`, and the observed count and selector.
fn scale_of(o: &Value) -> Value {
    let selector = match o["status"]["selector"].as_str() {
        // Cluster API publishes its selector in status, as the CRD's labelSelectorPath says.
        Some(s) => s.to_string(),
        None => LabelSelector::from_object(&o["spec"]["selector"])
            .unwrap_or_default()
            .to_string(),
    };
    let m = &o["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": o["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

/// GET, PUT or PATCH `.../NAME/scale`: the Scale is read from and written to `spec.replicas`.
#[allow(clippy::too_many_arguments)]
fn scale(
    core: &Arc<ClusterCore>,
    verb: &str,
    res: usize,
    ns: &str,
    name: &str,
    body: &Bytes,
    content_type: &str,
    dry_run: bool,
) -> Result<Response<Body>, ApiError> {
    if verb == "get" {
        let o = core.read(|s| s.store.get(res, ns, name))?;
        return Ok(json_response(200, &scale_of(&o)));
    }
    let patch_kind = match verb {
        "update" => None,
        "patch" => Some(PatchKind::from_content_type(content_type).ok_or_else(|| {
            ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type})"))
        })?),
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "scale supports get, update and patch",
            ));
        }
    };
    let p = parse_json(body)?;
    let o = core.write(|s| {
        let cur = s.store.get(res, ns, name)?;
        let mut want = scale_of(&cur);
        match patch_kind {
            None => want = p.clone(),
            Some(k) => {
                patch::apply(k, &mut want, &p).map_err(|e| ApiError::new(422, "Invalid", e))?
            }
        }
        if let Some(rv) = want["metadata"]["resourceVersion"].as_str()
            && cur["metadata"]["resourceVersion"] != rv
        {
            return Err(ApiError::conflict(res, name));
        }
        let replicas = match &want["spec"]["replicas"] {
            Value::Null => 0,
            v => v.as_i64().filter(|r| *r >= 0).ok_or_else(|| {
                ApiError::invalid(
                    res,
                    name,
                    "spec.replicas",
                    "must be greater than or equal to 0",
                )
            })?,
        };
        let mut doc = (*cur).clone();
        doc["spec"]["replicas"] = json!(replicas);
        if dry_run {
            return Ok(Arc::new(doc));
        }
        s.store.update(res, ns, name, doc, false)
    })?;
    Ok(json_response(200, &scale_of(&o)))
}

/// PATCH an object (or only its status): apply the patch to the stored object under the lock,
/// then write it with the usual update rules.
#[allow(clippy::too_many_arguments)]
fn patch_object(
    core: &Arc<ClusterCore>,
    res: usize,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &Bytes,
    status_only: bool,
    dry_run: bool,
    q: &Query,
) -> Result<(Obj, Vec<String>), ApiError> {
    let kind = PatchKind::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json (got {content_type})"
            ),
        )
    })?;
    // Custom resources have no patch metadata: a real server refuses strategic merge.
    if kind == PatchKind::Strategic && RESOURCES[res].is_custom() {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        ));
    }
    let p = parse_json(body)?;
    core.write(|s| {
        let cur = s.store.get(res, ns, name)?;
        let mut doc = (*cur).clone();
        patch::apply(kind, &mut doc, &p).map_err(|e| ApiError::new(422, "Invalid", e))?;
        // A patch that does not name a resourceVersion must not fail on concurrent writes.
        if p["metadata"]["resourceVersion"].is_null() && kind != PatchKind::Json {
            doc["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
        }
        if doc["metadata"]["name"] != cur["metadata"]["name"] {
            return Err(ApiError::invalid(
                res,
                name,
                "metadata.name",
                "field is immutable",
            ));
        }
        let warnings = check_fields(&RESOURCES[res], &doc, q)?;
        if dry_run {
            return Ok((Arc::new(doc), warnings));
        }
        Ok((s.store.update(res, ns, name, doc, status_only)?, warnings))
    })
}

/// Strict decoding of a written object, as `fieldValidation` asks: a value of the wrong type
/// is always a 400; unknown fields are a 400 under `Strict`, warnings under `Warn` (the
/// default) and nothing under `Ignore`.
fn check_fields(r: &ResourceType, obj: &Value, q: &Query) -> Result<Vec<String>, ApiError> {
    let mode = q.get("fieldValidation").unwrap_or("Warn");
    if !matches!(mode, "Strict" | "Warn" | "Ignore") {
        return Err(ApiError::bad_request(format!(
            "fieldValidation: Unsupported value: \"{mode}\": supported values: \"Ignore\", \"Warn\", \"Strict\""
        )));
    }
    let undecodable = |why: String| {
        ApiError::bad_request(format!(
            "{kind} in version \"{v}\" cannot be handled as a {kind}: {why}",
            kind = r.kind,
            v = r.version
        ))
    };
    let unknown =
        crate::protobuf::openapi::check(&r.api_version(), r.kind, obj).map_err(undecodable)?;
    let messages: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match mode {
        "Strict" if !messages.is_empty() => Err(undecodable(format!(
            "strict decoding error: {}",
            messages.join(", ")
        ))),
        "Warn" => Ok(messages),
        _ => Ok(Vec::new()),
    }
}

/// A response with `Warning` headers, as the API server sends them (code 299).
fn with_warnings(mut resp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

/// The `DeleteOptions` of a DELETE: its body (if any) and `gracePeriodSeconds` in the query.
fn delete_options(body: &Bytes, q: &Query) -> Result<DeleteOptions, ApiError> {
    let body = if body.is_empty() {
        Value::Null
    } else {
        parse_json(body)?
    };
    DeleteOptions::parse(&body, q.get("gracePeriodSeconds"))
}

fn selectors(
    r: &'static ResourceType,
    q: &Query,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or(""), |f| {
        r.supports_field(f)
    })
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn list_doc(r: &ResourceType, rv: u64, items: Vec<Value>, cont: Option<String>) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta, "items": items})
}

fn list(
    core: &Arc<ClusterCore>,
    t: &Target,
    q: &Query,
    table: Option<IncludeObject>,
) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    let (labels, fields) = selectors(r, q)?;
    let limit: usize = match q.get("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit: invalid value {l:?}")))?,
        None => 0,
    };
    // Continue tokens are "<rv>/<namespace>/<name>" of the last item returned.
    let after = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let mut parts = c.splitn(3, '/');
            let (rv, ns, name) = (parts.next(), parts.next(), parts.next());
            match (rv.and_then(|r| r.parse::<u64>().ok()), ns, name) {
                (Some(rv), Some(ns), Some(name)) => Some((rv, ns.to_string(), name.to_string())),
                _ => return Err(ApiError::bad_request("continue: invalid continue token")),
            }
        }
        None => None,
    };
    let (rv, items, cont) = core.read(|s| {
        if let Some((rv, _, _)) = &after
            && *rv < s.store.compacted_through()
        {
            return Err(ApiError::new(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
        }
        let rv = after.as_ref().map_or(s.store.revision(), |a| a.0);
        let mut items: Vec<(Obj, Bytes)> = Vec::new();
        let mut cont = None;
        let iter = s
            .store
            .iter_json(t.res, t.ns.as_deref(), after.as_ref().map(|(_, n, m)| (n.as_str(), m.as_str())))
            .filter(|(o, _)| labels.matches(o) && fields.matches(o));
        for (o, j) in iter {
            if limit > 0 && items.len() == limit {
                let last = &items.last().expect("limit > 0").0;
                cont = Some(format!(
                    "{rv}/{}/{}",
                    last["metadata"]["namespace"].as_str().unwrap_or(""),
                    last["metadata"]["name"].as_str().unwrap_or("")
                ));
                break;
            }
            items.push((o.clone(), j.clone()));
        }
        Ok((rv, items, cont))
    })?;
    if let Some(include) = table {
        return Ok(json_response(
            200,
            &crate::table::table(
                r,
                &items.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>(),
                &json!(rv.to_string()),
                cont.as_deref(),
                include,
            ),
        ));
    }
    // Serialise straight from the shared objects; no deep clone of every item.
    let mut out = Vec::with_capacity(items.len() * 1024);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    out.extend_from_slice(
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":",
            r.kind,
            r.api_version()
        )
        .as_bytes(),
    );
    serde_json::to_writer(&mut out, &meta).expect("json");
    out.extend_from_slice(b",\"items\":[");
    for (i, (_, o)) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(o);
    }
    out.extend_from_slice(b"]}");
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(out))
        .expect("response"))
}

/// What a watch sends for one change, after namespace and selector filtering.
fn filter_change(
    c: &Change,
    res: usize,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<EventType> {
    if c.resource != res {
        return None;
    }
    if ns.is_some_and(|ns| c.namespace != ns) {
        return None;
    }
    if labels.is_empty() && fields.0.is_empty() {
        return Some(c.kind);
    }
    // Only selecting watches pay for parsing; history and fan-out keep bytes.
    let sel = |b: &Bytes| {
        serde_json::from_slice::<Value>(b).is_ok_and(|o| labels.matches(&o) && fields.matches(&o))
    };
    let now = sel(&c.object);
    let before = c.previous.as_ref().is_some_and(sel);
    // Objects entering or leaving the selection look like additions and deletions.
    match c.kind {
        EventType::Added => now.then_some(EventType::Added),
        EventType::Deleted => before.then_some(EventType::Deleted),
        EventType::Modified => match (before, now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
    }
}

fn event_line(kind: &str, object: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(object.len() + 32);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn value_line(kind: &str, object: &Value) -> Bytes {
    event_line(kind, &serde_json::to_vec(object).expect("json"))
}

fn bookmark(r: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    value_line(
        "BOOKMARK",
        &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": meta}),
    )
}

/// A watch event's line; with `as=Table`, its object printed as a one-row Table (the first
/// such event of the watch carries the columns).
struct EventEncoder {
    r: &'static ResourceType,
    table: Option<IncludeObject>,
    first: bool,
}

impl EventEncoder {
    fn line(&mut self, kind: &str, object: &[u8]) -> Bytes {
        let Some(include) = self.table else {
            return event_line(kind, object);
        };
        let Ok(o) = serde_json::from_slice::<Value>(object) else {
            return event_line(kind, object);
        };
        let t = crate::table::watch_table(self.r, &o, self.first, include);
        self.first = false;
        value_line(kind, &t)
    }
}

async fn watch(
    core: &Arc<ClusterCore>,
    t: &Target,
    q: &Query,
    table: Option<IncludeObject>,
) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    let (labels, fields) = selectors(r, q)?;
    let bookmarks = q.flag("allowWatchBookmarks");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let rv_param = q.get("resourceVersion").unwrap_or("");
    let send_initial = q.flag("sendInitialEvents") || rv_param.is_empty() || rv_param == "0";
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let res = t.res;
    let ns = t.ns.clone();
    // Snapshot (if asked) and subscription are taken under one lock so nothing falls between.
    let start = core.read(|s| -> Result<_, ApiError> {
        if send_initial {
            let items: Vec<Bytes> = s
                .store
                .iter_json(res, ns.as_deref(), None)
                .filter(|(o, _)| labels.matches(o) && fields.matches(o))
                .map(|(_, j)| j.clone())
                .collect();
            Ok((s.store.revision(), items, Vec::new(), s.store.subscribe()))
        } else {
            let from: u64 = rv_param.parse().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion: invalid value {rv_param:?}"))
            })?;
            match s.store.watch_from(from) {
                Ok((backlog, rx)) => Ok((from, Vec::new(), backlog, rx)),
                Err(e) => Err(e),
            }
        }
    });
    let shutdown = core.shutdown.clone();
    let bookmark_every = core.bookmark_interval;
    let explicit_initial = q.flag("sendInitialEvents");
    match start {
        Err(e) if e.code == 410 => {
            // Real API servers answer 200 and send the 410 as an ERROR event.
            let _ = tx.try_send(value_line("ERROR", &e.to_status()));
        }
        Err(e) => return Err(e),
        Ok((start_rv, initial, backlog, mut sub)) => {
            let mut enc = EventEncoder {
                r,
                table,
                first: true,
            };
            tokio::spawn(async move {
                let mut last_rv = start_rv;
                for o in &initial {
                    if tx.send(enc.line("ADDED", o)).await.is_err() {
                        return;
                    }
                }
                if explicit_initial && bookmarks {
                    let _ = tx.send(bookmark(r, start_rv, true)).await;
                }
                for c in &backlog {
                    last_rv = c.rv;
                    if let Some(kind) = filter_change(c, res, ns.as_deref(), &labels, &fields)
                        && tx.send(enc.line(kind.as_str(), &c.object)).await.is_err()
                    {
                        return;
                    }
                }
                let deadline = tokio::time::sleep(timeout);
                tokio::pin!(deadline);
                let mut tick = tokio::time::interval(bookmark_every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = &mut deadline => return,
                        _ = shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        _ = tick.tick(), if bookmarks => {
                            if tx.send(bookmark(r, last_rv, false)).await.is_err() { return; }
                        }
                        msg = sub.recv() => match msg {
                            Ok(c) => {
                                if c.rv <= last_rv { continue; }
                                last_rv = c.rv;
                                if let Some(kind) = filter_change(&c, res, ns.as_deref(), &labels, &fields)
                                    && tx.send(enc.line(kind.as_str(), &c.object)).await.is_err()
                                {
                                    return;
                                }
                            }
                            // A watcher that fell behind is closed; it resumes from its last
                            // resourceVersion (or relists after a 410), like with a real server.
                            Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
                        },
                    }
                }
            });
        }
    }
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response"))
}

/// Accepts connections while the cluster is reachable; the `unreachable` fault closes the
/// listener (and every open connection) until it is cleared.
pub(crate) async fn serve(core: Arc<ClusterCore>, first: TcpListener) {
    let mut listener = Some(first);
    let mut reachable = core.reachable.subscribe();
    loop {
        if !*reachable.borrow_and_update() {
            tracing::info!("API server unreachable (fault injected)");
            tokio::select! {
                _ = core.shutdown.cancelled() => return,
                _ = reachable.changed() => continue,
            }
        }
        let l = match listener.take() {
            Some(l) => l,
            None => match TcpListener::bind(core.addr).await {
                Ok(l) => {
                    tracing::info!("API server reachable again");
                    l
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rebinding the API port failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        loop {
            tokio::select! {
                _ = core.shutdown.cancelled() => return,
                r = reachable.changed() => {
                    if r.is_err() || !*reachable.borrow() { break; }
                }
                accepted = l.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(connection(core.clone(), stream, core.reachable.subscribe()).in_current_span());
                    }
                    Err(e) => tracing::debug!(error = %e, "accept failed"),
                },
            }
        }
    }
}

async fn connection(core: Arc<ClusterCore>, stream: TcpStream, reachable: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    match core.tls.clone() {
        Some(tls) => {
            let accepted = tokio::select! {
                a = tls.acceptor.accept(stream) => a,
                _ = core.shutdown.cancelled() => return,
            };
            match accepted {
                Ok(s) => serve_io(core, s, reachable).await,
                Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
            }
        }
        None => serve_io(core, stream, reachable).await,
    }
}

async fn serve_io<I>(core: Arc<ClusterCore>, io: I, mut reachable: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let c = core.clone();
    let svc = hyper::service::service_fn(move |req| handle(c.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    // Dropping the connection future closes the socket: that is how "unreachable" cuts watches.
    tokio::select! {
        _ = conn => {}
        _ = core.shutdown.cancelled() => {}
        _ = reachable.wait_for(|r| !*r) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_like_the_api_server() {
        let t = resolve(
            "",
            "v1",
            &["namespaces", "default", "pods", "p", "eviction"],
        )
        .unwrap();
        assert_eq!(
            (t.res, t.ns.as_deref(), t.name.as_deref(), t.sub.as_deref()),
            (idx::PODS, Some("default"), Some("p"), Some("eviction"))
        );
        let t = resolve("", "v1", &["namespaces", "default"]).unwrap();
        assert_eq!(
            (t.res, t.name.as_deref()),
            (idx::NAMESPACES, Some("default"))
        );
        let t = resolve("", "v1", &["namespaces", "default", "status"]).unwrap();
        assert_eq!((t.res, t.sub.as_deref()), (idx::NAMESPACES, Some("status")));
        let t = resolve("", "v1", &["pods"]).unwrap();
        assert_eq!((t.res, t.ns), (idx::PODS, None));
        assert!(resolve("", "v1", &["widgets"]).is_none());
        let t = resolve("resource.k8s.io", "v1", &["resourceslices", "s"]).unwrap();
        assert_eq!(t.res, idx::RESOURCESLICES);
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let fields = FieldSelector::parse("status.phase!=Succeeded", |_| true).unwrap();
        let labels = LabelSelector::default();
        let before = Bytes::from(r#"{"metadata":{"namespace":"d"},"status":{"phase":"Running"}}"#);
        let after = Bytes::from(r#"{"metadata":{"namespace":"d"},"status":{"phase":"Succeeded"}}"#);
        let c = Change {
            rv: 2,
            resource: idx::PODS,
            kind: EventType::Modified,
            namespace: "d".into(),
            object: after.clone(),
            previous: Some(before.clone()),
        };
        assert_eq!(
            filter_change(&c, idx::PODS, None, &labels, &fields),
            Some(EventType::Deleted)
        );
        let c = Change {
            rv: 3,
            resource: idx::PODS,
            kind: EventType::Modified,
            namespace: "d".into(),
            object: before,
            previous: Some(after),
        };
        assert_eq!(
            filter_change(&c, idx::PODS, Some("d"), &labels, &fields),
            Some(EventType::Added)
        );
        assert_eq!(
            filter_change(&c, idx::PODS, Some("other"), &labels, &fields),
            None
        );
        assert_eq!(filter_change(&c, idx::NODES, None, &labels, &fields), None);
    }
}
