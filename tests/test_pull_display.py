"""`imageledger pull`'s display, as `docker pull` draws it: the real command line against a
real registry (Debian's docker-registry), its stdout on a pseudo-terminal (`pty`), the bytes
it wrote played on a small terminal model to get the final screen; off a terminal, and with
--quiet, what scripts read. And the library's progress events the display is drawn from."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import TYPE_CHECKING

from imageledger import ImageCache, PullProgress
from imageledger.storage.registryoptions import RegistryOptions
from imageledger.tools.imagebuild import BuiltImage, ImageSpec, build_image, build_oci_layout

if TYPE_CHECKING:
    from tests.registry import Registry, push
else:
    from registry import Registry, push

CLI = (sys.executable, "-m", "imageledger.tools.cli")
TIMEOUT = 120.0  # for waiting only: nothing asserts how long anything took
MIB = 1 << 20
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_TOTAL = re.compile(r"^Total: \[=+\]  ([0-9.]+)MB/([0-9.]+)MB  [0-9.]+[kMGT]?B/s  done$")


# ---------------------------------------------------------------- a terminal, as a model


def screen(output: str, rows: int = 200) -> list[str]:
    """The lines a terminal shows after `output`: text overwrites at the cursor, ``\\r`` and
    ``\\n`` move it, CSI ``A`` (up), ``K``/``2K`` (erase line) act, other sequences are
    dropped. Enough for what the display writes, and strict about it: a display that drew
    its block in the wrong place shows here as stale or missing lines."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(output):
        char = output[i]
        match = _CSI.match(output, i)
        if match:
            args, verb = match.groups()
            if verb == "A":
                row = max(row - int(args or 1), 0)
            elif verb == "K":
                if args == "2":
                    lines[row] = []
                else:
                    del lines[row][col:]
            i = match.end()
            continue
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        else:
            line = lines[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = char
            else:
                line.append(char)
            col += 1
        i += 1
    shown = ["".join(line).rstrip() for line in lines]
    while shown and not shown[-1]:
        shown.pop()
    return shown[-rows:]


def plain(output: str) -> str:
    """`output` without its escape sequences: everything the display ever wrote."""
    return _CSI.sub("", output)


def on_a_terminal(args: list[str], env: dict[str, str], columns: int = 160) -> tuple[int, str]:
    """Run the command line with its stdin, stdout and stderr on a pseudo-terminal of
    `columns`; its exit code and everything it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command line, on the terminal
        try:
            os.execve(sys.executable, [sys.executable, *CLI[1:], *args], env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


# ---------------------------------------------------------------- images in a registry


def _image(*layers: bytes) -> BuiltImage:
    return build_image(
        ImageSpec(layers=tuple({"data": data} for data in layers), compression="none", names=("1",))
    )


def _push(registry: Registry, tmp_path: Path, name: str, image: BuiltImage) -> str:
    layout = build_oci_layout(tmp_path / f"layout-{name.replace('/', '-')}", [image])
    push(registry, f"oci:{layout.path}:1", f"{name}:1")
    return registry.reference(f"{name}:1")


def _env(registry: Registry) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGELEDGER_LOG_LEVEL"}
    env["IMAGELEDGER_INSECURE_REGISTRIES"] = registry.host
    env["TERM"] = "xterm"
    return env


def _mb(size: int) -> str:
    return f"{size / 1e6:.4g}MB"


def _short(digest: str) -> str:
    return digest.split(":", 1)[1][:12]


# ---------------------------------------------------------------- tests


def _layers(home: Path, reference: str) -> list[tuple[str, int]]:
    """(digest, size) of the pulled image's layers, bottom first: as the registry serves
    them (skopeo compresses the uncompressed layers it pushes: not the built ones)."""
    with ImageCache(home) as cache:
        layers = cache.inspect(reference).layers
    return [(x.blob_digest, x.compressed_size_bytes or 0) for x in layers]


def test_on_a_terminal_each_layer_gets_a_line_and_ends_complete_or_already_there(
    registry: Registry, tmp_path: Path
) -> None:
    base = os.urandom(4 * MIB)
    one = _push(registry, tmp_path, "display/one", _image(base, os.urandom(2 * MIB)))
    two = _push(registry, tmp_path, "display/two", _image(base, os.urandom(3 * MIB), b"small"))
    home = tmp_path / "home"
    env = _env(registry)

    code, output = on_a_terminal(["--home", str(home), "pull", one], env)
    assert code == 0, output
    final = screen(output)
    layers = _layers(home, one)
    assert final[0] == f"Pulling {one}"
    assert final[1 : 1 + len(layers)] == [f"{_short(d)}: Pull complete" for d, _ in layers]
    total = _TOTAL.match(final[1 + len(layers)])
    assert total is not None, final
    assert total[1] == total[2] == _mb(sum(size for _, size in layers))[:-2]
    assert final[-1].startswith(f"Pulled {one} (")
    # Along the way each layer was downloading, with a bar and its bytes in MB, then verified.
    seen = plain(output)
    for digest, size in layers:
        downloading = rf"{_short(digest)}: Downloading \[[= >]*\]  [0-9.]+[kM]?B/{_mb(size)}"
        assert re.search(downloading, seen), size
        assert f"{_short(digest)}: Verifying" in seen

    # The second image shares the first's base layer: already there, not downloaded again.
    code, output = on_a_terminal(["--home", str(home), "pull", two], env)
    assert code == 0, output
    final = screen(output)
    layers = _layers(home, two)
    assert final[1 : 1 + len(layers)] == [
        f"{_short(layers[0][0])}: Already exists",
        f"{_short(layers[1][0])}: Pull complete",
        f"{_short(layers[2][0])}: Pull complete",
    ]
    total = _TOTAL.match(final[1 + len(layers)])
    assert total is not None, final
    assert total[1] == total[2] == _mb(layers[1][1] + layers[2][1])[:-2]
    assert final[-1].startswith(f"Pulled {two} (")

    # Everything cached: every layer already exists, nothing to download.
    code, output = on_a_terminal(["--home", str(home), "pull", two], env)
    assert code == 0, output
    assert screen(output)[1:-1] == [
        *(f"{_short(digest)}: Already exists" for digest, _ in layers),
        "Total: all layers already exist",
    ]


def test_lines_fit_a_narrow_terminal(registry: Registry, tmp_path: Path) -> None:
    reference = _push(registry, tmp_path, "display/narrow", _image(os.urandom(3 * MIB)))
    home = tmp_path / "home"
    code, output = on_a_terminal(
        ["--home", str(home), "pull", reference], _env(registry), columns=40
    )
    assert code == 0, output
    # Cut to the width: no line wraps, so the block redraws over itself, never below.
    lines = plain(output).replace("\r\n", "\n").split("\n")  # the terminal's ONLCR
    drawn = [line.split("\r")[-1] for line in lines]
    block = [line for line in drawn if "Total:" in line or "Downloading" in line]
    assert block and all(len(line) < 40 for line in block)
    [(digest, _size)] = _layers(home, reference)
    assert f"{_short(digest)}: Pull complete" in screen(output)


def test_off_a_terminal_there_is_no_bar_and_quiet_prints_only_the_reference(
    registry: Registry, tmp_path: Path
) -> None:
    reference = _push(registry, tmp_path, "display/plain", _image(os.urandom(2 * MIB)))
    env = _env(registry)

    def run(home: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The command line with its output piped: not on a terminal."""
        return subprocess.run(
            [*CLI, "--home", str(tmp_path / home), "pull", *args, reference],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )

    done = run("home")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x1b" not in done.stderr
    assert "[==" not in done.stdout and "Downloading" not in done.stdout
    [line] = done.stdout.splitlines()
    assert line.startswith(f"Pulled {reference} (")

    quiet = run("quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == reference + "\n"

    # On a terminal too, --quiet draws nothing: the reference is the whole screen.
    code, output = on_a_terminal(
        ["--home", str(tmp_path / "quiet-tty"), "pull", "-q", reference], env
    )
    assert code == 0, output
    assert screen(output) == [reference]
    assert "\x1b" not in output

    both = run("both", "--quiet", "--json")
    assert both.returncode == 2 and both.stdout == ""


def test_the_progress_events_name_every_layer_before_any_blob(
    registry: Registry, tmp_path: Path
) -> None:
    shared = os.urandom(MIB)
    one = _push(registry, tmp_path, "events/one", _image(shared, b"one"))
    two = _push(registry, tmp_path, "events/two", _image(shared, b"two"))
    options = RegistryOptions(insecure=frozenset({registry.host}))
    with ImageCache(tmp_path / "home") as cache:
        cache.pull(one, options=options)
        events: list[PullProgress] = []
        detail = cache.pull(two, options=options, progress=events.append).inspect()
    layers = [(x.blob_digest, x.compressed_size_bytes) for x in detail.layers]
    manifest = events[0]
    assert manifest.event == "manifest" and manifest.kind == "manifest"
    assert manifest.digest == detail.handle.manifest_digest
    assert manifest.layers == tuple(layers)
    # Equality is on the first four fields, as callers compared events before kind/layers.
    assert manifest == PullProgress("manifest", manifest.digest, manifest.done, manifest.total)
    by_layer = {digest: [e.event for e in events if e.digest == digest] for digest, _ in layers}
    assert by_layer[layers[0][0]] == ["blob-cached"]
    fetched = by_layer[layers[1][0]]
    assert fetched[0] == "blob-start" and fetched[-2:] == ["blob-verifying", "blob-done"]
    kinds = {e.digest: e.kind for e in events if e.event == "blob-done"}
    assert kinds == {detail.config.digest: "config", layers[1][0]: "layer"}
