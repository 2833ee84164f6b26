"""What a command-line run imports: a short command's wall time is mostly imports (issue 10),
so the modules a command does not use must stay unloaded. Each check runs in a fresh
interpreter and looks at `sys.modules`; none of them measures a time.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import imageledger
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive, build_image

PACKAGE_INIT = Path(imageledger.__file__)

# Loaded by a query only through what it does not use.
NOT_FOR_A_QUERY = (
    "imageledger.aio",
    "imageledger.storage.archives",
    "imageledger.storage.dockerload",
    "imageledger.storage.ociload",
    "imageledger.storage.archivesave",
)


def loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` are in `sys.modules` after `code` runs in a fresh interpreter."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {list(watched)!r} if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_neither_httpx_nor_asyncio_nor_the_cache() -> None:
    watched = (
        "httpx",
        "asyncio",
        "structlog",
        "eventsourcing",
        "lmdb",
        "imageledger.cache",
        *NOT_FOR_A_QUERY,
    )
    assert loaded_after("import imageledger.tools.cli", watched) == []


def test_importing_the_package_loads_none_of_its_modules() -> None:
    watched = ("imageledger.cache", "imageledger.domain.errors", "httpx", "asyncio")
    assert loaded_after("import imageledger", watched) == []


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("imports")
    spec = ImageSpec(layers=({"etc/hello": b"hello\n"},), names=("imports/app:1",))
    archive = build_docker_archive(directory / "app.tar", [build_image(spec)]).path
    command = [sys.executable, "-m", "imageledger.tools.cli", "--home", str(directory / "home")]
    done = subprocess.run(
        [*command, "load", str(archive)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return directory / "home"


def run_query(home: Path, *command: str) -> str:
    """`imageledger --home HOME COMMAND` inside the probe, its output swallowed."""
    arguments = ["--home", str(home), *command]
    return (
        "import contextlib, io\n"
        "from imageledger.tools.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main({arguments!r}) == 0\n"
    )


@pytest.mark.parametrize(
    "command", [("images", "--json"), ("inspect", "imports/app:1", "--json"), ("df",)]
)
def test_a_query_loads_neither_the_asyncio_facade_nor_the_archive_code(
    home: Path, command: tuple[str, ...]
) -> None:
    assert loaded_after(run_query(home, *command), NOT_FOR_A_QUERY) == []


@pytest.mark.parametrize(
    "command", [("images", "--json"), ("inspect", "imports/app:1", "--json"), ("df",)]
)
def test_a_query_loads_neither_eventsourcing_nor_the_events(
    home: Path, command: tuple[str, ...]
) -> None:
    """A query reads the views only: the application that keeps the log, its persistence
    module, the mapper and the event classes (eventsourcing under them all) load with the
    first command that appends or reads the log (`storage.eventstore`), and the audit key's
    crypto when a key is read or made."""
    watched = (
        "cryptography",
        "imageledger.domain.audit",
        "imageledger.domain.merkle",
        "imageledger.domain.note",
        "imageledger.storage.tlog",
        "eventsourcing",
        "imageledger.domain.events",
        "imageledger.storage.ledger",
        "imageledger.storage.ledgerapp",
        "imageledger.storage.ledgerformat",
        # What only filters, rebuilds, checks, progress bars and pulls need (issue 10's
        # start-up budget: together some 7 ms of an 90 ms inspect).
        "imageledger.domain.filters",
        "imageledger.tools.progress",
        "concurrent.futures",
        "subprocess",
        "socket",
        "platform",
        "zstandard",
        "msgspec",
    )
    assert loaded_after(run_query(home, *command), watched) == []


def test_history_still_reads_the_log(home: Path) -> None:
    """The other side: a command that reads the log makes the application when it needs it."""
    probe = run_query(home, "history", "--json")
    assert loaded_after(probe, ("eventsourcing", "imageledger.storage.ledgerapp")) == [
        "eventsourcing",
        "imageledger.storage.ledgerapp",
    ]


def test_a_query_does_not_load_httpx(home: Path) -> None:
    watched = ("httpx", "imageledger.storage.registry")
    assert loaded_after(run_query(home, "inspect", "imports/app:1", "--json"), watched) == []


def test_a_query_loads_neither_structlog_nor_asyncio(home: Path) -> None:
    """The command line configures structlog (which imports asyncio, and rich where it is
    installed) only when a line is logged: a query that logs nothing never loads it."""
    watched = ("asyncio", "structlog")
    assert loaded_after(run_query(home, "images", "--json"), watched) == []


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """The name -> module table of imageledger/__init__.py, read from its source."""
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "_LAZY"
            and node.value is not None
        ):
            table = ast.literal_eval(node.value)
            assert isinstance(table, dict)
            return {str(k): str(v) for k, v in table.items()}
    raise AssertionError("no _LAZY table in imageledger/__init__.py")


def _type_checking_imports(tree: ast.Module) -> dict[str, str]:
    """The names imported under `if TYPE_CHECKING:` in imageledger/__init__.py, by module."""
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom), ast.unparse(statement)
                for alias in statement.names:
                    names[alias.asname or alias.name] = str(statement.module)
    return names


def test_every_export_is_declared_for_type_checkers_and_loaded_from_its_module() -> None:
    """mypy sees the `TYPE_CHECKING` imports, the running program the lazy table: they must
    name the same objects, and `__all__` exactly these plus `__version__`."""
    tree = ast.parse(PACKAGE_INIT.read_text())
    lazy = _lazy_table(tree)
    assert _type_checking_imports(tree) == lazy
    assert set(imageledger.__all__) == {*lazy, "__version__"}
    assert set(imageledger.__all__) <= set(dir(imageledger))
    for name, module in lazy.items():
        assert getattr(imageledger, name) is getattr(sys.modules[module], name), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'ImageCach'"):
        _ = imageledger.ImageCach  # type: ignore[attr-defined]


def test_only_the_process_command_freezes_the_collector(home: Path) -> None:
    """`main()` as the console script calls it freezes the collector for a fast exit;
    `main(argv)`, as a test or an embedder calls it, leaves the caller's collector alone."""
    probe = (
        "import contextlib, gc, io, sys\n"
        "from imageledger.tools.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['--home', {str(home)!r}, 'images']) == 0\n"
        "    after_argv = gc.get_freeze_count()\n"
        f"    sys.argv = ['imageledger', '--home', {str(home)!r}, 'images']\n"
        "    assert main() == 0\n"
        "print(after_argv, gc.get_freeze_count())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    after_argv, after_command = map(int, done.stdout.split())
    assert after_argv == 0
    assert after_command > 0


def test_the_command_keeps_httpx_from_loading_its_own_command_line(home: Path) -> None:
    """As the process's command, the CLI marks `httpx._main` absent (it loads rich, click and
    pygments when they are installed); httpx itself still imports and works."""
    probe = (
        "import contextlib, io, sys\n"
        "from imageledger.tools.cli import main\n"
        f"sys.argv = ['imageledger', '--home', {str(home)!r}, 'images']\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main() == 0\n"
        "import httpx\n"
        "assert sys.modules['httpx._main'] is None\n"
        "assert httpx.Client and httpx.URL('http://x/').host == 'x'\n"
        "print(sorted(m for m in ('rich', 'click', 'pygments') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[]"
