"""`pubsub`: publish each record of a batch as one Google Cloud Pub/Sub message (REST API).

A batch is NDJSON; `batch.keys` gives each line's (record id, session). Message i has
`data` = line i, attributes `id`, `firehose`, `account`, and, with `ordering`, the session
as `orderingKey`. Requests follow the `projects.topics.publish` reference: at most 1000
messages and 10 MB (serialized PublishRequest) each, and one ordering key per request. So a
batch is split into lanes, one per ordering key: a lane's requests go one after another,
in file order, and stop at the first failure; lanes run side by side. A message too big
for any request fails the batch without retry.

Authentication: an OAuth2 access token from the service-account key's JWT-bearer grant,
cached until shortly before it expires. Without credentials (an emulator at `endpoint`)
requests carry no Authorization header.

Pub/Sub is at-least-once. When some requests of a batch fail, the retry skips those
already accepted (remembered in memory per batch id); after a restart a retried batch is
published again, and consumers drop repeats by the `id` attribute.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlencode

import msgspec
import structlog
import yarl
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from firehosed.channels.base import Batch, Channel
from firehosed.channels.http import Answer, HttpClient, excerpt, redact_url, status_error
from firehosed.errors import DeliveryError, DestinationGone
from firehosed.units import Duration

log = structlog.get_logger(__name__)

DEFAULT_ENDPOINT = "https://pubsub.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/pubsub"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PUBLISH_PERMISSION = "pubsub.topics.publish"
# Pub/Sub limits (cloud.google.com/pubsub/quotas).
MAX_MESSAGES = 1000
MAX_REQUEST_BYTES = 10_000_000
MAX_ATTRIBUTE_VALUE = 1024
MAX_ORDERING_KEY = 1024
# Requests in flight at once per batch (across lanes).
CONCURRENT_REQUESTS = 16
# A token is refreshed this many seconds before Google says it expires.
TOKEN_MARGIN = 60.0
ASSERTION_LIFETIME = 3600
# Batches whose partly published progress is remembered, oldest forgotten first.
REMEMBERED_BATCHES = 64
_TOPIC = re.compile(r"projects/[^/]+/topics/[A-Za-z][-A-Za-z0-9._~%+]{2,254}")


class PubSubConfig(
    msgspec.Struct, tag="pubsub", tag_field="type", forbid_unknown_fields=True, kw_only=True
):
    """`type = "pubsub"`: each record becomes one message on `topic`.

    `credentials` is a service-account key (JSON text; usually `credentials_file`).
    `endpoint` points at an emulator when set; with no credentials, requests are sent
    without authentication, as the emulator wants. `ordering` sends each record's session
    as its ordering key. A batch holds at most `max_records` records (`max_wait` is
    accepted, not used: see Channel); a request not answered within `timeout` fails.
    """

    topic: str
    credentials: str | None = None
    credentials_env: str | None = None
    credentials_file: str | None = None
    endpoint: str = DEFAULT_ENDPOINT
    max_records: int = 1000
    max_wait: Duration = Duration(0.0)
    timeout: Duration = Duration(10.0)
    ordering: bool = True

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules, reported at config load as (key, message)."""
        found: list[tuple[str, str]] = []
        if not _TOPIC.fullmatch(self.topic):
            found.append(("topic", 'expected "projects/PROJECT/topics/TOPIC"'))
        endpoint = _http_url(self.endpoint)
        if endpoint is None:
            found.append(("endpoint", 'expected "https://host" (or http:// for an emulator)'))
        if self.credentials:
            try:
                load_service_account(self.credentials)
            except ValueError as exc:
                found.append(("credentials", str(exc)))
        elif endpoint is not None and (endpoint.host or "").endswith("googleapis.com"):
            found.append(
                (
                    "credentials",
                    "Google's endpoint needs a service-account key: set credentials_file "
                    "(or point endpoint at an emulator)",
                )
            )
        if self.max_records < 1:
            found.append(("max_records", "must be at least 1"))
        if self.timeout <= 0:
            found.append(("timeout", "must be greater than 0"))
        return found

    def warnings(self) -> list[tuple[str, str]]:
        """OAuth tokens (or the grant that gets them) that would cross in clear."""
        if not self.credentials:
            return []
        found = []
        endpoint = _http_url(self.endpoint)
        if endpoint is not None and endpoint.scheme == "http":
            found.append(
                ("endpoint", "an http:// endpoint gets the access token in clear: use https://")
            )
        try:
            token_uri = _http_url(load_service_account(self.credentials).token_uri)
        except ValueError:
            return found  # reported by problems()
        if token_uri is not None and token_uri.scheme == "http":
            key = "credentials_file" if self.credentials_file else "credentials"
            found.append((key, "the key's token_uri is http://: tokens are fetched in clear"))
        return found


