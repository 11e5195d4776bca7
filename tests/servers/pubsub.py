"""A Google Pub/Sub REST endpoint and OAuth2 token endpoint (aiohttp, 127.0.0.1) for tests.

No Pub/Sub emulator can be installed here, so this server checks every request against
Google's published REST reference and answers like Google:

- `POST /v1/{topic}:publish` (projects.topics.publish): body `{"messages": [PubsubMessage]}`,
  1..1000 messages; a PubsubMessage has only `data` (base64), `attributes` (map of string
  to string) and `orderingKey` (`messageId` and `publishTime` must not be set by the
  publisher); non-empty data or at least one attribute; every message of a request has
  the same orderingKey; at most 100 attributes, keys 1..256 bytes not starting with
  "goog", values up to 1024 bytes; ordering key up to 1024 bytes; the serialized
  PublishRequest at most 10 MB. Answer `{"messageIds": [...]}` in request order.
- `POST /v1/{topic}:testIamPermissions`, `GET /v1/{topic}` (topics.get).
- `POST /token`: the JWT-bearer grant; the assertion's RS256 signature is verified with
  the service account's public key (a throwaway RSA key), then iss, aud, scope, iat/exp.
  Answers `{"access_token", "expires_in", "token_type": "Bearer"}` or an OAuth2 error.

Errors use Google's shape `{"error": {"code", "message", "status"}}`. Every violation is
also kept in `violations`, so a test can assert there were none.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.servers.webhook import serve

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = {
    "https://www.googleapis.com/auth/pubsub",
    "https://www.googleapis.com/auth/cloud-platform",
}
TOPIC = "projects/test-project/topics/signals"
MESSAGE_FIELDS = {"data", "attributes", "orderingKey"}
MAX_REQUEST_BYTES = 10_000_000


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """A throwaway 2048-bit RSA key per name, made once per test session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _proto_field(length: int) -> int:
    """Serialized size of one length-delimited protobuf field (tag, varint length, bytes)."""
    varint = 1
    while length >= 128**varint:
        varint += 1
    return 1 + varint + length


def _message_size(data: bytes, attributes: dict[str, str], ordering_key: str) -> int:
    size = _proto_field(len(data)) if data else 0
    for key, value in attributes.items():
        size += _proto_field(_proto_field(len(key.encode())) + _proto_field(len(value.encode())))
    if ordering_key:
        size += _proto_field(len(ordering_key.encode()))
    return _proto_field(size)


def _attribute_problems(where: str, attributes: Any) -> list[str]:
    if not isinstance(attributes, dict):
        return [f"{where}.attributes must be a map of string to string"]
    problems = []
    if len(attributes) > 100:
        problems.append(f"{where}: more than 100 attributes")
    for key, value in attributes.items():
        if not isinstance(value, str):
            problems.append(f"{where}.attributes[{key}] must be a string")
        elif len(value.encode()) > 1024:
            problems.append(f"{where}.attributes[{key}] is over 1024 bytes")
        if not key or len(key.encode()) > 256 or key.startswith("goog"):
            problems.append(f"{where}: invalid attribute key {key[:40]!r}")
    return problems


