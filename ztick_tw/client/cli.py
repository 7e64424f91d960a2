"""``ztick-tw cli`` (interactive, like redis-cli) and the one-shot subcommands.

Interactive: a prompt, readline line editing, a history file (``--history-file``,
``$ZTICK_TW_HISTFILE``, default ``~/.ztick_tw_history``), Tab completes instruction
words; lines are split like protocol lines (``"..."`` for a token with spaces).
One-shot: ``ztick-tw get backup.daily --json``; exit status 0, 1 on ``ERROR`` (or no
connection), 2 on a usage problem.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from ztick_tw.client.blocking import ZtickClient, tls_context
from ztick_tw.client.commands import HELP, SUBWORDS, Usage, execute, normalize
from ztick_tw.client.wire import INSTRUCTIONS, ProtocolError, ZtickError
from ztick_tw.protocol.tokenizer import TokenizeError, tokenize

#: The subcommands of ``ztick-tw`` that run one instruction.
ONE_SHOT = tuple(w.lower() for w in INSTRUCTIONS)

OPTIONS_HELP = """\
connection options (any subcommand):
  --host HOST        daemon address (default 127.0.0.1, or $ZTICK_TW_HOST)
  --port PORT        daemon port (default 5678, or $ZTICK_TW_PORT)
  --unix PATH        a UNIX socket instead of host and port
  --tls              speak TLS; --cafile FILE trusts that CA, --insecure skips checks
  --token SECRET     send AUTH first (or $ZTICK_TW_TOKEN; --token-file FILE)
  --json             one-shot output as JSON
  --history-file F   interactive history (default ~/.ztick_tw_history)"""


@dataclass
class Settings:
    """Connection and output settings from the command line and the environment."""

    host: str = "127.0.0.1"
    port: int = 5678
    tls: bool = False
    cafile: str | None = None
    insecure: bool = False
    token: str | None = None
    as_json: bool = False
    history_file: str | None = None
    unix: str | None = None

    def connect(self) -> ZtickClient:
        """A connected (and authenticated) client."""
        tls: bool | ssl.SSLContext = False
        if self.tls:
            tls = tls_context(self.cafile, verify=not self.insecure)
        return ZtickClient(self.host, self.port, token=self.token, tls=tls, unix=self.unix)

    def where(self) -> str:
        """The daemon's address, for messages."""
        return self.unix or f"{self.host}:{self.port}"


_VALUED = {"--host", "--port", "--cafile", "--token", "--token-file", "--history-file", "--unix"}


def parse_args(args: Sequence[str]) -> tuple[Settings, list[str]]:
    """Options (anywhere, ``--`` ends them) and the remaining words."""
    env = os.environ
    s = Settings(
        host=env.get("ZTICK_TW_HOST", "127.0.0.1"),
        port=int(env.get("ZTICK_TW_PORT", "5678")),
        token=env.get("ZTICK_TW_TOKEN"),
        history_file=env.get("ZTICK_TW_HISTFILE"),
    )
    words: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if arg == "--":
            words += items[i:]
            break
        name, eq, inline = arg.partition("=")
        if name in _VALUED:
            if eq:
                value = inline
            elif i < len(items):
                value, i = items[i], i + 1
            else:
                raise Usage(f"{name} needs a value")
            if name == "--host":
                s.host = value
            elif name == "--port":
                if not value.isdigit():
                    raise Usage(f"--port {value!r} is not a port number")
                s.port = int(value)
            elif name == "--unix":
                s.unix = value
            elif name == "--cafile":
                s.cafile, s.tls = value, True
            elif name == "--token":
                s.token = value
            elif name == "--token-file":
                try:
                    with open(value, encoding="utf-8") as f:
                        s.token = f.read().strip()
                except OSError as e:
                    raise Usage(f"--token-file: {e}") from None
            else:
                s.history_file = value
        elif arg == "--tls":
            s.tls = True
        elif arg == "--insecure":
            s.insecure = True
        elif arg == "--json":
            s.as_json = True
        elif arg.startswith("--"):
            raise Usage(f"unknown option {arg}")
        else:
            words.append(arg)
    return s, words


def _now() -> datetime:
    return datetime.now(UTC)


def wants_help(args: Sequence[str], out: TextIO) -> bool:
    """Print the instructions and options if ``-h``/``--help`` is among ``args``."""
    if "-h" in args or "--help" in args:
        print(f"{HELP}\n{OPTIONS_HELP}", file=out)
        return True
    return False