def _http_url(text: str) -> yarl.URL | None:
    try:
        url = yarl.URL(text)
    except (TypeError, ValueError):
        return None
    return url if url.scheme in ("http", "https") and url.host else None


# --- credentials -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The parts of a service-account key file the JWT-bearer grant needs."""

    email: str
    key_id: str | None
    key: rsa.RSAPrivateKey
    token_uri: str


class _KeyFile(msgspec.Struct):
    type: str
    client_email: str
    private_key: str
    private_key_id: str | None = None
    token_uri: str = DEFAULT_TOKEN_URI


def load_service_account(text: str) -> ServiceAccount:
    """Parse a service-account key (JSON); raise ValueError naming the problem, never the key."""
    try:
        info = msgspec.json.decode(text, type=_KeyFile)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not a service-account key file: {exc}") from None
    if info.type != "service_account":
        raise ValueError(f'expected "type": "service_account", got {info.type!r}')
    try:
        key = serialization.load_pem_private_key(info.private_key.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("private_key is not an RSA key")
    if _http_url(info.token_uri) is None:
        raise ValueError("token_uri is not an http(s) URL")
    return ServiceAccount(info.client_email, info.private_key_id, key, info.token_uri)


class _Grant(msgspec.Struct):
    access_token: str
    expires_in: float = 3600.0


class TokenSource:
    """OAuth2 access tokens for one service account by the JWT-bearer grant (RFC 7523).

    A token is reused until TOKEN_MARGIN seconds before its expiry (or half its lifetime,
    if shorter); concurrent callers wait for one fetch. `clock` is monotonic seconds.
    """

    def __init__(
        self, account: ServiceAccount, http: HttpClient, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.account = account
        self.http = http
        self.clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid access token, fetched when none is cached or it is about to expire."""
        async with self._lock:
            token = self._token
            if token is None or self.clock() >= self._renew_at:
                fetched_at = self.clock()
                token, lifetime = await self._fetch()
                self._token = token
                self._renew_at = fetched_at + max(lifetime - TOKEN_MARGIN, lifetime / 2)
            return token

    def forget(self, token: str) -> None:
        """Drop `token` (the API refused it) unless already replaced; the next call fetches."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": JWT_BEARER, "assertion": self.assertion(int(time.time()))}
        answer = await self.http.request(
            "POST",
            self.account.token_uri,
            data=urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        where = redact_url(self.account.token_uri)
        if not answer.ok:
            detail = f"no token for {self.account.email}: {_oauth_error(answer.body)}"
            raise status_error(answer, where, detail)
        try:
            grant = msgspec.json.decode(answer.body, type=_Grant)
        except msgspec.MsgspecError as exc:
            raise DeliveryError(f"unexpected token answer from {where}: {exc}") from exc
        log.info(
            "pubsub.token_fetched", service_account=self.account.email, expires_in=grant.expires_in
        )
        return grant.access_token, grant.expires_in

    def assertion(self, now: int) -> str:
        """The signed JWT (RS256) asking `token_uri` for a Pub/Sub token."""
        header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
        if self.account.key_id:
            header["kid"] = self.account.key_id
        claims = {
            "iss": self.account.email,
            "scope": SCOPE,
            "aud": self.account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        signing_input = (
            f"{_b64url(msgspec.json.encode(header))}.{_b64url(msgspec.json.encode(claims))}"
        )
        signature = self.account.key.sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _OAuthError(msgspec.Struct):
    error: str
    error_description: str = ""


def _oauth_error(body: bytes) -> str:
    try:
        problem = msgspec.json.decode(body, type=_OAuthError)
    except msgspec.MsgspecError:
        return excerpt(body)
    return f"{problem.error} {problem.error_description}".strip()


# --- requests ----------------------------------------------------------------------


class _Attributes(msgspec.Struct):
    id: str
    firehose: str
    account: str


class _Message(msgspec.Struct, omit_defaults=True):
    # msgspec writes bytes as base64, which is what the REST API's `data` wants.
    data: bytes
    attributes: _Attributes
    ordering_key: str = msgspec.field(default="", name="orderingKey")


class _PublishRequest(msgspec.Struct):
    messages: list[_Message]


class _PublishResponse(msgspec.Struct):
    message_ids: list[str] = msgspec.field(default_factory=list, name="messageIds")


class _Permissions(msgspec.Struct):
    permissions: list[str] = msgspec.field(default_factory=list)


class _GoogleError(msgspec.Struct):
    message: str = ""
    status: str = ""


class _GoogleErrorBody(msgspec.Struct):
    error: _GoogleError


@dataclass(frozen=True, slots=True)
class Publish:
    """One publish request: its number in the batch's plan, ordering key and messages."""

    number: int
    ordering_key: str
    messages: list[_Message]


def _field_size(length: int) -> int:
    """Serialized size of one length-delimited protobuf field holding `length` bytes."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def _attribute_size(name: str, value: str) -> int:
    # A map entry is a nested message: key (field 1) and value (field 2).
    return _field_size(_field_size(len(name)) + _field_size(len(value.encode())))


def message_size(message: _Message) -> int:
    """Size this message adds to a serialized PublishRequest (the unit of the 10 MB limit)."""
    attributes = message.attributes
    size = _field_size(len(message.data)) if message.data else 0
    size += _attribute_size("id", attributes.id)
    size += _attribute_size("firehose", attributes.firehose)
    size += _attribute_size("account", attributes.account)
    if message.ordering_key:
        size += _field_size(len(message.ordering_key.encode()))
    return _field_size(size)


def plan(
    records: Sequence[bytes], batch: Batch, *, topic: str, ordering: bool
) -> list[list[Publish]]:
    """Split records into publish requests within Pub/Sub's limits, one lane per ordering key.

    A lane's requests must be sent in order; lanes are independent. The plan is the same
    for the same batch, so request numbers identify requests across retries. Raises
    DeliveryError(retryable=False) for a record no request can carry.
    """
    lanes: dict[str, list[tuple[_Message, int]]] = {}
    base = _field_size(len(topic.encode()))
    for index, (record, (record_id, session)) in enumerate(zip(records, batch.keys, strict=True)):
        key = (session or "") if ordering else ""
        message = _Message(record, _Attributes(record_id, batch.firehose, batch.account), key)
        size = message_size(message)
        if problem := _too_big(message, base + size):
            raise DeliveryError(f"record {index} of batch {batch.id}: {problem}", retryable=False)
        lanes.setdefault(key, []).append((message, size))
    numbers = itertools.count()
    return [list(_requests(key, entries, base, numbers)) for key, entries in lanes.items()]


def _too_big(message: _Message, request_size: int) -> str | None:
    if request_size > MAX_REQUEST_BYTES:
        return f"{len(message.data)} bytes is over Pub/Sub's 10 MB message limit"
    if len(message.attributes.id.encode()) > MAX_ATTRIBUTE_VALUE:
        return f"its id is over Pub/Sub's {MAX_ATTRIBUTE_VALUE}-byte attribute limit"
    if len(message.ordering_key.encode()) > MAX_ORDERING_KEY:
        return f"its session is over Pub/Sub's {MAX_ORDERING_KEY}-byte ordering key limit"
    return None


def _requests(
    key: str, entries: list[tuple[_Message, int]], base: int, numbers: Iterator[int]
) -> Iterator[Publish]:
    messages: list[_Message] = []
    size = base
    for message, message_bytes in entries:
        if messages and (len(messages) == MAX_MESSAGES or size + message_bytes > MAX_REQUEST_BYTES):
            yield Publish(next(numbers), key, messages)
            messages, size = [], base
        messages.append(message)
        size += message_bytes
    if messages:
        yield Publish(next(numbers), key, messages)


def _records(data: bytes, encoding: str | None) -> list[bytes]:
    if encoding == "gzip":
        data = gzip.decompress(data)
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _google_error(body: bytes) -> str:
    try:
        error = msgspec.json.decode(body, type=_GoogleErrorBody).error
    except msgspec.MsgspecError:
        return excerpt(body)
    return f"{error.status}: {error.message}".strip(": ")


_encode = msgspec.json.Encoder().encode


class PubSubChannel(Channel):
    """Publishes batches to one topic through the REST API; one aiohttp session, reused."""

    stream: ClassVar[bool] = True
    format: ClassVar[str | None] = "ndjson"

    def __init__(self, name: str, config: PubSubConfig) -> None:
        super().__init__(name)
        self.topic = config.topic
        self.ordering = config.ordering
        self.max_records = config.max_records
        self.max_wait = config.max_wait
        self.topic_url = f"{config.endpoint.rstrip('/')}/v1/{config.topic}"
        self.where = redact_url(self.topic_url)
        self.http = HttpClient(timeout=config.timeout)
        self.tokens = (
            TokenSource(load_service_account(config.credentials), self.http)
            if config.credentials
            else None
        )
        # Numbers of the publish requests already accepted, per batch id, so that a
        # retry after a partial failure does not publish them again.
        self._published: OrderedDict[str, set[int]] = OrderedDict()

    async def put(self, batch: Batch) -> None:
        try:
            records = _records(await batch.read(), batch.content_encoding)
        except (OSError, EOFError, zlib.error) as exc:
            raise DeliveryError(f"cannot read batch file {batch.path}: {exc}") from exc
        if len(records) != len(batch.keys):
            raise DeliveryError(
                f"batch {batch.id} holds {len(records)} records but {len(batch.keys)} keys",
                retryable=False,
            )
        lanes = plan(records, batch, topic=self.topic, ordering=self.ordering)
        if self.tokens is not None:
            # Once here, not once per lane: a refused key costs one token request.
            await self.tokens.token()
        await self._publish_lanes(batch.id, lanes)
        log.debug(
            "pubsub.published",
            channel=self.name,
            batch=batch.id,
            records=len(records),
            requests=sum(map(len, lanes)),
        )

    async def check(self) -> str:
        """Authenticate and ask Pub/Sub whether we may publish to the topic, publishing nothing.

        With credentials: `topics.testIamPermissions` for pubsub.topics.publish. Without
        (an emulator, which has no IAM): `topics.get`, proving the topic exists.
        """
        if self.tokens is None:
            await self._call("GET", self.topic_url)
            return f"pubsub topic {self.where} exists (no credentials: emulator)"
        email = self.tokens.account.email
        body = _encode({"permissions": [PUBLISH_PERMISSION]})
        answer = await self._call("POST", f"{self.topic_url}:testIamPermissions", body)
        try:
            granted = msgspec.json.decode(answer.body, type=_Permissions).permissions
        except msgspec.MsgspecError as exc:
            raise DeliveryError(f"unexpected answer from {self.where}: {exc}") from exc
        if PUBLISH_PERMISSION not in granted:
            raise DeliveryError(
                f"{email} lacks {PUBLISH_PERMISSION} on {self.topic}: grant roles/pubsub.publisher"
            )
        return f"pubsub topic {self.where}: {email} may publish"

    async def close(self) -> None:
        await self.http.close()

    async def _publish_lanes(self, batch_id: str, lanes: list[list[Publish]]) -> None:
        done = self._published.setdefault(batch_id, set())
        self._published.move_to_end(batch_id)
        while len(self._published) > REMEMBERED_BATCHES:
            self._published.popitem(last=False)
        limit = asyncio.Semaphore(CONCURRENT_REQUESTS)
        failed = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._run_lane(lane, done, limit, failed)) for lane in lanes]
        failures = [error for task in tasks if (error := task.result()) is not None]
        if failures:
            raise _first_of(failures, sum(map(len, lanes)) - len(done))
        self._published.pop(batch_id, None)

    async def _run_lane(
        self, lane: list[Publish], done: set[int], limit: asyncio.Semaphore, failed: asyncio.Event
    ) -> DeliveryError | None:
        """Send a lane's requests in order; stop at the first failure to keep the order.

        A failure anywhere stops every lane, so that an outage costs a few failed
        requests per attempt, not one per session.
        """
        for publish in lane:
            if publish.number in done:
                continue
            async with limit:
                if failed.is_set():
                    return None
                try:
                    await self._publish(publish)
                except DeliveryError as exc:
                    failed.set()
                    return exc
            done.add(publish.number)
        return None

    async def _publish(self, publish: Publish) -> None:
        body = _encode(_PublishRequest(publish.messages))
        answer = await self._call("POST", f"{self.topic_url}:publish", body)
        try:
            ids = msgspec.json.decode(answer.body, type=_PublishResponse).message_ids
        except msgspec.MsgspecError:
            ids = []
        if len(ids) != len(publish.messages):
            raise DeliveryError(
                f"{self.where} acknowledged {len(ids)} of {len(publish.messages)} messages"
            )

    async def _call(self, method: str, url: str, body: bytes = b"") -> Answer:
        headers = {"Content-Type": "application/json"}
        token = await self.tokens.token() if self.tokens is not None else None
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        answer = await self.http.request(method, url, data=body, headers=headers)
        if answer.status == 401 and self.tokens is not None and token is not None:
            self.tokens.forget(token)
        if not answer.ok:
            raise status_error(answer, redact_url(url), _google_error(answer.body))
        return answer


def _first_of(failures: list[DeliveryError], pending: int) -> DeliveryError:
    """One error for a batch whose lanes failed: the first lane's, with the count left."""
    first = failures[0]
    if isinstance(first, DestinationGone):
        return first
    hints = [f.retry_after for f in failures if f.retry_after is not None]
    return DeliveryError(
        f"{pending} publish requests not accepted; first failure: {first}",
        retryable=all(f.retryable for f in failures),
        retry_after=max(hints, default=None),
    )
