"""The OpenAPI 3.1 document of the REST API, served at ``/openapi.json``: one source of truth.

Written as data; ``tests/test_rest_openapi.py`` validates it with openapi-spec-validator
and runs schemathesis against a live daemon with it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from ztick_tw import __version__
from ztick_tw.rest.bodies import SCHEDULE_OPTIONS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


E400 = _error("Invalid request: bad JSON, a missing field, a wrong type, a bad time")
E401 = _error("Authentication on, and no valid `Authorization: Bearer <secret>`")
E403 = _error("The job or rule lies outside the token's namespace")
E404 = _error("No such job, rule or schedule")
E405 = _error("Method not allowed on this path")
E413 = _error("The body is over 1 MB")
E503 = _error("The change could not be persisted; nothing was acknowledged")

_COMMON = {"401": E401, "405": E405}
_CHANGE = {"400": E400, "401": E401, "403": E403, "405": E405, "413": E413, "503": E503}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {**_COMMON, **responses}, **extra}


def _path_param(name: str, what: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": what,
        "schema": {"type": "string", "minLength": 1},
    }


def _query(name: str, schema: dict[str, Any], what: str, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": what,
        "schema": schema,
    }


_PREFIX = _query("prefix", {"type": "string"}, "Only ids starting with this prefix")
_JOB = [_path_param("id", "The job identifier")]
_RULE = [_path_param("id", "The rule identifier")]

_STR = {"type": "string"}
_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
_STR_LIST = {"type": "array", "items": _STR}
_OPT_VALUE = {"type": ["string", "number"]}


def _runner(kind: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "title": kind,
        "properties": {"type": {"const": kind}, **fields},
        "required": ["type", *required],
        "additionalProperties": False,
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": _STR},
        "required": ["error"],
    },
    "Status": {"enum": ["planned", "triggered", "executed", "failed", "paused"]},
    "Job": {
        "type": "object",
        "properties": {
            "id": _STR,
            "status": _ref("Status"),
            "execution": {"type": "integer", "description": "Nanoseconds since the epoch"},
        },
        "required": ["id", "status", "execution"],
    },
    "JobBody": {
        "type": "object",
        "properties": {
            "execution": {
                "type": "string",
                "description": "RFC 3339 with a zone (`Z` or `±hh:mm`), fractions to ns",
                "pattern": _TIME_PATTERN,
                "examples": ["2030-01-02T03:04:05.123456789Z"],
            }
        },
        "required": ["execution"],
    },
    "ShellRunner": _runner("shell", {"command": _STR}, ["command"]),
    "DirectRunner": _runner("direct", {"executable": _STR, "args": _STR_LIST}, ["executable"]),
    "HttpRunner": _runner(
        "http",
        {"method": {"enum": ["GET", "POST", "PUT", "DELETE"]}, "url": _STR},
        ["method", "url"],
    ),
    "AwfRunner": _runner(
        "awf",
        {
            "workflow": _STR,
            "inputs": {**_STR_LIST, "description": "`key=value` strings, as on the wire"},
        },
        ["workflow"],
    ),
    "AmqpRunner": _runner(
        "amqp",
        {"dsn": _STR, "exchange": _STR, "routing_key": _STR},
        ["dsn", "exchange", "routing_key"],
    ),
    "RedisRunner": _runner(
        "redis",
        {"url": _STR, "command": {"enum": ["PUBLISH", "RPUSH", "LPUSH", "SET"]}, "key": _STR},
        ["url", "command", "key"],
    ),
    "Runner": {
        "oneOf": [
            _ref("ShellRunner"),
            _ref("DirectRunner"),
            _ref("HttpRunner"),
            _ref("AwfRunner"),
            _ref("AmqpRunner"),
            _ref("RedisRunner"),
        ],
        "discriminator": {
            "propertyName": "type",
            "mapping": {
                "shell": "#/components/schemas/ShellRunner",
                "direct": "#/components/schemas/DirectRunner",
                "http": "#/components/schemas/HttpRunner",
                "awf": "#/components/schemas/AwfRunner",
                "amqp": "#/components/schemas/AmqpRunner",
                "redis": "#/components/schemas/RedisRunner",
            },
        },
    },
    "Rule": {
        "type": "object",
        "properties": {"id": _STR, "pattern": _STR, "runner": _ref("Runner")},
        "required": ["id", "pattern", "runner"],
    },
    "RuleBody": {
        "oneOf": [
            {
                "type": "object",
                "title": "nested",
                "properties": {"pattern": _STR, "runner": _ref("Runner")},
                "required": ["pattern", "runner"],
            },
            {
                "type": "object",
                "title": "flat (ztick's server form)",
                "properties": {
                    "pattern": _STR,
                    "runner": {"enum": ["shell", "direct", "http", "awf", "amqp", "redis"]},
                    "args": {**_STR_LIST, "description": "The runner's arguments as on the wire"},
                },
                "required": ["pattern", "runner"],
            },
        ]
    },
    "ScheduleBody": {
        "type": "object",
        "properties": {
            "schedule": {"type": "string", "examples": ["every 5 minutes", "0 2 * * mon-fri"]},
            **dict.fromkeys(SCHEDULE_OPTIONS, _OPT_VALUE),
        },
        "required": ["schedule"],
        "additionalProperties": False,
    },
    "Schedule": {
        "type": "object",
        "description": "Every option with its effective value, as SCHEDULE GET lists it",
        "properties": {
            "id": _STR,
            "schedule": _STR,
            "next": {"type": ["integer", "null"], "description": "ns; null once ended"},
            "runs": {"type": "integer"},
            "paused": {"type": "boolean"},
            "first": {"type": "integer", "description": "PUT only: when it first fires (ns)"},
        },
        "required": ["id", "schedule", "next", "runs", "paused"],
        "additionalProperties": {"type": "string"},
    },
    "Occurrence": {
        "type": "object",
        "properties": {"ns": {"type": "integer"}, "time": _STR},
        "required": ["ns", "time"],
    },
    "Run": {
        "type": "object",
        "properties": {
            "run": {"type": "integer"},
            "due": {"type": "integer"},
            "started": {"type": ["integer", "null"]},
            "ended": {"type": ["integer", "null"]},
            "outcome": {
                "enum": ["executed", "failed", "timeout", "cancelled", "skipped", "running"]
            },
            "attempt": {"type": "integer"},
            "exit": {"type": ["integer", "null"]},
            "detail": _STR,
            "output": _STR,
        },
        "required": ["run", "due", "started", "ended", "outcome", "attempt", "exit"],
    },
    "PolicyBody": {
        "type": "object",
        "properties": {
            "timeout": {**_OPT_VALUE, "examples": ["30s"]},
            "retries": {"type": ["integer", "string"]},
            "backoff": {**_OPT_VALUE, "examples": ["1s..1m"]},
        },
        "additionalProperties": False,
    },
    "Policy": {"type": "object", "additionalProperties": {"type": "string"}},
    "Stat": {
        "type": "object",
        "additionalProperties": {"type": ["integer", "string"]},
        "required": ["uptime_ns", "connections", "jobs_total", "rules_total"],
    },
}

_JOB_ANSWER = _ok(_ref("Job"))
_DONE = {"description": "Done; no body"}

PATHS: dict[str, Any] = {
    "/health": {
        "get": {
            "summary": "Liveness",
            "responses": {
                "200": _ok(
                    {
                        "type": "object",
                        "properties": {"status": {"const": "ok"}},
                        "required": ["status"],
                    }
                ),
                "405": E405,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _ok({"type": "object"}), "405": E405},
        }
    },
    "/stat": {"get": _op("STAT as one object", {"200": _ok(_ref("Stat"))})},
    "/metrics": {
        "get": _op(
            "Prometheus text exposition (SPEC §10)",
            {
                "200": {
                    "description": "text/plain; version=0.0.4",
                    "content": {"text/plain": {"schema": _STR}},
                }
            },
        )
    },
    "/jobs": {
        "get": _op(
            "List jobs (QUERY)",
            {"200": _ok({"type": "array", "items": _ref("Job")})},
            parameters=[_PREFIX],
        )
    },
    "/jobs/{id}": {
        "parameters": _JOB,
        "put": _op(
            "Create or replace a job (SET)",
            {**_CHANGE, "200": _JOB_ANSWER},
            requestBody=_body(_ref("JobBody")),
        ),
        "get": _op("A job (GET)", {"200": _JOB_ANSWER, "400": E400, "403": E403, "404": E404}),
        "delete": _op(
            "Remove a job and its schedule (REMOVE)",
            {"204": _DONE, "400": E400, "403": E403, "404": E404, "503": E503},
        ),
    },
    "/jobs/{id}/schedule": {
        "parameters": _JOB,
        "put": _op(
            "Make the job recur (SCHEDULE SET)",
            {**_CHANGE, "200": _ok(_ref("Schedule"))},
            requestBody=_body(_ref("ScheduleBody")),
        ),
        "get": _op(
            "The job's schedule (SCHEDULE GET)",
            {"200": _ok(_ref("Schedule")), "400": E400, "403": E403, "404": E404},
        ),
        "delete": _op(
            "Stop recurring; the job stays (SCHEDULE REMOVE)",
            {"204": _DONE, "400": E400, "403": E403, "404": E404, "503": E503},
        ),
    },
    "/jobs/{id}/pause": {
        "parameters": _JOB,
        "post": _op(
            "PAUSE", {"200": _JOB_ANSWER, "400": E400, "403": E403, "404": E404, "503": E503}
        ),
    },
    "/jobs/{id}/resume": {
        "parameters": _JOB,
        "post": _op(
            "RESUME", {"200": _JOB_ANSWER, "400": E400, "403": E403, "404": E404, "503": E503}
        ),
    },
    "/jobs/{id}/run": {
        "parameters": _JOB,
        "post": _op(
            "RUN: one extra run now",
            {"200": _JOB_ANSWER, "400": E400, "403": E403, "404": E404, "503": E503},
        ),
    },
    "/jobs/{id}/history": {
        "parameters": _JOB,
        "get": _op(
            "HISTORY, newest first",
            {
                "200": _ok({"type": "array", "items": _ref("Run")}),
                "400": E400,
                "403": E403,
                "404": E404,
                "503": E503,
            },
            parameters=[_query("limit", {"type": "integer"}, "Runs to show (default 10)")],
        ),
    },
    "/schedules": {
        "get": _op(
            "LISTSCHEDULES",
            {"200": _ok({"type": "array", "items": _ref("Schedule")})},
            parameters=[_PREFIX],
        )
    },
    "/preview": {
        "get": _op(
            "PREVIEW a schedule; other query keys are its options",
            {"200": _ok({"type": "array", "items": _ref("Occurrence")}), "400": E400},
            parameters=[
                _query("schedule", _STR, "The schedule", required=True),
                _query("count", {"type": "integer"}, "Instants (1-1000, default 5)"),
                _query("tz", _STR, "IANA zone (default UTC)"),
            ],
        )
    },
    "/rules": {
        "get": _op(
            "LISTRULES",
            {"200": _ok({"type": "array", "items": _ref("Rule")})},
            parameters=[_PREFIX],
        )
    },
    "/rules/{id}": {
        "parameters": _RULE,
        "put": _op(
            "Create or replace a rule (RULE SET)",
            {**_CHANGE, "200": _ok(_ref("Rule"))},
            requestBody=_body(_ref("RuleBody")),
        ),
        "get": _op("A rule", {"200": _ok(_ref("Rule")), "400": E400, "403": E403, "404": E404}),
        "delete": _op(
            "REMOVERULE", {"204": _DONE, "400": E400, "403": E403, "404": E404, "503": E503}
        ),
    },
    "/rules/{id}/policy": {
        "parameters": _RULE,
        "get": _op(
            "RULE POLICY (show)",
            {"200": _ok(_ref("Policy")), "400": E400, "403": E403, "404": E404},
        ),
        "put": _op(
            "RULE POLICY (set the keys given)",
            {**_CHANGE, "200": _ok(_ref("Policy")), "404": E404},
            requestBody=_body(_ref("PolicyBody")),
        ),
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.1",
    "info": {
        "title": "ztick-tw REST API",
        "version": __version__,
        "description": "ztick's REST API (SPEC §7) and ztick-tw's extensions. With auth on,"
        " every path but /health and /openapi.json needs `Authorization: Bearer <secret>`.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}, {}],
}


@functools.cache
def document_bytes() -> bytes:
    """The document as served (computed once)."""
    return json.dumps(DOCUMENT).encode()
