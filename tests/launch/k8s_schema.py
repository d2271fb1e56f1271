"""Validate generated Kubernetes manifests against real schemas shipped in installed packages (nothing downloaded).

- Core objects (ConfigMap, and the PyTorchJob's pod template as a core/v1 PodTemplate) against the Kubernetes
  OpenAPI schema in its strict form (unknown fields rejected), as packaged by `kubernetes-validate`.
- The PyTorchJob's own fields against the Kubeflow Training Operator's API, read from its Python SDK
  (`kubeflow-training`), whose models are generated from the operator's OpenAPI spec, itself generated from the
  same Go types as the PyTorchJob CRD: every field name and type, and the fields the API requires. Enumerations the
  SDK keeps only in Go constants (pkg/apis/kubeflow.org/v1: CleanPodPolicy, RestartPolicy, RDZVBackend) are
  added below. Embedded core types (ObjectMeta, PodTemplateSpec) refer to the Kubernetes schema.
"""

from __future__ import annotations

import inspect
import re

# test dependencies (pyproject [test]: kubernetes-validate, kubeflow-training): missing, these tests fail, never skip
import jsonschema  # a dependency of kubernetes-validate
import kubernetes_validate
from kubeflow.training import models as training_models
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

K8S_VERSION = latest_version()
_K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
_CORE = {  # SDK (kubernetes client) class -> Kubernetes OpenAPI definition
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1PodTemplateSpec": "io.k8s.api.core.v1.PodTemplateSpec",
    "Quantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
}
ENUMS = {  # (model, field) -> values of the Go constants
    ("KubeflowOrgV1RunPolicy", "clean_pod_policy"): ["All", "Running", "None"],
    ("KubeflowOrgV1ReplicaSpec", "restart_policy"): ["Always", "OnFailure", "Never", "ExitCode"],
    ("KubeflowOrgV1ElasticPolicy", "rdzv_backend"): ["c10d", "etcd", "etcd-v2", "static"],
}


def _required(cls) -> list[str]:
    """Fields whose generated setter rejects None: the API's required fields."""
    out = []
    for attr, json_name in cls.attribute_map.items():
        setter = getattr(cls, attr).fset
        if setter is not None and "must not be `None`" in inspect.getsource(setter):
            out.append(json_name)
    return out


def _schema(type_name: str, defs: dict) -> dict:
    if type_name in ("str", "int", "bool", "float", "object"):
        return {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                "float": {"type": "number"}, "object": {}}[type_name]
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": _schema(m.group(1), defs)}
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": _schema(m.group(1), defs)}
    if type_name in _CORE:
        return {"$ref": f"{_K8S_DEFS}#/$defs/{_CORE[type_name]}"}
    cls = getattr(training_models, type_name, None)
    if cls is None or not type_name.startswith("KubeflowOrgV1"):
        return {"not": {}, "description": f"{type_name}: not written by the launcher"}
    if type_name not in defs:
        defs[type_name] = {}  # reserve (recursive types)
        props = {}
        for attr, kind in cls.openapi_types.items():
            prop = _schema(kind, defs)
            if (type_name, attr) in ENUMS:
                prop = {**prop, "enum": ENUMS[(type_name, attr)]}
            props[cls.attribute_map[attr]] = prop
        defs[type_name] = {"type": "object", "properties": props, "additionalProperties": False, "required": _required(cls)}
    return {"$ref": f"#/$defs/{type_name}"}


def pytorchjob_schema() -> dict:
    defs: dict = {}
    root = _schema("KubeflowOrgV1PyTorchJob", defs)
    defs["KubeflowOrgV1PyTorchJob"]["properties"]["apiVersion"] = {"const": "kubeflow.org/v1"}
    defs["KubeflowOrgV1PyTorchJob"]["properties"]["kind"] = {"const": "PyTorchJob"}
    defs["KubeflowOrgV1PyTorchJob"]["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **root, "$defs": defs}


def _core_registry() -> Registry:
    definitions = schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    return Resource.from_contents(definitions) @ Registry()


def validate_core(doc: dict) -> None:
    """A core Kubernetes object against the strict OpenAPI schema (raises kubernetes_validate's ValidationError)."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_pytorchjob(doc: dict) -> None:
    """A PyTorchJob: its fields against the operator's API, its pod templates against core/v1 PodTemplate."""
    jsonschema.Draft202012Validator(pytorchjob_schema(), registry=_core_registry()).validate(doc)
    for role, replica in doc["spec"]["pytorchReplicaSpecs"].items():
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{role.lower()}"},
                       "template": replica["template"]})


def validate_manifest(documents: list[dict]) -> None:
    for doc in documents:
        if doc.get("kind") == "PyTorchJob":
            validate_pytorchjob(doc)
        else:
            validate_core(doc)
