"""`imageledger --version`, examples in every `--help`, and `imageledger completion bash|zsh`
(issue 14). The bash script is run for real: sourced into bash, its function called with the
variables bash sets when Tab is pressed, and what it offers compared; the references it offers
come from a real cache through `images --quiet`, a query that loads no event machinery. The
zsh script is checked by zsh's own parser (`zsh -n`; Debian's zsh, in tools/test.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import imageledger
from imageledger.tools.cli import EXAMPLES, build_parser
from imageledger.tools.completion import commands
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

if TYPE_CHECKING:
    from tests.test_cli import ok
    from tests.test_cli_imports import loaded_after, run_query
else:
    from test_cli import ok
    from test_cli_imports import loaded_after, run_query

BIN = Path(sys.executable).parent  # where the `imageledger` console script is
APP = "docker.io/library/app:1"
WEB = "docker.io/acme/web:2"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("completion")
    spec = ImageSpec(names=("app:1", "acme/web:2"))
    archive = build_docker_archive(directory / "app.tar", [spec]).path
    ok(directory / "home", "load", str(archive))
    return directory / "home"


def test_version() -> None:
    result = ok(None, "--version")
    assert result.stdout.decode() == f"imageledger {imageledger.__version__}\n"


def runs(command: str, name: str) -> bool:
    """Whether the shell `command` runs `imageledger` with the (sub)command `name` (global
    options such as --home may come between)."""
    words = command.split()
    wanted = name.split()
    return (
        bool(words)
        and words[0] == "imageledger"
        and any(words[i : i + len(wanted)] == wanted for i in range(1, len(words)))
    )


def test_every_command_help_shows_examples() -> None:
    """Every command and subcommand the parser has (whoever added it) ends its help with
    examples, one of which runs that very command."""
    names = [c.name for c in commands(build_parser())]
    assert {"images", "tag", "completion", "audit verify"} <= set(names)
    for name in ["", *names]:
        text = ok(None, *name.split(), "--help").stdout.decode()
        assert "\nexamples:\n" in text, name
        examples = text.split("\nexamples:\n", 1)[1].splitlines()
        assert examples and all(line.startswith("  ") for line in examples if line), name
        # At least one runs that very command (the others may show what goes with it).
        assert any(runs(piece, name) for line in examples for piece in line.split("|")), name
    assert set(EXAMPLES) >= {"", *names}


# ------------------------------------------------------------------------------ bash

COMPLETE = r"""
source <(imageledger completion bash)
line="$1"
COMP_LINE="$line"
COMP_POINT=${#line}
read -ra COMP_WORDS <<< "$line"
COMP_CWORD=${#COMP_WORDS[@]}
[[ "$line" =~ [[:space:]]$ ]] || COMP_CWORD=$((COMP_CWORD - 1))
COMPREPLY=()
_imageledger
printf '%s\n' "${COMPREPLY[@]}"
"""


def offered_by(command: list[str], home: Path | None = None) -> list[str]:
    """The words a shell `command` (a completion run) prints, one a line, with the
    `imageledger` console script on its PATH and `home` as $IMAGELEDGER_HOME (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGELEDGER_HOME"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if home is not None:
        env["IMAGELEDGER_HOME"] = str(home)
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.splitlines() if word]


def complete(line: str, home: Path | None = None) -> list[str]:
    """What bash offers for `line` (the cursor at its end), through the script itself."""
    return offered_by(["bash", "-c", COMPLETE, "complete", line], home)


def test_bash_completes_commands_and_options() -> None:
    assert "images" in complete("imageledger ")
    assert "tag" in complete("imageledger ")
    assert complete("imageledger ima") == ["images"]
    assert set(complete("imageledger images --")) >= {"--filter", "--quiet", "--no-trunc"}
    assert complete("imageledger --v") == ["--version"]
    assert set(complete("imageledger audit ")) >= {"verify", "export", "prove"}
    assert "--key" in complete("imageledger audit verify --")
    assert complete("imageledger completion ") == ["bash", "zsh"]


def test_bash_completes_references_from_the_cache(home: Path) -> None:
    assert sorted(complete(f"imageledger --home {home} inspect ")) == sorted([APP, WEB])
    assert sorted(complete("imageledger rm ", home=home)) == sorted([APP, WEB])  # $IMAGELEDGER_HOME
    assert complete(f"imageledger --home {home} use docker.io/ac") == [WEB]
    # bash breaks words at ':', so what it replaces is what follows the last one.
    assert complete(f"imageledger --home {home} inspect docker.io/library/app:") == ["1"]
    both = complete(f"imageledger --home={home} tag docker.io/library/app:1 ")
    assert sorted(both) == sorted([APP, WEB])
    assert sorted(complete(f"imageledger --home {home} events --ref ")) == sorted([APP, WEB])
    assert complete(f"imageledger --home {home} use app:1 --holder ") == []  # a value: free
    assert complete(f"imageledger --home {home} images ") == []  # takes no reference
    assert complete(f"imageledger --home {home}/missing inspect ") == []  # no home: nothing


def test_the_completion_query_loads_no_event_machinery(home: Path) -> None:
    """`images --quiet` (what the scripts run on every Tab) is a query: it reads the views
    and loads neither eventsourcing, the event classes, the mapper nor the audit log."""
    watched = (
        "eventsourcing",
        "imageledger.domain.events",
        "imageledger.storage.ledgerformat",
        "imageledger.storage.ledgerapp",
        "imageledger.domain.audit",
        "cryptography",
        "imageledger.aio",
        "httpx",
    )
    assert loaded_after(run_query(home, "images", "--quiet"), watched) == []
    filtered = run_query(home, "images", "--quiet", "--filter", "label=x")
    assert loaded_after(filtered, watched) == []


def test_bash_accepts_the_script_syntax() -> None:
    script = ok(None, "completion", "bash").stdout.decode()
    assert script.rstrip().endswith("complete -F _imageledger imageledger")
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------ zsh


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (tools/test.sh)")
def test_zsh_parses_the_script() -> None:
    script = ok(None, "completion", "zsh").stdout.decode()
    assert script.startswith("#compdef imageledger\n")
    assert "images --quiet" in script and "compdef _imageledger imageledger" in script
    done = subprocess.run(
        ["zsh", "-n", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (tools/test.sh)")
def test_zsh_completes_references(home: Path) -> None:
    """The zsh function run by zsh itself, with compsys's `compadd` and `_files` replaced by
    functions that print what they are given (compsys needs a terminal to run for real)."""
    script = ok(None, "completion", "zsh").stdout.decode()
    driver = (
        "compdef() { :; }\n"
        'compadd() { [[ $1 == -- ]] && shift; print -l -- "$@"; }\n'
        "_files() { print -- FILES; }\n"
        f"{script}\n"
        'words=("${(z)1}"); [[ $1 == *" " ]] && words+=(""); CURRENT=${#words}\n'
        "_imageledger\n"
    )

    def offered(line: str) -> list[str]:
        return offered_by(["zsh", "-f", "-c", driver, "zsh", line])

    assert sorted(offered(f"imageledger --home {home} inspect ")) == sorted([APP, WEB])
    assert sorted(offered(f"imageledger --home {home} tag {APP} ")) == sorted([APP, WEB])
    assert offered(f"imageledger --home {home} use app:1 --holder ") == []
    assert "images" in offered("imageledger ")
    assert "--filter" in offered("imageledger images --")
    assert offered("imageledger load ") == ["FILES"]
    assert offered("imageledger completion ") == ["bash", "zsh"]
