"""The http runner against real twisted.web servers on 127.0.0.1, in the same reactor."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, cast

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorSSL, IReactorTCP
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.certs import PKI, cert_pem, make_pki
from ztick_tw import __version__
from ztick_tw.model import HttpSpec, ShellSpec
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.runners.http import HttpRunner, load_trust_root
from ztick_tw.runners.message import NetworkOptions

DUE_NS = 1_700_000_000_123_456_789
FIRED_NS = 1_700_000_000_200_000_000
REACTOR_TCP = cast(IReactorTCP, reactor)
REACTOR_SSL = cast(IReactorSSL, reactor)

#: What a handler returns: a status code and a body (or NOT_DONE_YET to answer later).
Handler = Callable[[Request], tuple[int, bytes] | int]


def _brief(outcome: Outcome) -> Outcome:
    """``outcome`` without the details (output...): success, reason, interrupted."""
    return Outcome(outcome.success, outcome.reason, outcome.interrupted)


def _execution(
    method: str, url: str, job_id: str = "job.1", attempt: int = 1, timeout: float | None = None
) -> Execution:
    spec = HttpSpec(method, url)
    return Execution(job_id, DUE_NS, "rule.http", attempt, spec, FIRED_NS, timeout)


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    uri: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Recorder(Resource):
    """Records every request and answers with ``handler``."""

    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    hung: list[Request] = field(default_factory=list)
    isLeaf: ClassVar[bool] = True  # type: ignore[misc]

    def __post_init__(self) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.uri is not None
        assert request.content is not None
        headers = {
            name.decode().lower(): b",".join(values).decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.seen.append(
            Seen(request.method.decode(), request.uri.decode(), headers, request.content.read())
        )
        answer = self.handler(request)
        if answer == NOT_DONE_YET:
            self.hung.append(request)
            return NOT_DONE_YET
        assert isinstance(answer, tuple)
        request.setResponseCode(answer[0])
        return answer[1]


class _Connections(WrappingFactory):
    """Counts the connections a server accepted and knows which are still open."""

    def __init__(self, factory: Site) -> None:
        super().__init__(factory)  # type: ignore[no-untyped-call]
        self.accepted = 0

    def registerProtocol(self, p: Any) -> None:
        self.accepted += 1
        super().registerProtocol(p)  # type: ignore[no-untyped-call]


@dataclass
class Server:
    """A listening test server."""

    port: IListeningPort
    resource: _Recorder
    connections: _Connections
    scheme: str = "http"
    host: str = "127.0.0.1"

    def url(self, path: str = "/hook", host: str | None = None, userinfo: str = "") -> str:
        number = self.port.getHost().port  # type: ignore[attr-defined]
        return f"{self.scheme}://{userinfo}{host or self.host}:{number}{path}"

    @property
    def seen(self) -> list[Seen]:
        return self.resource.seen


@implementer(ILogObserver)
class _Events:
    """Collects the events the http runner logs."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith("ztick_tw.runners.http"):
            self.events.append(event)

    def everything(self) -> str:
        """Every message and every field value, for leak checks."""
        return "\n".join(formatEvent(e) + repr(sorted(e.items())) for e in self.events)


def _ok(request: Request) -> tuple[int, bytes]:
    return 200, b"ok"