def _message_problems(index: int, message: Any) -> tuple[list[str], int]:
    """The reference's rules for one PubsubMessage, and its serialized size."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return [f"{where} must be an object"], 0
    problems = [f"{where}.{name} must not be set" for name in set(message) - MESSAGE_FIELDS]
    try:
        data = base64.b64decode(message.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        problems.append(f"{where}.data is not base64")
        data = b""
    attributes = message.get("attributes", {})
    problems += _attribute_problems(where, attributes)
    if not data and not attributes:
        problems.append(f"{where} needs non-empty data or at least one attribute")
    ordering_key = message.get("orderingKey", "")
    if not isinstance(ordering_key, str) or len(ordering_key.encode()) > 1024:
        problems.append(f"{where}.orderingKey must be a string of at most 1024 bytes")
        ordering_key = ""
    if problems:
        return problems, 0
    return [], _message_size(data, attributes, ordering_key)


def publish_problems(topic: str, body: Any) -> list[str]:
    """Every way `body` breaks the projects.topics.publish reference (empty if none)."""
    if not isinstance(body, dict) or set(body) != {"messages"}:
        return ['the request body must be {"messages": [...]}']
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        return ["messages is required"]
    problems: list[str] = []
    if len(messages) > 1000:
        problems.append(f"{len(messages)} messages: at most 1000 per request")
    size = _proto_field(len(topic.encode()))
    for index, message in enumerate(messages):
        found, message_size = _message_problems(index, message)
        problems += found
        size += message_size
    keys = {m.get("orderingKey", "") for m in messages if isinstance(m, dict)}
    if len(keys) > 1:
        problems.append("all messages of a PublishRequest must have the same orderingKey")
    if size > MAX_REQUEST_BYTES:
        problems.append(f"request_size {size} is over the 10MB limit")
    return problems


def google_error(
    code: int, status: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error answer in Google's JSON shape."""
    body = {"error": {"code": code, "message": message, "status": status}}
    return web.json_response(body, status=code, headers=headers)


def _b64url_json(part: str) -> Any:
    return json.loads(_b64url(part))


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class Published:
    """One message as the server stored it."""

    data: bytes
    attributes: dict[str, str]
    ordering_key: str | None  # None: the field was absent


@dataclass
class PublishCall:
    """One accepted publish request."""

    topic: str
    authorization: str | None
    messages: list[Published]