def one_shot(args: Sequence[str], out: TextIO, err: TextIO) -> int:
    """``ztick-tw <instruction> ...``: run one instruction and print its answer."""
    if wants_help(args, out):
        return 0
    try:
        settings, words = parse_args(args)
        words = normalize(words)
        if words and words[0] in SUBWORDS and len(words) < 2:
            raise Usage(f"{words[0]} needs one of {', '.join(SUBWORDS[words[0]])}")
    except Usage as e:
        print(f"ztick-tw: {e}", file=err)
        return 2
    try:
        with settings.connect() as client:
            result = execute(client, words, _now())
    except Usage as e:
        print(f"ztick-tw: {e}", file=err)
        return 2
    except ZtickError as e:
        print(f"ERROR {e.reason}".rstrip(), file=err)
        return 1
    except (OSError, ProtocolError) as e:
        print(f"ztick-tw: cannot talk to {settings.where()}: {e}", file=err)
        return 1
    text = result.render(settings.as_json)
    if text:
        try:
            print(text, file=out, flush=True)
        except BrokenPipeError:  # ztick-tw query | head: the reader has gone, that is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


# -- interactive ------------------------------------------------------------------------


def completions(text: str, line: str) -> list[str]:
    """Instruction words (and RULE/SCHEDULE's second words) starting with ``text``."""
    before = line[: len(line) - len(text)].split()
    if not before:
        choices: Sequence[str] = (*INSTRUCTIONS, "HELP", "QUIT")
    elif len(before) == 1 and before[0].upper() in SUBWORDS:
        choices = SUBWORDS[before[0].upper()]
    else:
        return []
    return [w + " " for w in choices if w.startswith(text.upper())]


def _setup_readline(history_file: str) -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - readline is everywhere on Linux
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(history_file)
    readline.set_history_length(1000)

    def complete(text: str, state: int) -> str | None:
        found = completions(text, readline.get_line_buffer()[: readline.get_endidx()])
        return found[state] if state < len(found) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" ")
    readline.parse_and_bind("tab: complete")


def _save_history(history_file: str) -> None:
    try:
        import readline

        readline.write_history_file(history_file)
    except (ImportError, OSError):
        pass


def interactive(args: Sequence[str], out: TextIO, err: TextIO) -> int:
    """``ztick-tw cli``: a prompt until ``QUIT`` or end of input."""
    if wants_help(args, out):
        return 0
    try:
        settings, words = parse_args(args)
        if words:
            raise Usage(f"ztick-tw cli takes options only (got {words[0]!r})")
    except Usage as e:
        print(f"ztick-tw: {e}", file=err)
        return 2
    history = settings.history_file or os.path.expanduser("~/.ztick_tw_history")
    try:
        client = settings.connect()
    except (OSError, ProtocolError, ZtickError) as e:
        print(f"ztick-tw: cannot talk to {settings.where()}: {e}", file=err)
        return 1
    _setup_readline(history)
    prompt = f"{settings.where()}> "
    try:
        while True:
            try:
                line = input(prompt)
            except EOFError:
                print(file=out)
                return 0
            except KeyboardInterrupt:
                print(file=out)
                continue
            following = _one_line(client, settings, line, out)
            if following is None:
                return 0
            client = following
    finally:
        _save_history(history)


def _one_line(
    client: ZtickClient, settings: Settings, line: str, out: TextIO
) -> ZtickClient | None:
    """Run one typed line; the client to use next (reconnected if needed), None to quit."""
    try:
        words = normalize(tokenize(line))
    except TokenizeError as e:
        print(f"(usage) {e.reason}", file=out, flush=True)
        return client
    if not words:
        return client
    if words[0] in ("QUIT", "EXIT"):
        client.close()
        return None
    if words[0] == "HELP":
        print(HELP, file=out, flush=True)
        return client
    try:
        text = execute(client, words, _now()).render(settings.as_json)
    except Usage as e:
        text = f"(usage) {e}"
    except ZtickError as e:
        text = f"(error) ERROR {e.reason}".rstrip()
    except (OSError, ProtocolError) as e:
        client.close()
        text = f"(connection) {e}; reconnecting"
        try:
            client = settings.connect()
        except (OSError, ProtocolError, ZtickError) as again:
            text += f" failed: {again}"
    if text:
        print(text, file=out, flush=True)
    return client