class _Base(unittest.TestCase):
    pki: ClassVar[PKI]
    pki_dir: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.pki_dir = tempfile.mkdtemp(prefix="ztick-tw-http-")
        cls.pki = make_pki(cls.pki_dir)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.pki_dir, True)

    def setUp(self) -> None:
        self.log = _Events()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def server(
        self, handler: Handler = _ok, *, tls: bool = False, interface: str = "127.0.0.1"
    ) -> Server:
        resource = _Recorder(handler)
        connections = _Connections(Site(resource))  # type: ignore[no-untyped-call]
        factory: Any = connections  # a WrappingFactory is a ServerFactory in practice
        if tls:
            pki = self.pki
            # pyOpenSSL takes cryptography objects (its own types are deprecated).
            options = CertificateOptions(
                privateKey=pki.server.key,  # type: ignore[arg-type]
                certificate=pki.server.cert,  # type: ignore[arg-type]
                extraCertChain=[pki.intermediate.cert],  # type: ignore[list-item]
            )
            port = REACTOR_SSL.listenSSL(0, factory, options, interface=interface)
        else:
            port = REACTOR_TCP.listenTCP(0, factory, interface=interface)
        server = Server(port, resource, connections, "https" if tls else "http", interface)
        self.addCleanup(self._close_server, server)
        return server

    async def _close_server(self, server: Server) -> None:
        await maybeDeferred(server.port.stopListening)
        for request in server.resource.hung:
            if not request.finished and not request._disconnected:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
        for _ in range(200):
            if not server.connections.protocols:
                return
            await deferLater(reactor, 0.01, lambda: None)
        for protocol in list(server.connections.protocols):
            protocol.transport.abortConnection()
        await deferLater(reactor, 0.01, lambda: None)

    def runner(self, **options: Any) -> HttpRunner:
        runner = HttpRunner(reactor, NetworkOptions(**options))
        self.addCleanup(runner.stop, 0)
        return runner

    async def wait_closed(self, server: Server) -> bool:
        """Wait until the server holds no open connection (the client closed them)."""
        for _ in range(200):
            if not server.connections.protocols:
                return True
            await deferLater(reactor, 0.01, lambda: None)
        return False