@dataclass
class Failure:
    """A scripted error for publish requests (of one ordering key, or any)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    ordering_key: str | None = None
    after: int = 0


class PubSubServer:
    """Pub/Sub REST + OAuth2 token endpoint holding published messages in memory."""

    def __init__(self) -> None:
        self.key = rsa_key("server")
        self.email = "firehosed@test-project.iam.gserviceaccount.com"
        self.key_id = "test-key-1"
        self.topics = {TOPIC}
        self.require_auth = True
        self.expires_in = 3600
        self.granted = {"pubsub.topics.publish"}
        self.url = ""
        self.calls: list[PublishCall] = []
        self.violations: list[str] = []
        self.requests_seen: list[dict[str, str | None]] = []
        self.token_requests = 0
        self.tokens: set[str] = set()
        self.failures: list[Failure] = []
        self.failed_requests = 0
        self._ids = itertools.count(1)
        self.app = web.Application(client_max_size=32 << 20)
        self.app.router.add_post("/token", self.token)
        self.app.router.add_post("/v1/projects/{project}/topics/{name}", self.topic_method)
        self.app.router.add_get("/v1/projects/{project}/topics/{name}", self.topic_get)

    def credentials(self, key: rsa.RSAPrivateKey | None = None) -> str:
        """A service-account key file (JSON) whose token_uri is this server."""
        pem = (key or self.key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        info = {
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": self.key_id,
            "private_key": pem.decode(),
            "client_email": self.email,
            "client_id": "100000000000000000001",
            "token_uri": f"{self.url}/token",
        }
        return json.dumps(info)

    def messages(self) -> list[Published]:
        """Every accepted message, in the order the requests arrived."""
        return [message for call in self.calls for message in call.messages]

    def fail(self, status: int, **options: Any) -> None:
        """Answer matching publish requests with `status` (see Failure)."""
        self.failures.append(Failure(status, **options))

    # -- OAuth2 token endpoint ---------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if request.content_type != "application/x-www-form-urlencoded":
            return self._oauth_error("invalid_request", "form body expected")
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return self._oauth_error("unsupported_grant_type", "Invalid grant_type")
        if problem := self._assertion_problem(str(form.get("assertion", ""))):
            return self._oauth_error("invalid_grant", problem)
        token = "ya29." + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return web.json_response(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    def _assertion_problem(self, assertion: str) -> str | None:
        parts = assertion.split(".")
        if len(parts) != 3 or "=" in assertion:
            return "Invalid JWT."
        try:
            header, claims, signature = (
                _b64url_json(parts[0]),
                _b64url_json(parts[1]),
                _b64url(parts[2]),
            )
        except (ValueError, binascii.Error):
            return "Invalid JWT."
        if header.get("alg") != "RS256" or header.get("kid") not in (None, self.key_id):
            return "Invalid JWT: unexpected alg or kid."
        try:
            self.key.public_key().verify(
                signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return "Invalid JWT Signature."
        return self._claims_problem(claims)

    def _claims_problem(self, claims: dict[str, Any]) -> str | None:
        now = time.time()
        if claims.get("iss") != self.email:
            return "Invalid issuer."
        if claims.get("aud") != f"{self.url}/token":
            return "Invalid JWT audience."
        if not SCOPES & set(str(claims.get("scope", "")).split()):
            return "Invalid OAuth scope."
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            return "Invalid JWT: iat and exp must be integers."
        if iat > now + 60 or exp <= now or exp - iat > 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes)."
        return None

    def _oauth_error(self, error: str, description: str) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=400)

    # -- Pub/Sub REST ------------------------------------------------------------------

    async def topic_method(self, request: web.Request) -> web.Response:
        name, _, method = request.match_info["name"].partition(":")
        topic = f"projects/{request.match_info['project']}/topics/{name}"
        if denied := self._unauthenticated(request):
            return denied
        if topic not in self.topics:
            return google_error(404, "NOT_FOUND", f"Resource not found (resource={name}).")
        if request.content_type != "application/json":
            self.violations.append(f"content type {request.content_type}")
            return google_error(400, "INVALID_ARGUMENT", "JSON body expected")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if method == "publish":
            return self._publish(request, topic, body)
        if method == "testIamPermissions":
            asked = body.get("permissions", []) if isinstance(body, dict) else []
            granted = [p for p in asked if p in self.granted]
            # proto3 JSON leaves an empty repeated field out, as Google does.
            return web.json_response({"permissions": granted} if granted else {})
        return google_error(404, "NOT_FOUND", f"no method {method!r}")

    async def topic_get(self, request: web.Request) -> web.Response:
        topic = f"projects/{request.match_info['project']}/topics/{request.match_info['name']}"
        if denied := self._unauthenticated(request):
            return denied
        if topic not in self.topics:
            return google_error(404, "NOT_FOUND", "Resource not found.")
        return web.json_response({"name": topic})

    def _unauthenticated(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization")
        self.requests_seen.append({"path": request.path, "authorization": authorization})
        if not self.require_auth:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme == "Bearer" and token in self.tokens:
            return None
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        )

    def _publish(self, request: web.Request, topic: str, body: Any) -> web.Response:
        if problems := publish_problems(topic, body):
            self.violations += problems
            return google_error(400, "INVALID_ARGUMENT", problems[0])
        messages = [
            Published(
                data=base64.b64decode(m.get("data", "")),
                attributes=m.get("attributes", {}),
                ordering_key=m.get("orderingKey"),
            )
            for m in body["messages"]
        ]
        if failure := self._scripted_failure(messages[0].ordering_key or ""):
            return google_error(failure.status, "UNAVAILABLE", "scripted failure", failure.headers)
        self.calls.append(PublishCall(topic, request.headers.get("Authorization"), messages))
        return web.json_response({"messageIds": [str(next(self._ids)) for _ in messages]})

    def _scripted_failure(self, ordering_key: str) -> Failure | None:
        for failure in self.failures:
            if failure.ordering_key not in (None, ordering_key):
                continue
            if failure.after > 0:
                failure.after -= 1
                return None
            failure.times -= 1
            if failure.times == 0:
                self.failures.remove(failure)
            self.failed_requests += 1
            return failure
        return None


@pytest.fixture
async def pubsub_server() -> AsyncIterator[PubSubServer]:
    """A Pub/Sub + token server on a free port, with topic TOPIC, requiring OAuth tokens."""
    server = PubSubServer()
    async with serve(server.app) as url:
        server.url = url
        yield server
