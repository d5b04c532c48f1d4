"""A minimal decoder for Kubernetes protobuf request bodies (what kubectl 1.33 sends).

Wire format: varint (0), fixed64 (1), length-delimited (2), fixed32 (5); groups are refused.
The Kubernetes envelope is the 4-byte magic ``k8s\\x00`` followed by a runtime.Unknown message
(k8s.io/apimachinery/pkg/runtime/generated.proto): typeMeta=1 (TypeMeta{apiVersion=1, kind=2}),
raw=2, contentEncoding=3, contentType=4.

Field numbers, checked against upstream generated.proto files:
- staging/src/k8s.io/api/policy/v1/generated.proto: Eviction{metadata=1, deleteOptions=2};
  PodDisruptionBudget{metadata=1, spec=2, status=3}; PodDisruptionBudgetSpec{minAvailable=1,
  selector=2, maxUnavailable=3, unhealthyPodEvictionPolicy=4}; PodDisruptionBudgetStatus{
  observedGeneration=1, disruptedPods=2, disruptionsAllowed=3, currentHealthy=4, desiredHealthy=5,
  expectedPods=6}.
- staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto: ObjectMeta{name=1,
  generateName=2, namespace=3, selfLink=4, uid=5, resourceVersion=6, generation=7,
  creationTimestamp=8, deletionTimestamp=9, deletionGracePeriodSeconds=10, labels=11,
  annotations=12, ownerReferences=13, finalizers=14}; OwnerReference{kind=1, name=3, uid=4,
  apiVersion=5, controller=6, blockOwnerDeletion=7}; Time/MicroTime{seconds=1, nanos=2};
  LabelSelector{matchLabels=1, matchExpressions=2}; LabelSelectorRequirement{key=1, operator=2,
  values=3}; DeleteOptions{gracePeriodSeconds=1, preconditions=2, orphanDependents=3,
  propagationPolicy=4, dryRun=5 (repeated)}; Preconditions{uid=1, resourceVersion=2 (added
  after uid; older copies of the file only have uid)}.
- k8s.io/apimachinery/pkg/util/intstr: IntOrString{type=1 (0 int, 1 string), intVal=2, strVal=3}.
- k8s.io/api/core/v1: ConfigMap{metadata=1, data=2, binaryData=3, immutable=4};
  Namespace{metadata=1, spec=2 {finalizers=1}, status=3 {phase=1}}.
- k8s.io/api/coordination/v1: Lease{metadata=1, spec=2}; LeaseSpec{holderIdentity=1,
  leaseDurationSeconds=2, acquireTime=3, renewTime=4, leaseTransitions=5, strategy=6,
  preferredHolder=7}.
- staging/src/k8s.io/api/authorization/v1/generated.proto: SelfSubjectAccessReview{metadata=1,
  spec=2, status=3}; SelfSubjectAccessReviewSpec{resourceAttributes=1, nonResourceAttributes=2};
  ResourceAttributes{namespace=1, verb=2, group=3, version=4, resource=5, subresource=6, name=7}
  (fieldSelector=8 and labelSelector=9 skipped); NonResourceAttributes{path=1, verb=2};
  SubjectAccessReviewStatus{allowed=1, reason=2, evaluationError=3, denied=4}.
The Eviction and DeleteOptions numbers are also confirmed by the bytes kubectl 1.33 really sends
(tests/test_kubeserver_kubectl.py decodes captured request bodies).

Unknown fields are skipped, as protobuf requires. Maps are repeated {key=1, value=2} entries.
"""
from __future__ import annotations

import base64
import datetime as _dt

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