class RequestTests(_Base):
    def test_provides_irunner(self) -> None:
        """HttpRunner provides IRunner and starts with nothing running."""
        runner = self.runner()
        assert verifyObject(IRunner, runner)
        assert runner.running == 0

    async def test_post_ztick_body_and_headers(self) -> None:
        """POST sends ztick's exact body as JSON, the job id and the user agent."""
        server = self.server()
        outcome = await self.runner().run(_execution("POST", server.url("/hook"), "a.job"))
        assert _brief(outcome) == Outcome(True)
        [seen] = server.seen
        assert seen.method == "POST"
        assert seen.uri == "/hook"
        assert seen.body == b'{"job_id":"a.job","execution":1700000000123456789}'
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["x-ztick-job-id"] == "a.job"
        assert seen.headers["user-agent"] == f"ztick-tw/{__version__}"
        assert seen.headers["content-length"] == str(len(seen.body))
        assert "x-ztick-signature" not in seen.headers
        assert "x-ztick-timestamp" not in seen.headers
        assert "authorization" not in seen.headers

    async def test_put_json_format(self) -> None:
        """With message_format json, PUT sends the rich document."""
        server = self.server()
        runner = self.runner(message_format="json")
        outcome = await runner.run(_execution("PUT", server.url("/p?x=1"), "j.2", attempt=3))
        assert outcome.success, outcome
        [seen] = server.seen
        assert seen.method == "PUT"
        assert seen.uri == "/p?x=1"
        assert json.loads(seen.body) == {
            "job_id": "j.2",
            "execution": DUE_NS,
            "fired": FIRED_NS,
            "attempt": 3,
            "rule_id": "rule.http",
        }
        assert seen.headers["content-type"] == "application/json"

    async def test_get_and_delete_have_no_body(self) -> None:
        """GET and DELETE send no body and no Content-Type, but the job id header."""
        server = self.server()
        runner = self.runner()
        for method in ("GET", "DELETE"):
            outcome = await runner.run(_execution(method, server.url(), f"{method}.job"))
            assert _brief(outcome) == Outcome(True), method
        assert [s.method for s in server.seen] == ["GET", "DELETE"]
        for seen in server.seen:
            assert seen.body == b""
            assert "content-type" not in seen.headers
            assert seen.headers.get("content-length", "0") == "0"
            assert seen.headers["x-ztick-job-id"] == f"{seen.method}.job"

    async def test_2xx_statuses_succeed(self) -> None:
        """200, 201 and 204 are all success."""
        codes = iter([200, 201, 204])
        server = self.server(lambda request: (next(codes), b""))
        runner = self.runner()
        for _ in range(3):
            assert _brief(await runner.run(_execution("POST", server.url()))) == Outcome(True)
        assert len(server.seen) == 3

    async def test_error_statuses_fail_with_status(self) -> None:
        """500 and 404 fail; the reason names the method, URL, status and body start."""
        start = b"boom\x00 \n happened"
        answers = iter([(500, start + b"x" * 1000), (404, b"")])
        server = self.server(lambda request: next(answers))
        runner = self.runner()
        url = server.url("/x")
        failed = await runner.run(_execution("POST", url))
        assert not failed.success and not failed.interrupted
        # The first 200 bytes of the body, made one printable line.
        assert failed.reason == f"http POST {url}: status 500: boom happened" + "x" * (
            200 - len(start)
        )
        missing = await runner.run(_execution("GET", url))
        assert _brief(missing) == Outcome(False, f"http GET {url}: status 404")

    async def test_redirect_not_followed(self) -> None:
        """A 302 is a failure and the Location is not fetched."""

        def redirect(request: Request) -> tuple[int, bytes]:
            request.setHeader(b"Location", b"/elsewhere")  # type: ignore[no-untyped-call]
            return 302, b"moved"

        server = self.server(redirect)
        outcome = await self.runner().run(_execution("POST", server.url("/r")))
        assert _brief(outcome) == Outcome(
            False, f"http POST {server.url('/r')}: status 302 (redirects are not followed)"
        )
        assert [s.uri for s in server.seen] == ["/r"]

    async def test_connection_refused(self) -> None:
        """A closed port fails the job with ``connection refused``."""
        server = self.server()
        url = server.url()
        await maybeDeferred(server.port.stopListening)
        outcome = await self.runner().run(_execution("POST", url))
        assert _brief(outcome) == Outcome(False, f"http POST {url}: connection refused")

    async def test_dns_failure(self) -> None:
        """A host name that does not resolve fails with a dns reason."""
        outcome = await self.runner().run(_execution("GET", "http://ztick-test.invalid/x"))
        assert _brief(outcome) == Outcome(
            False, "http GET http://ztick-test.invalid/x: dns lookup failed"
        )

    async def test_bad_specs_fail_at_once(self) -> None:
        """A wrong scheme, method or spec kind fails without any network access."""
        runner = self.runner()
        ftp = await runner.run(_execution("GET", "ftp://h/x"))
        assert _brief(ftp) == Outcome(False, "http GET ftp://h/x: url must be http:// or https://")
        patch = await runner.run(_execution("PATCH", "http://h/x"))
        assert _brief(patch) == Outcome(False, "http PATCH http://h/x: unsupported method")
        shell = Execution("j", DUE_NS, "r", 1, ShellSpec("true"))
        assert not (await runner.run(shell)).success
        assert runner.running == 0

    async def test_signature(self) -> None:
        """With a secret, the timestamp and HMAC-SHA256 signature headers verify."""
        server = self.server()
        secret = b"top-secret"
        runner = self.runner(http_signing_secret=secret)
        before = int(reactor.seconds())
        assert (await runner.run(_execution("POST", server.url(), "sig.job"))).success
        assert (await runner.run(_execution("DELETE", server.url(), "sig.del"))).success
        for seen in server.seen:
            timestamp = seen.headers["x-ztick-timestamp"]
            assert before <= int(timestamp) <= int(reactor.seconds())
            job_id = seen.headers["x-ztick-job-id"]
            signed = f"{timestamp}.{job_id}.".encode() + seen.body
            expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
            assert seen.headers["x-ztick-signature"] == "sha256=" + expected
        assert server.seen[1].body == b""

    async def test_basic_auth_from_userinfo(self) -> None:
        """user:password in the URL becomes Basic auth and never reaches reasons or logs."""
        answers = iter([(200, b""), (500, b"nope")])
        server = self.server(lambda request: next(answers))
        runner = self.runner()
        url = server.url("/a?token=tok-value", userinfo="alice:pa%40ss-word@")
        assert _brief(await runner.run(_execution("POST", url))) == Outcome(True)
        seen = server.seen[0]
        expected = base64.b64encode(b"alice:pa@ss-word").decode()
        assert seen.headers["authorization"] == f"Basic {expected}"
        assert seen.uri == "/a?token=tok-value"
        assert seen.headers["host"] == f"127.0.0.1:{server.port.getHost().port}"  # type: ignore[attr-defined]
        failed = await runner.run(_execution("POST", url, "auth.fail"))
        assert not failed.success
        port = server.port.getHost().port  # type: ignore[attr-defined]
        assert (
            failed.reason == f"http POST http://alice:***@127.0.0.1:{port}/a?***: status 500: nope"
        )
        [event] = [e for e in self.log.events if e.get("job_id") == "auth.fail"]
        assert event["reason"] == failed.reason
        assert event["log_level"] == LogLevel.debug  # the scheduler warns, not the runner
        logged = self.log.everything()
        for secret in ("pa%40ss-word", "pa@ss-word", "tok-value"):
            assert secret not in failed.reason
            assert secret not in logged

    async def test_credentials_hidden_on_connection_failure(self) -> None:
        """A refused connection's reason and logs hide the password too."""
        server = self.server()
        url = server.url(userinfo="bob:hunter2@")
        await maybeDeferred(server.port.stopListening)
        outcome = await self.runner().run(_execution("GET", url, "refused.job"))
        assert outcome.reason.endswith("connection refused")
        assert "bob:***@" in outcome.reason
        assert "hunter2" not in outcome.reason
        assert "refused.job" in self.log.everything()
        assert "hunter2" not in self.log.everything()


