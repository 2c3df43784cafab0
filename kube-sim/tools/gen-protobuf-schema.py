#!/usr/bin/env python3
"""Write kube-sim/src/protobuf/schema.rs: the protobuf field tags and JSON names of the
built-in Kubernetes types kube-sim decodes (decision 0018).

Tags and wire kinds come from the k8s-pb crate's generated prost structs; JSON field names
from the k8s-openapi crate's serde field tables. Both crates are read from the local cargo
registry: k8s-openapi is a workspace dependency (`cargo fetch`); k8s-pb is not, and
`cargo info k8s-pb@0.9.0` downloads it. Usage:

    python3 kube-sim/tools/gen-protobuf-schema.py > kube-sim/src/protobuf/schema.rs
"""

import glob
import os
import re
import sys

REGISTRY = os.path.expanduser("~/.cargo/registry/src")
PB = sorted(glob.glob(f"{REGISTRY}/*/k8s-pb-0.9.0"))[-1]
OPENAPI = sorted(glob.glob(f"{REGISTRY}/*/k8s-openapi-0.29.0"))[-1]
# The newest Kubernetes version k8s-openapi carries that k8s-pb also knows; older fields
# are looked up in earlier versions, newer in later ones.
OPENAPI_VERSIONS = ["v1_35", "v1_34", "v1_36", "v1_33", "v1_37"]

# The groups kube-sim serves, plus the request-only types its subresources take.
ROOT_MODULES = [
    "api.core.v1", "api.apps.v1", "api.policy.v1", "api.discovery.v1",
    "api.coordination.v1", "api.events.v1", "api.resource.v1", "api.resource.v1beta1",
    "api.resource.v1beta2", "api.autoscaling.v1", "api.authorization.v1",
]
EXTRA_ROOTS = [
    ("apimachinery.pkg.apis.meta.v1", "DeleteOptions", "meta.k8s.io/v1"),
    ("api.policy.v1", "Eviction", "policy/v1"),
    ("api.autoscaling.v1", "Scale", "autoscaling/v1"),
    ("api.authorization.v1", "SelfSubjectAccessReview", "authorization.k8s.io/v1"),
    ("api.authorization.v1", "SelfSubjectRulesReview", "authorization.k8s.io/v1"),
]

# Messages with their own JSON form (a string, a timestamp...), converted by kube-sim's decoder.
SPECIAL = {
    "apimachinery.pkg.api.resource.Quantity", "apimachinery.pkg.apis.meta.v1.Time",
    "apimachinery.pkg.apis.meta.v1.MicroTime", "apimachinery.pkg.apis.meta.v1.Duration",
    "apimachinery.pkg.apis.meta.v1.FieldsV1", "apimachinery.pkg.runtime.RawExtension",
    "apimachinery.pkg.util.intstr.IntOrString", "api.authorization.v1.ExtraValue",
}

SCALARS = {"string": "Str", "int32": "I32", "int64": "I64", "bool": "Bool", "double": "F64"}


def snake_norm(name):
    name = name.removeprefix("r#")
    return name.rstrip("_")


def fkey(name):
    """prost and k8s-openapi split acronyms differently (pod_cid_rs, pod_cidrs)."""
    return snake_norm(name).replace("_", "").lower()


def parse_pb():
    """message full name -> [(tag, rust_field, kind, repeated, type_ref)], roots."""
    messages = {}
    roots = []
    for path in glob.glob(f"{PB}/src/**/mod.rs", recursive=True):
        rel = os.path.relpath(os.path.dirname(path), f"{PB}/src")
        module = rel.replace(os.sep, ".")
        lines = open(path).read().split("\n")
        i = 0
        current = None
        while i < len(lines):
            line = lines[i]
            m = re.match(r"pub struct (\w+) \{", line)
            if m:
                current = f"{module}.{m.group(1)}"
                messages[current] = []
            elif line.startswith("}"):
                current = None
            m = re.match(r"\s*#\[prost\((.*)\)\]\s*$", line)
            if m and current:
                attr = m.group(1)
                tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
                j = i + 1
                decl = ""
                while True:
                    decl += lines[j].strip()
                    if decl.endswith(",") and decl.count("<") == decl.count(">"):
                        break
                    j += 1
                fm = re.match(r"pub ([\w#]+):\s*(.*),$", decl)
                field, ty = fm.group(1), fm.group(2)
                repeated = "repeated" in attr
                if attr.startswith("btree_map"):
                    kv = re.search(r'btree_map = "string, (\w+)"', attr).group(1)
                    if kv == "message":
                        inner = ty.split(",", 1)[1].rsplit(">", 1)[0].strip().rstrip(",")
                        messages[current].append((tag, field, "MapMsg", False, resolve(module, inner)))
                    elif kv == "bytes":
                        messages[current].append((tag, field, "MapBytes", False, None))
                    else:
                        messages[current].append((tag, field, "MapStr", False, None))
                elif attr.startswith("message"):
                    inner = re.sub(r"^::core::option::Option<|^::prost::alloc::vec::Vec<", "", ty)
                    inner = re.sub(r"^::prost::alloc::boxed::Box<", "", inner)
                    inner = inner.rstrip(">").rstrip(",")
                    messages[current].append((tag, field, "Msg", repeated, resolve(module, inner)))
                elif attr.startswith("bytes"):
                    messages[current].append((tag, field, "Bytes", repeated, None))
                else:
                    kind = SCALARS[attr.split(",")[0]]
                    messages[current].append((tag, field, kind, repeated, None))
                i = j
            m = re.match(r"impl crate::Resource for (\w+) \{", line)
            if m and module in ROOT_MODULES:
                api = re.search(r'API_VERSION: &\'static str = "([^"]+)"', lines[i + 1]).group(1)
                kind = re.search(r'KIND: &\'static str = "([^"]+)"', lines[i + 4]).group(1)
                roots.append((api, kind, f"{module}.{m.group(1)}"))
            i += 1
    for module, name, api in EXTRA_ROOTS:
        roots.append((api, name, f"{module}.{name}"))
    return messages, roots