def read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = val = 0
    while True:
        if i >= len(b):
            raise ProtobufError("truncated varint")
        c = b[i]
        i += 1
        val |= (c & 0x7F) << shift
        if not c & 0x80:
            return val, i
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def iter_fields(b: bytes):
    """Yield (field number, wire type, value): int for varint/fixed, bytes for length-delimited."""
    i = 0
    while i < len(b):
        key, i = read_varint(b, i)
        no, wt = key >> 3, key & 7
        if no == 0:
            raise ProtobufError("field number 0")
        if wt == 0:
            v, i = read_varint(b, i)
        elif wt == 1:
            if i + 8 > len(b):
                raise ProtobufError("truncated fixed64")
            v, i = int.from_bytes(b[i:i + 8], "little"), i + 8
        elif wt == 2:
            n, i = read_varint(b, i)
            if i + n > len(b):
                raise ProtobufError("truncated length-delimited field")
            v, i = b[i:i + n], i + n
        elif wt == 5:
            if i + 4 > len(b):
                raise ProtobufError("truncated fixed32")
            v, i = int.from_bytes(b[i:i + 4], "little"), i + 4
        else:
            raise ProtobufError(f"unsupported wire type {wt}")
        yield no, wt, v


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _time(b: bytes, micro=False) -> str:
    f = {no: v for no, _, v in iter_fields(b)}
    t = _dt.datetime.fromtimestamp(_signed64(f.get(1, 0)), _dt.timezone.utc)
    if micro:
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{f.get(2, 0) // 1000:06d}Z"
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _intorstr(b: bytes):
    f = {no: v for no, _, v in iter_fields(b)}
    return f.get(3, b"").decode() if f.get(1, 0) == 1 else _i32(f.get(2, 0))


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# message name -> {field number: (json name, type)}
# types: str, bytes, int, bool, time, microtime, intorstr, quantity, "map:<valtype>",
# "msg:<Name>", and "rep:<type>" for repeated.
SCHEMAS: dict[str, dict[int, tuple[str, str]]] = {
    "TypeMeta": {1: ("apiVersion", "str"), 2: ("kind", "str")},
    "Unknown": {1: ("typeMeta", "msg:TypeMeta"), 2: ("raw", "bytes"), 3: ("contentEncoding", "str"),
                4: ("contentType", "str")},
    "ObjectMeta": {1: ("name", "str"), 2: ("generateName", "str"), 3: ("namespace", "str"),
                   4: ("selfLink", "str"), 5: ("uid", "str"), 6: ("resourceVersion", "str"),
                   7: ("generation", "int"), 8: ("creationTimestamp", "time"),
                   9: ("deletionTimestamp", "time"), 10: ("deletionGracePeriodSeconds", "int"),
                   11: ("labels", "map:str"), 12: ("annotations", "map:str"),
                   13: ("ownerReferences", "rep:msg:OwnerReference"), 14: ("finalizers", "rep:str")},
    "OwnerReference": {1: ("kind", "str"), 3: ("name", "str"), 4: ("uid", "str"), 5: ("apiVersion", "str"),
                       6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool")},
    "Preconditions": {1: ("uid", "str"), 2: ("resourceVersion", "str")},
    "DeleteOptions": {1: ("gracePeriodSeconds", "int"), 2: ("preconditions", "msg:Preconditions"),
                      3: ("orphanDependents", "bool"), 4: ("propagationPolicy", "str"), 5: ("dryRun", "rep:str"),
                      6: ("ignoreStoreReadErrorWithClusterBreakingPotential", "bool")},
    "Eviction": {1: ("metadata", "msg:ObjectMeta"), 2: ("deleteOptions", "msg:DeleteOptions")},
    "LabelSelectorRequirement": {1: ("key", "str"), 2: ("operator", "str"), 3: ("values", "rep:str")},
    "LabelSelector": {1: ("matchLabels", "map:str"), 2: ("matchExpressions", "rep:msg:LabelSelectorRequirement")},
    "PodDisruptionBudgetSpec": {1: ("minAvailable", "intorstr"), 2: ("selector", "msg:LabelSelector"),
                                3: ("maxUnavailable", "intorstr"), 4: ("unhealthyPodEvictionPolicy", "str")},
    "PodDisruptionBudgetStatus": {1: ("observedGeneration", "int"), 3: ("disruptionsAllowed", "int"),
                                  4: ("currentHealthy", "int"), 5: ("desiredHealthy", "int"),
                                  6: ("expectedPods", "int")},
    "PodDisruptionBudget": {1: ("metadata", "msg:ObjectMeta"), 2: ("spec", "msg:PodDisruptionBudgetSpec"),
                            3: ("status", "msg:PodDisruptionBudgetStatus")},
    "ConfigMap": {1: ("metadata", "msg:ObjectMeta"), 2: ("data", "map:str"), 3: ("binaryData", "map:bytes"),
                  4: ("immutable", "bool")},
    "NamespaceSpec": {1: ("finalizers", "rep:str")},
    "NamespaceStatus": {1: ("phase", "str")},
    "Namespace": {1: ("metadata", "msg:ObjectMeta"), 2: ("spec", "msg:NamespaceSpec"),
                  3: ("status", "msg:NamespaceStatus")},
    "LeaseSpec": {1: ("holderIdentity", "str"), 2: ("leaseDurationSeconds", "int"), 3: ("acquireTime", "microtime"),
                  4: ("renewTime", "microtime"), 5: ("leaseTransitions", "int"), 6: ("strategy", "str"),
                  7: ("preferredHolder", "str")},
    "Lease": {1: ("metadata", "msg:ObjectMeta"), 2: ("spec", "msg:LeaseSpec")},
    "ResourceAttributes": {1: ("namespace", "str"), 2: ("verb", "str"), 3: ("group", "str"), 4: ("version", "str"),
                           5: ("resource", "str"), 6: ("subresource", "str"), 7: ("name", "str")},
    "NonResourceAttributes": {1: ("path", "str"), 2: ("verb", "str")},
    "SelfSubjectAccessReviewSpec": {1: ("resourceAttributes", "msg:ResourceAttributes"),
                                    2: ("nonResourceAttributes", "msg:NonResourceAttributes")},
    "SubjectAccessReviewStatus": {1: ("allowed", "bool"), 2: ("reason", "str"), 3: ("evaluationError", "str"),
                                  4: ("denied", "bool")},
    "SelfSubjectAccessReview": {1: ("metadata", "msg:ObjectMeta"), 2: ("spec", "msg:SelfSubjectAccessReviewSpec"),
                                3: ("status", "msg:SubjectAccessReviewStatus")},
}

OMIT_ZERO = {"ObjectMeta", "TypeMeta"}

# kind (from the envelope's TypeMeta) -> message name
KINDS = {k: k for k in ("Eviction", "DeleteOptions", "PodDisruptionBudget", "ConfigMap", "Namespace", "Lease",
                        "SelfSubjectAccessReview")}


def _scalar(typ: str, wt: int, v):
    if typ == "str":
        return v.decode("utf-8")
    if typ == "bytes":
        return base64.b64encode(v).decode() if isinstance(v, bytes) else v
    if typ == "int":
        return _signed64(v)
    if typ == "bool":
        return bool(v)
    if typ == "time":
        return _time(v)
    if typ == "microtime":
        return _time(v, micro=True)
    if typ == "intorstr":
        return _intorstr(v)
    if typ.startswith("msg:"):
        return decode_message(typ[4:], v)
    raise ProtobufError(f"unknown type {typ}")


def decode_message(name: str, b: bytes) -> dict:
    schema = SCHEMAS[name]
    out: dict = {}
    for no, wt, v in iter_fields(b):
        if no not in schema:
            continue
        key, typ = schema[no]
        if typ.startswith("map:"):
            entry = {eno: ev for eno, _, ev in iter_fields(v)}
            k = entry.get(1, b"").decode()
            out.setdefault(key, {})[k] = _scalar(typ[4:], 2, entry.get(2, b""))
        elif typ.startswith("rep:"):
            if wt == 2 and typ[4:] in ("int", "bool"):  # packed
                i, vals = 0, []
                while i < len(v):
                    x, i = read_varint(v, i)
                    vals.append(_scalar(typ[4:], 0, x))
                out.setdefault(key, []).extend(vals)
            else:
                out.setdefault(key, []).append(_scalar(typ[4:], wt, v))
        else:
            out[key] = _scalar(typ, wt, v)
    if name in OMIT_ZERO:  # Go value fields: gogo-protobuf always writes them; JSON would omit them
        out = {k: v for k, v in out.items() if v not in ("", 0, False, "1970-01-01T00:00:00Z")}
    if name == "Unknown" and isinstance(out.get("raw"), str):
        out["raw"] = base64.b64decode(out["raw"])
    return out


def decode_envelope(data: bytes) -> dict:
    """{apiVersion, kind, raw (bytes), contentEncoding, contentType} of a k8s protobuf body."""
    if not data.startswith(MAGIC):
        raise ProtobufError("missing the k8s\\x00 protobuf magic")
    u = decode_message("Unknown", data[4:])
    tm = u.get("typeMeta") or {}
    return {"apiVersion": tm.get("apiVersion", ""), "kind": tm.get("kind", ""), "raw": u.get("raw", b""),
            "contentEncoding": u.get("contentEncoding", ""), "contentType": u.get("contentType", "")}


def decode_k8s(data: bytes) -> dict:
    """A k8s protobuf body as the equivalent JSON object (apiVersion and kind included)."""
    env = decode_envelope(data)
    kind = env["kind"]
    if kind not in KINDS:
        raise ProtobufError(f"no protobuf schema for kind {kind!r}")
    obj = {"apiVersion": env["apiVersion"], "kind": kind}
    obj.update(decode_message(KINDS[kind], env["raw"]))
    return obj


# -- encoding (for unit tests of the decoder) -------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(no: int, v: int) -> bytes:
    return _varint(no << 3) + _varint(v)


def field_bytes(no: int, v: bytes | str) -> bytes:
    if isinstance(v, str):
        v = v.encode()
    return _varint(no << 3 | 2) + _varint(len(v)) + v


def envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    tm = field_bytes(1, api_version) + field_bytes(2, kind)
    return MAGIC + field_bytes(1, tm) + field_bytes(2, raw) + field_bytes(3, "") + field_bytes(4, "")