class LimitTests(_Base):
    async def test_timeout_on_hung_server(self) -> None:
        """A server that never answers ends the job at the timeout; the connection is dropped."""
        server = self.server(lambda request: NOT_DONE_YET)
        runner = self.runner(timeout=0.5)
        start = reactor.seconds()
        outcome = await runner.run(_execution("POST", server.url()))
        elapsed = reactor.seconds() - start
        assert _brief(outcome) == Outcome(False, f"http POST {server.url()}: timed out after 0.5s")
        assert outcome.timed_out and outcome.output == b""
        assert elapsed >= 0.45  # not before the timeout; a hung server holds it forever
        assert runner.running == 0
        # The client aborted the connection: it is not kept for the next job.
        assert await self.wait_closed(server)
        assert server.connections.accepted == 1

    async def test_timeout_while_reading_body(self) -> None:
        """A response whose body stalls times out; the reason names the status seen."""

        def stall(request: Request) -> int:
            request.setHeader(b"Content-Length", b"1000")  # type: ignore[no-untyped-call]
            request.write(b"partial")  # type: ignore[no-untyped-call]
            return NOT_DONE_YET

        server = self.server(stall)
        runner = self.runner(timeout=0.3)
        outcome = await runner.run(_execution("PUT", server.url()))
        assert _brief(outcome) == Outcome(
            False,
            f"http PUT {server.url()}: timed out after 0.3s"
            " (reading the body of a status 200 response)",
        )
        assert outcome.timed_out and outcome.output == b"status 200\npartial"
        assert await self.wait_closed(server)

    async def test_large_body_is_bounded(self) -> None:
        """A 10 MB body is read only up to the limit, then that connection is closed."""
        big = b"y" * (10 * 1024 * 1024)
        answers = iter([(200, big), (200, b"small")])
        server = self.server(lambda request: next(answers))
        runner = self.runner(http_max_response_bytes=4096)
        outcome = await runner.run(_execution("POST", server.url()))
        assert _brief(outcome) == Outcome(True)
        assert await self.wait_closed(server)
        assert (await runner.run(_execution("POST", server.url()))).success
        assert server.connections.accepted == 2

    async def test_large_error_body_quoted_briefly(self) -> None:
        """A failing status with a huge body: the reason quotes at most 200 bytes of it."""
        server = self.server(lambda request: (503, b"z" * (1024 * 1024)))
        runner = self.runner(http_max_response_bytes=1000)
        outcome = await runner.run(_execution("POST", server.url()))
        assert _brief(outcome) == Outcome(
            False, f"http POST {server.url()}: status 503: " + "z" * 200
        )

    async def test_connections_reused(self) -> None:
        """20 sequential jobs to one server share keep-alive connections."""
        server = self.server(lambda request: (200, b"fine, thanks"))
        runner = self.runner()
        for n in range(20):
            assert (await runner.run(_execution("POST", server.url(), f"seq.{n}"))).success
        assert len(server.seen) == 20
        assert server.connections.accepted < 20
        assert server.connections.accepted == 1

    async def test_http_1_0_server_connections_are_not_reused(self) -> None:
        """An HTTP/1.0 server closes after each response: no job fails on a stale socket.

        Python's ``http.server`` answers HTTP/1.0 without ``Connection: close`` and then
        closes the connection; pooling it would fail the next POST with "connection
        closed before the response".
        """

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

        http10 = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        http10.daemon_threads = True
        thread = threading.Thread(target=http10.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(http10.server_close)
        self.addCleanup(http10.shutdown)
        url = f"http://127.0.0.1:{http10.server_address[1]}/hook"
        runner = self.runner()
        for round_ in range(3):
            runs = [runner.run(_execution("POST", url, f"r{round_}.{n}")) for n in range(20)]
            assert [_brief(o) for o in await gatherResults(runs)] == [Outcome(True)] * 20

    async def test_concurrent_jobs(self) -> None:
        """200 jobs started together all succeed, over a bounded number of connections."""
        server = self.server()
        runner = HttpRunner(reactor, NetworkOptions(), max_connections_per_host=8)
        self.addCleanup(runner.stop, 0)
        runs = [runner.run(_execution("POST", server.url(), f"c.{n}")) for n in range(200)]
        assert runner.running == 200
        outcomes = await gatherResults(runs)
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 200
        assert sorted(s.headers["x-ztick-job-id"] for s in server.seen) == sorted(
            f"c.{n}" for n in range(200)
        )
        assert server.connections.accepted <= 8
        assert runner.running == 0

    async def test_queued_job_times_out(self) -> None:
        """A job waiting for a connection behind a hung one times out too, unsent."""
        server = self.server(lambda request: NOT_DONE_YET)
        runner = HttpRunner(reactor, NetworkOptions(timeout=0.3), max_connections_per_host=1)
        self.addCleanup(runner.stop, 0)
        first = runner.run(_execution("POST", server.url(), "first"))
        second = runner.run(_execution("POST", server.url(), "second"))
        outcomes = await gatherResults([first, second])
        assert [o.reason.endswith("timed out after 0.3s") for o in outcomes] == [True, True]
        assert [s.headers["x-ztick-job-id"] for s in server.seen] == ["first"]


class StopTests(_Base):
    async def test_stop_interrupts_hung_request(self) -> None:
        """stop() ends a hung request after the grace with interrupted=True."""
        server = self.server(lambda request: NOT_DONE_YET)
        runner = HttpRunner(reactor, NetworkOptions(timeout=30))
        hung = runner.run(_execution("POST", server.url(), "hung"))
        while not server.seen:
            await deferLater(reactor, 0.01, lambda: None)
        assert runner.running == 1
        start = reactor.seconds()
        await runner.stop(0.2)
        # After the grace, well before the request's own 30 s timeout (a loaded CI is slow).
        assert 0.15 <= reactor.seconds() - start < 15
        outcome = await hung
        assert _brief(outcome) == Outcome(False, "stopped at shutdown", interrupted=True)
        assert runner.running == 0
        late = await runner.run(_execution("POST", server.url(), "late"))
        assert _brief(late) == Outcome(False, "runner stopped")
        assert len(server.seen) == 1
        assert await self.wait_closed(server)

    async def test_stop_interrupts_queued_jobs(self) -> None:
        """Jobs still waiting for a connection are interrupted too, and never sent."""
        server = self.server(lambda request: NOT_DONE_YET)
        runner = HttpRunner(reactor, NetworkOptions(), max_connections_per_host=1)
        runs = [runner.run(_execution("POST", server.url(), f"q.{n}")) for n in range(3)]
        while not server.seen:
            await deferLater(reactor, 0.01, lambda: None)
        assert runner.running == 3
        await runner.stop(0.05)
        outcomes = await gatherResults(runs)
        assert [_brief(o) for o in outcomes] == [
            Outcome(False, "stopped at shutdown", interrupted=True)
        ] * 3
        assert [s.headers["x-ztick-job-id"] for s in server.seen] == ["q.0"]
        assert server.connections.accepted == 1
        assert runner.running == 0

    async def test_stop_waits_for_requests_within_grace(self) -> None:
        """A request that finishes within the grace period keeps its real outcome."""
        pending: list[Request] = []

        def later(request: Request) -> int:
            pending.append(request)

            def answer() -> None:
                request.setResponseCode(201)
                request.finish()  # type: ignore[no-untyped-call]

            reactor.callLater(0.1, answer)
            return NOT_DONE_YET

        server = self.server(later)
        runner = HttpRunner(reactor, NetworkOptions())
        run = runner.run(_execution("POST", server.url(), "slow"))
        while not pending:
            await deferLater(reactor, 0.01, lambda: None)
        start = reactor.seconds()
        await runner.stop(5)
        assert reactor.seconds() - start < 4.5  # when the answer came, not the 5 s grace
        assert _brief(await run) == Outcome(True)
        assert await self.wait_closed(server)

    async def test_stop_idle(self) -> None:
        """Stopping an idle runner closes its pooled connections and fires at once."""
        server = self.server()
        runner = HttpRunner(reactor, NetworkOptions())
        assert (await runner.run(_execution("GET", server.url()))).success
        assert server.connections.protocols  # kept alive for reuse
        await runner.stop(1)
        assert await self.wait_closed(server)
        second: Deferred[None] = runner.stop(1)
        assert second.called


class HttpsTests(_Base):
    async def test_trusted_ca(self) -> None:
        """An https chain leading to http_ca_file is accepted, by IP and by DNS name."""
        server = self.server(tls=True)
        runner = self.runner(http_ca_file=self.pki.ca.cert_path)
        assert _brief(await runner.run(_execution("POST", server.url()))) == Outcome(True)
        by_name = await runner.run(_execution("POST", server.url(host="localhost")))
        assert _brief(by_name) == Outcome(True)
        assert server.seen[0].body == b'{"job_id":"job.1","execution":1700000000123456789}'

    async def test_bundle_with_several_certificates(self) -> None:
        """Every certificate in the CA bundle is trusted, not only the first one."""
        bundle = os.path.join(self.pki_dir, "bundle.pem")
        with open(bundle, "wb") as f:
            f.write(cert_pem(self.pki.other_ca.cert, self.pki.ca.cert))
        server = self.server(tls=True)
        runner = self.runner(http_ca_file=bundle)
        assert _brief(await runner.run(_execution("GET", server.url()))) == Outcome(True)

    async def test_untrusted_ca(self) -> None:
        """A chain that does not lead to the configured CA fails with a TLS reason."""
        server = self.server(tls=True)
        runner = self.runner(http_ca_file=self.pki.other_ca.cert_path)
        outcome = await runner.run(_execution("POST", server.url()))
        assert not outcome.success
        assert outcome.reason.startswith(f"http POST {server.url()}: tls error: ")
        assert "certificate verify failed" in outcome.reason
        assert server.seen == []

    async def test_wrong_host_name(self) -> None:
        """A certificate for another host name fails, even from a trusted CA."""
        try:
            server = self.server(tls=True, interface="127.0.0.2")
        except Exception as e:  # pragma: no cover - some systems only have 127.0.0.1
            raise unittest.SkipTest(f"cannot listen on 127.0.0.2: {e}") from e
        runner = self.runner(http_ca_file=self.pki.ca.cert_path)
        outcome = await runner.run(_execution("POST", server.url()))
        assert not outcome.success
        assert outcome.reason.startswith(f"http POST {server.url()}: tls error: ")
        assert "host" in outcome.reason
        assert server.seen == []

    def test_bad_ca_file(self) -> None:
        """A missing or certificate-less CA file is refused when the runner is made."""
        with pytest.raises(ValueError, match=r"/nonexistent/ca\.pem"):
            HttpRunner(reactor, NetworkOptions(http_ca_file="/nonexistent/ca.pem"))
        empty = os.path.join(self.pki_dir, "empty.pem")
        with open(empty, "w") as f:
            f.write("nothing here\n")
        with pytest.raises(ValueError, match="no PEM certificate"):
            load_trust_root(empty)


class OutcomeDetailTests(_Base):
    """Issue 10: output, the run's own timeout, and cancel."""

    async def test_output_is_status_and_body_tail(self) -> None:
        """The outcome's output is ``status N``, a newline and the tail of the body."""
        answers = iter([(201, b"a" * 10 + b"END"), (404, b"nope")])
        server = self.server(lambda request: next(answers))
        runner = self.runner(output_limit_bytes=8)
        created = await runner.run(_execution("POST", server.url()))
        assert created == Outcome(True, output=b"status 201\naaaaaEND")
        missing = await runner.run(_execution("GET", server.url()))
        assert missing.output == b"status 404\nnope" and not missing.success

    async def test_execution_timeout_over_the_default(self) -> None:
        """The run's own timeout wins over ``[runners] timeout``; the request is aborted."""
        server = self.server(lambda request: NOT_DONE_YET)
        runner = self.runner(timeout=30)
        outcome = await runner.run(_execution("POST", server.url(), timeout=0.3))
        assert outcome == Outcome(
            False, f"http POST {server.url()}: timed out after 0.3s", timed_out=True
        )
        assert await self.wait_closed(server)
        assert runner.running == 0

    async def test_cancel_aborts_the_request(self) -> None:
        """Cancel fires cancelled at once (no CancelledError) and drops the connection."""
        server = self.server(lambda request: NOT_DONE_YET)
        runner = self.runner()
        run = runner.run(_execution("POST", server.url()))
        for _ in range(400):
            if server.seen:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert len(server.seen) == 1
        run.cancel()
        assert run.called
        assert await run == Outcome(False, "cancelled", cancelled=True)
        assert runner.running == 0
        assert await self.wait_closed(server)

    async def test_cancel_while_waiting_for_a_connection_drops_it(self) -> None:
        """A delivery cancelled before it got a connection is never sent."""
        server = self.server(lambda r: NOT_DONE_YET if r.uri == b"/hang" else (200, b"ok"))
        runner = HttpRunner(reactor, NetworkOptions(), max_connections_per_host=1)
        self.addCleanup(runner.stop, 0)
        hung = runner.run(_execution("POST", server.url("/hang"), "a"))
        dropped = runner.run(_execution("POST", server.url(), "b"))
        last = runner.run(_execution("POST", server.url(), "c"))
        dropped.cancel()
        assert (await dropped).cancelled
        for _ in range(400):
            if server.seen:
                break
            await deferLater(reactor, 0.01, lambda: None)
        hung.cancel()  # frees the connection slot: "c" is next, "b" is skipped
        assert (await hung).cancelled
        assert _brief(await last) == Outcome(True)
        assert [seen.headers["x-ztick-job-id"] for seen in server.seen] == ["a", "c"]

    async def test_cancel_after_the_end_does_nothing(self) -> None:
        """Cancelling a finished delivery keeps its outcome."""
        server = self.server()
        run = self.runner().run(_execution("POST", server.url()))
        first = await run
        run.cancel()
        assert await run == first == Outcome(True, output=b"status 200\nok")
