"""Structured logging: JSON lines off a TTY, the level from the environment, no secret ever."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from imageledger.tools.logs import REDACTED, configure_logging, redact


@pytest.fixture(autouse=True)
def _reset_structlog() -> object:
    yield
    structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    configure_logging(stream=out, level=20)
    structlog.get_logger().info("pull.started", reference="docker.io/library/alpine:3")
    (line,) = _lines(out)
    assert line["event"] == "pull.started"
    assert line["reference"] == "docker.io/library/alpine:3"
    assert line["level"] == "info"
    assert str(line["timestamp"]).endswith("Z")


def test_level_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGELEDGER_LOG_LEVEL", "error")
    out = io.StringIO()
    configure_logging(stream=out)
    log = structlog.get_logger()
    log.warning("not.shown")
    log.error("shown")
    assert [line["event"] for line in _lines(out)] == ["shown"]


def test_secrets_under_secret_keys_are_replaced_at_any_depth() -> None:
    out = io.StringIO()
    configure_logging(stream=out, level=10)
    structlog.get_logger().info(
        "registry.auth",
        password="hunter2",
        registry={"host": "r.example", "token": "abc.def", "auth": {"user": "u"}},
        headers=[{"Authorization": "Bearer abc.def.ghi"}],
    )
    text = out.getvalue()
    assert "hunter2" not in text
    assert "abc.def" not in text
    (line,) = _lines(out)
    assert line["password"] == REDACTED
    assert line["registry"] == {"host": "r.example", "token": REDACTED, "auth": REDACTED}


def test_credentials_inside_free_text_are_masked() -> None:
    out = io.StringIO()
    configure_logging(stream=out, level=10)
    structlog.get_logger().warning(
        "pull failed for https://alice:s3cr3t@registry.example:5000/v2/ "
        "(sent Basic YWxpY2U6czNjcjN0)"
    )
    text = out.getvalue()
    assert "s3cr3t" not in text
    assert "YWxpY2U6czNjcjN0" not in text
    assert "registry.example:5000/v2/" in text


def test_readable_console_rendering_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    configure_logging(stream=out, level=20)
    structlog.get_logger().info("ledger.opened", path="/x")
    text = out.getvalue()
    assert "ledger.opened" in text
    assert not text.lstrip().startswith("{")


def test_console_log_lines_escape_what_a_terminal_would_obey() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    configure_logging(stream=out, level=20)
    hostile = "amd64\x1b[31mRED\nforged line\u202e"
    structlog.get_logger().warning(f"pull.failed {hostile}", error=hostile)
    text = out.getvalue()
    assert text.count("\n") == 1  # one line, the forged ones escaped
    assert "\x1b" not in text and "\u202e" not in text
    # The event (escaped here) and the value (repr by the renderer), each escaped once.
    assert text.count("\\x1b[31mRED\\nforged line\\u202e") == 2


@given(
    st.recursive(
        st.text() | st.integers() | st.none(),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["password", "token", "name", "x"]), children, max_size=3
            )
        ),
        max_leaves=10,
    )
)
def test_redact_never_leaves_a_value_under_a_secret_key(value: object) -> None:
    def walk(v: object) -> None:
        if isinstance(v, dict):
            for k, child in v.items():
                if k in ("password", "token"):
                    assert child == REDACTED
                else:
                    walk(child)
        elif isinstance(v, list):
            for child in v:
                walk(child)

    walk(redact(value))


def test_library_logs_nothing_to_stdout_from_the_cli_process() -> None:
    # stdout is reserved for --json output: the configured logger writes to stderr.
    code = (
        "import structlog\n"
        "from imageledger.tools.logs import configure_logging\n"
        "configure_logging(level=10)\n"
        "structlog.get_logger().info('x', token='t0ps3cret')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == ""
    assert "t0ps3cret" not in done.stderr
    assert json.loads(done.stderr)["token"] == REDACTED


_EMBEDDER = """
import sys
from imageledger import ImageCache
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive
from pathlib import Path

work = Path(sys.argv[1])
archive = build_docker_archive(work / "a.tar", [ImageSpec(names=("emb:1",))]).path
with ImageCache(work / "home") as cache:
    cache.load(archive)              # logs at info
    cache.use("emb:1", "sandbox-1")
    cache.prune(keep=["nothing-matches-this"])   # logs a warning: a keep pattern matched nothing
"""


def test_an_embedder_that_configured_nothing_gets_nothing_on_stdout(tmp_path: Path) -> None:
    """The library never configures logging (issue 9): unconfigured, structlog would print
    every level to stdout, into the embedder's own output. Its lines go to the standard
    library's logging instead, whose default shows warnings on stderr and nothing below."""
    done = subprocess.run(
        [sys.executable, "-c", _EMBEDDER, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "prune.keep_unmatched" in done.stderr  # the warning, on stderr
    assert "archive.loaded" not in done.stderr  # info: below the default level


def test_an_embedder_that_configured_structlog_gets_the_library_lines(tmp_path: Path) -> None:
    code = (
        "import structlog, logging\n"
        "structlog.configure(processors=[structlog.processors.JSONRenderer()],\n"
        "    logger_factory=structlog.PrintLoggerFactory(file=__import__('sys').stderr))\n"
        + _EMBEDDER
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    events = [
        json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")
    ]
    assert "archive.loaded" in events and "prune.keep_unmatched" in events


def test_the_command_line_configures_structlog_at_the_first_line_and_loses_none_of_it() -> None:
    """`configure_logging_on_first_line` (what the CLI calls) loads nothing until a line
    passes the level; that first line then comes out as a configured structlog line, fields
    and redaction included, and so do the ones after it."""
    code = (
        "import sys\n"
        "from imageledger.tools.logs import configure_logging_on_first_line\n"
        "from imageledger.domain.log import get_logger\n"
        "configure_logging_on_first_line()\n"
        "log = get_logger('imageledger.storage.x')\n"
        "log.debug('below.level', n=0)\n"
        "assert 'structlog' not in sys.modules\n"
        "log.warning('first.line', n=1, token='t0ps3cret')\n"
        "assert 'structlog' in sys.modules\n"
        "log.warning('second.line', n=2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "t0ps3cret" not in done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(x["event"], x["n"], x["level"]) for x in lines] == [
        ("first.line", 1, "warning"),
        ("second.line", 2, "warning"),
    ]
    assert lines[0]["token"] == REDACTED
