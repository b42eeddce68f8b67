"""The OpenAPI 3.1 document of ``/api/v1`` — the contract every dashboard button uses."""

from __future__ import annotations

from typing import Any

from vmdr import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(schema: dict[str, Any], desc: str = "OK", code: str = "200") -> dict[str, Any]:
    return {code: {"description": desc, "content": {"application/json": {"schema": schema}}}}


_ERRS = {
    "400": {"description": "bad request", "content": {"application/json": {
        "schema": _ref("Error")}}},
    "401": {"description": "no or bad credentials"},
    "403": {"description": "the role may not do this"},
    "404": {"description": "not found"},
}


def _get(summary: str, schema: dict[str, Any], role: str = "auditor",
         params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "description": f"Role: {role}.",
                    "parameters": params or [],
                    "responses": {**_ok(schema), **_ERRS}}}


def _post(summary: str, body: dict[str, Any], role: str,
          params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "description": f"Role: {role}.", "parameters": params or [],
        "requestBody": {"required": False,
                        "content": {"application/json": {"schema": body}}},
        "responses": {**_ok(_ref("Job"), "queued", "202"),
                      "409": {"description": "already queued"}, **_ERRS}}}


_NAME = [{"name": "name", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}$"}}]
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}


def document() -> dict[str, Any]:
    job_filters = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                    "maximum": 1000}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {"name": "before", "in": "query", "description": "the previous page's `next`",
         "schema": {"type": "string", "maxLength": 64}},
        {"name": "vm", "in": "query", "schema": {"type": "string"}},
        {"name": "state", "in": "query", "schema": {
            "type": "string", "enum": ["queued", "running", "ok", "failed", "interrupted"]}},
        {"name": "type", "in": "query", "schema": {"type": "string"}},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "vmdr agent API", "version": __version__,
                 "description": "Bearer tokens from `vmdr agent token create --role ROLE`. "
                                "auditor reads; operator runs backups, verifications, copies "
                                "and restores to new names; admin also restores in place."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/health": {"get": {"summary": "liveness, leader", "security": [],
                                       "responses": _ok({"type": "object"})}},
            "/api/v1/whoami": _get("the caller's name and role", {"type": "object"}),
            "/api/v1/vms": _get("VMs with their protection state",
                                {"type": "object", "properties": {
                                    "vms": {"type": "array", "items": _ref("VM")}}}),
            "/api/v1/vms/{name}": _get("one VM with its recent jobs", _ref("VM"),
                                       params=_NAME),
            "/api/v1/vms/{name}/snapshots": _get("the VM's snapshots", {"type": "object"},
                                                 params=_NAME),
            "/api/v1/vms/{name}/backup": _post(
                "back the VM up now", {"type": "object", "properties": {
                    "mode": {"enum": ["auto", "full", "incremental"]},
                    "repository": {"type": "string"}}}, "operator", _NAME),
            "/api/v1/vms/{name}/verify": _post(
                "verify the VM's latest (or given) snapshot", {"type": "object", "properties": {
                    "boot": {"type": "boolean"}, "snapshot": {"type": "string"},
                    "repository": {"type": "string"}}}, "operator", _NAME),
            "/api/v1/vms/{name}/copy": _post(
                "copy the VM's latest snapshot to another repository",
                {"type": "object", "required": ["to"], "properties": {
                    "to": {"type": "string"}, "repository": {"type": "string"}}},
                "operator", _NAME),
            "/api/v1/vms/{name}/restore": _post(
                "restore the VM (new name: operator; in place: admin)",
                {"type": "object", "required": ["target_dir"], "properties": {
                    "name": {"type": "string"}, "target_dir": {"type": "string"},
                    "snapshot": {"type": "string"}, "define": {"type": "boolean"},
                    "start": {"type": "boolean"}, "host": {"type": "string"},
                    "repository": {"type": "string"}}}, "operator", _NAME),
            "/api/v1/jobs": _get("jobs, newest first",
                                 {"type": "object", "properties": {
                                     "jobs": {"type": "array", "items": _ref("Job")},
                                     "next": _STR}},
                                 params=job_filters),
            "/api/v1/jobs/{id}": _get("one job with its events and log", _ref("Job"),
                                      params=_ID),
            "/api/v1/jobs/{id}/events": {"get": {
                "summary": "the job's events, live (server-sent events)", "parameters": _ID,
                "responses": {"200": {"description": "text/event-stream",
                                      "content": {"text/event-stream": {}}}, **_ERRS}}},
            "/api/v1/jobs/{id}/cancel": {"post": {
                "summary": "cancel a queued or running job", "description": "Role: operator.",
                "parameters": _ID, "responses": {**_ok({"type": "object"}), **_ERRS}}},
            "/api/v1/repositories": _get("repositories with use and growth",
                                         {"type": "object"}),
            "/api/v1/plan/coverage": _get("the DR plan's coverage, VM × disaster level",
                                          {"type": "object"}),
            "/api/v1/alerts": _get("alerts, firing and resolved", {"type": "object"}),
            "/api/v1/members": _get("fleet members and the leader", {"type": "object"}),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "VM": {"type": "object", "properties": {
                    "name": {"type": "string"}, "host": {"type": "string"},
                    "running": {"type": "boolean"}, "tier": _STR, "policy": _STR,
                    "repository": _STR, "last_backup": _NUM, "rpo_s": _NUM,
                    "rpo_target_s": _NUM, "rpo_ok": {"type": ["boolean", "null"]},
                    "last_verified": _NUM}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"}, "type": {"type": "string"}, "vm": _STR,
                    "state": {"enum": ["queued", "running", "ok", "failed", "interrupted"]},
                    "created": {"type": "number"}, "started": _NUM, "ended": _NUM,
                    "duration_s": _NUM, "exit_code": {"type": ["integer", "null"]},
                    "error": _STR, "bytes": {"type": ["integer", "null"]}, "snapshot": _STR,
                    "policy": _STR, "repository": _STR, "host": _STR}},
            },
        },
    }