def resolve(module, ty):
    """A prost type path relative to `module`, as a full message name."""
    parts = module.split(".")
    segs = ty.split("::")
    while segs and segs[0] == "super":
        parts.pop()
        segs.pop(0)
    return ".".join(parts + segs)


def parse_openapi():
    """(module, lowercased struct) -> {rust_field: json}; and one global fallback."""
    names = {}
    for version in reversed(OPENAPI_VERSIONS):
        base = f"{OPENAPI}/src/{version}"
        for path in glob.glob(f"{base}/**/*.rs", recursive=True):
            rel = os.path.relpath(os.path.dirname(path), base).replace(os.sep, ".")
            text = open(path).read()
            for sm in re.finditer(r"pub struct (\w+) \{", text):
                key = (rel, sm.group(1).lower())
                table = names.setdefault(key, {})
                for fm in re.finditer(r'"([^"]+)" => Field::Key_(\w+),', text):
                    table[fkey(fm.group(2))] = fm.group(1)
    return names


def camel(field):
    head, *rest = snake_norm(field).split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def main():
    messages, roots = parse_pb()
    json_names = parse_openapi()
    # The closure of the roots.
    order = []
    seen = set()
    stack = [r[2] for r in roots]
    while stack:
        name = stack.pop()
        if name in seen or name not in messages:
            continue
        seen.add(name)
        order.append(name)
        for _, _, kind, _, ref in messages[name]:
            if ref:
                stack.append(ref)
    order.sort()
    for name in order:
        if any(kind == "F64" for _, _, kind, _, _ in messages[name]):
            sys.exit(f"{name} has a double field: the decoder has no double kind; add one")
    index = {n: i for i, n in enumerate(order)}
    # Go structs embedded inline (VolumeSource in Volume, LocalObjectReference in
    # ConfigMapKeySelector) are nested messages in protobuf but flat in JSON: a message
    # field the parent's JSON does not name is inlined, and the embedded message takes its
    # JSON names from the parents it is inlined into.
    tables = {}
    for name in order:
        module, struct = name.rsplit(".", 1)
        tables[name] = dict(json_names.get((module, struct.lower()), {}))
    inline = set()
    for name in order:
        for tag, field, kind, repeated, ref in messages[name]:
            if kind == "Msg" and not repeated and tables[name] and fkey(field) not in tables[name]:
                inline.add((name, tag))
                for k, v in tables[name].items():
                    tables[ref].setdefault(k, v)
    missing = []
    out = []
    out.append("// @generated by kube-sim/tools/gen-protobuf-schema.py from the k8s-pb 0.9.0 and")
    out.append("// k8s-openapi 0.29.0 crates; do not edit. Tags and kinds are k8s-pb's, JSON names k8s-openapi's.")
    out.append("")
    out.append("use super::{Field, Kind::*, Message};")
    out.append("")
    out.append(f"/// Every message reachable from [`ROOTS`], by full name ({len(order)}).")
    out.append("pub(super) static MESSAGES: &[Message] = &[")
    for name in order:
        table = tables[name]
        fields = []
        for tag, field, kind, repeated, ref in sorted(messages[name]):
            json = table.get(fkey(field))
            if json is None:
                json = camel(field)
                if (name, tag) not in inline and name not in SPECIAL:
                    missing.append(f"{name}.{field} -> {json}")
            k = kind if ref is None else f"{kind}({index[ref]})"
            if (name, tag) in inline:
                k = f"Inline({index[ref]})"
            fields.append(f'Field({tag}, "{json}", {k}, {str(repeated).lower()})')
        out.append(f'    Message {{ name: "{name}", fields: &[{", ".join(fields)}] }},')
    out.append("];")
    out.append("")
    out.append("/// Top-level objects by (apiVersion, kind), for a body's `runtime.Unknown` envelope.")
    out.append("pub(super) static ROOTS: &[(&str, &str, usize)] = &[")
    for api, kind, name in sorted(set(roots)):
        if name in index:
            out.append(f'    ("{api}", "{kind}", {index[name]}),')
    out.append("];")
    print("\n".join(out))
    for m in missing:
        print(f"no k8s-openapi name, camelCased: {m}", file=sys.stderr)


main()
