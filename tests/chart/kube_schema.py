"""Strict validation of rendered objects against Kubernetes' OpenAPI schemas (the ones the
kubernetes-validate package ships) and against the CRD schemas committed in crds/."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from referencing import Registry, Resource

if TYPE_CHECKING:
    # Imported where a validator is built: jsonschema's import takes 2 s (it builds a grammar
    # for its IRI format check), and every xdist worker imports this module at collection.
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

# The chart's kubeVersion floor, and the newest Kubernetes the schemas know.
OLDEST = "1.27"
NEWEST = "1.37"

CRDS = Path(__file__).parent / "crds"

Manifest = dict[str, Any]


class NoSchemaError(LookupError):
    """No schema is known for this kind and apiVersion."""


def _schema_dir(version: str) -> Any:
    return (
        resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{version}.0-local-strict"
    )


@cache
def _definitions(version: str) -> Resource[Any]:
    text = (_schema_dir(version) / "_definitions.json").read_text()
    return Resource.from_contents(json.loads(text))


@cache
def _builtin_validator(version: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    # apps/v1 -> apps-v1, networking.k8s.io/v1 -> networking-v1, v1 -> v1
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _schema_dir(version) / f"{kind.lower()}-{group_version}.json"
    if not path.is_file():
        raise NoSchemaError(f"Kubernetes {version} has no {kind} in {api_version}")
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    schema = json.loads(path.read_text())
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = _definitions(version) @ registry
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    validator: jsonschema.protocols.Validator = validator_class(schema, registry=registry)
    return validator


@cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, from every CRD schema under crds/."""
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        validators[(crd["apiVersion"], crd["kind"])] = jsonschema.Draft7Validator(
            _strict(crd["schema"])
        )
    return validators


def _strict(schema: Any) -> Any:
    """Reject unknown fields: the API server would silently prune them, hiding a typo."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        keeps_unknown = schema.pop("x-kubernetes-preserve-unknown-fields", False)
        schema.pop("x-kubernetes-int-or-string", None)
        if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def is_builtin(manifest: Manifest, version: str) -> bool:
    try:
        _builtin_validator(version, manifest["kind"], manifest["apiVersion"])
    except NoSchemaError:
        return False
    return True


def crd_kinds() -> set[tuple[str, str]]:
    return set(_crd_validators())


def errors_builtin(manifest: Manifest, version: str) -> list[str]:
    validator = _builtin_validator(version, manifest["kind"], manifest["apiVersion"])
    return [_describe(e) for e in validator.iter_errors(manifest)]


def errors_crd(manifest: Manifest) -> list[str]:
    validator = _crd_validators().get((manifest["apiVersion"], manifest["kind"]))
    if validator is None:
        raise NoSchemaError(
            f"no CRD under {CRDS.name}/ defines {manifest['apiVersion']} {manifest['kind']}"
        )
    return [_describe(e) for e in validator.iter_errors(manifest)]


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{path}: {error.message}"
