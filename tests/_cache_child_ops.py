"""Child-process entry point for the image-cache crash and concurrency tests, and the
parent-side helpers that drive children and check a home afterwards.

A child is a fresh interpreter: ``python tests/_cache_child_ops.py COMMAND HOME ARGS...``. It
opens ``ImageCache(HOME)`` like any embedding application and runs one operation (or a loop of
them). Nothing in the product is edited or mocked; a child may only *pause* at a named point
(``--pause``) by wrapping one of the cache's own methods from outside, so that the parent can
SIGKILL it at a precise moment (a real crash) or let it go on.

Protocol on stdout: one line ``@@<json object>`` per message (``{"kind": ..., ...}``), written
and flushed in one call; other stdout lines are ignored. Logs go to stderr. Control lines from
the parent come on stdin (``go``), except for ``load-stream``, whose stdin is the archive.

Outcomes of loop commands are classified: `ImageInUseError` and `ImageNotFoundError` are the
expected answers of a racing cache (``expected``); anything else is an internal error and is
reported with its traceback (``internal``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imageledger import ImageCache, ImageInUseError, ImageNotFoundError
from imageledger.cache import internals
from imageledger.domain.model import DeletedBlob
from imageledger.tools.logs import configure_logging

CHILD = Path(__file__).resolve()
EXPECTED = (ImageInUseError, ImageNotFoundError)

_out_lock = threading.Lock()


def say(kind: str, **message: Any) -> None:
    """One protocol line on stdout, flushed at once."""
    line = "@@" + json.dumps({"kind": kind, **message}, sort_keys=True, default=str) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


# ------------------------------------------------------------------------- child side


@dataclass
class Outcomes:
    """What a loop did: successes by operation, expected refusals, internal errors."""

    ok: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    internal: list[str] = field(default_factory=list)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    @contextlib.contextmanager
    def op(self, name: str) -> Iterator[None]:
        try:
            yield
        except EXPECTED as e:
            self.count(self.expected, f"{name}:{type(e).__name__}")
        except Exception:
            self.internal.append(f"{name}: {traceback.format_exc()}")
        else:
            self.count(self.ok, name)

    def report(self, **extra: Any) -> None:
        say("done", ok=self.ok, expected=self.expected, internal=self.internal, **extra)


class Pauser:
    """Pause the child at the `n`-th time it reaches `point`: announce it, then wait for a
    ``go`` line on stdin (the parent either sends it or kills the child)."""

    def __init__(self, point: str | None, n: int) -> None:
        self.point = point
        self.n = n
        self.hits: dict[str, int] = {}

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.hits[point] = self.hits.get(point, 0) + 1
        if self.hits[point] != self.n:
            return
        say("paused", point=point)
        sys.stdin.readline()
        say("resumed", point=point)


def instrument(cache: ImageCache, pauser: Pauser) -> None:
    """Wrap the cache's own methods (instance attributes, nothing global but `os.replace`)
    so that the named pause points exist:

    - ``lease-rename``: an in-flight lease file is created and locked (unnamed, or as
      ``<id>.new``) and not yet linked or renamed to ``<id>.lease``;
    - ``before-add`` / ``after-add``: a load's blobs are all written, its event is not yet
      committed / is committed while its in-flight lease is still held;
    - ``after-commit:<Event>``: the ledger committed that event (remove, prune), nothing is
      unlinked yet;
    - ``after-unlink``: the n-th blob or stray was unlinked by a remove or prune;
    - ``listed``: a prune read the live leases and is listing the store (store lock held);
    - ``index-rename``: index.json (the OCI layout projection) is written to its temporary
      file, not yet renamed into place.
    """
    parts = internals(cache)
    service, store, ledger = parts.service, parts.store, parts.ledger
    real_add = service.add_all
    real_append = ledger.append
    real_delete = store.delete
    real_delete_entry = store.delete_entry
    real_digests = store.digests
    real_replace = os.replace
    real_link = os.link

    def add(*args: Any, **kwargs: Any) -> Any:
        say("add")
        pauser.reached("before-add")
        result = real_add(*args, **kwargs)
        say("added")
        pauser.reached("after-add")
        return result

    def append(events: Any) -> None:
        names = [type(event).__name__ for event in events]
        real_append(events)
        for name in names:
            say("committed", event=name)
            pauser.reached(f"after-commit:{name}")

    def delete(digest: str) -> int:
        size = real_delete(digest)
        pauser.reached("after-unlink")
        return size

    def delete_entry(entry: DeletedBlob) -> int:
        size = real_delete_entry(entry)  # a blob: through `delete`, which pauses
        if entry.by_path:
            pauser.reached("after-unlink")
        return size

    def digests() -> Iterator[str]:
        pauser.reached("listed")
        return real_digests()

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(src).endswith(".new"):
            pauser.reached("lease-rename")
        if Path(dst).name == "index.json":
            pauser.reached("index-rename")
        real_replace(src, dst, *args, **kwargs)

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(dst).endswith(".lease"):
            pauser.reached("lease-rename")  # the locked, still unnamed lease file
        real_link(src, dst, *args, **kwargs)

    service.add_all = add  # type: ignore[method-assign]
    ledger.append = append  # type: ignore[method-assign]
    store.delete = delete  # type: ignore[method-assign]
    store.delete_entry = delete_entry  # type: ignore[method-assign]
    store.digests = digests  # type: ignore[method-assign]
    os.replace = replace
    os.link = link


def _wait_go() -> None:
    say("ready")
    sys.stdin.readline()


def cmd_load_stream(cache: ImageCache, args: argparse.Namespace) -> int:
    """Load one archive read from stdin (unbuffered: every byte the parent wrote is seen)."""
    say("ready")
    source = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 - stdin, not ours
    try:
        handles = cache.load(source)
    except Exception as e:
        say("error", type=type(e).__name__, message=str(e), tb=traceback.format_exc())
        return 1
    say("loaded", references=[h.reference for h in handles])
    return 0


def cmd_load(cache: ImageCache, args: argparse.Namespace) -> int:
    """Load `archive` `count` times; with `remove`, remove it after each load (so that the
    next load writes the blobs again)."""
    for i in range(args.count):
        say("load-start", i=i)
        handles = cache.load(args.archive)
        say("loaded", i=i, references=[h.reference for h in handles])
        if args.remove:
            for handle in handles:
                say("remove-start", i=i)
                cache.remove(handle.reference)
                say("removed", i=i)
    say("done")
    return 0


def cmd_remove(cache: ImageCache, args: argparse.Namespace) -> int:
    say("remove-start")
    cache.remove(args.reference, force=args.force)
    say("removed")
    return 0


def cmd_prune(cache: ImageCache, args: argparse.Namespace) -> int:
    for i in range(args.count):
        say("prune-start", i=i)
        report = cache.prune(keep=args.keep)
        say("pruned", i=i, bytes=report.bytes_reclaimed, deleted=len(report.deleted))
    return 0


def _deadline(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() < end


def cmd_prune_loop(cache: ImageCache, args: argparse.Namespace) -> int:
    """Prune in a tight loop (with `keep`) until told to stop (a line on stdin) or timeout."""
    outcomes = Outcomes()
    stop = threading.Event()

    def watch() -> None:
        sys.stdin.readline()
        stop.set()

    _wait_go()
    threading.Thread(target=watch, daemon=True).start()
    running = _deadline(args.seconds)
    reclaimed = 0
    while running() and not stop.is_set():
        with outcomes.op("prune"):
            reclaimed += cache.prune(keep=args.keep).bytes_reclaimed
    outcomes.report(bytes_reclaimed=reclaimed)
    return 0


def _check_complete(cache: ImageCache, reference: str) -> str | None:
    """None if every blob of the cached `reference` is in the store, whole and hashing right;
    else what is wrong."""
    detail = cache.inspect(reference)
    digests = [
        detail.handle.manifest_digest,
        detail.config.digest,
        *(layer.blob_digest for layer in detail.layers),
    ]
    for layer in detail.layers:
        if internals(cache).store.size(layer.blob_digest) != layer.compressed_size_bytes:
            return f"{reference}: layer {layer.blob_digest} missing or the wrong size"
    for digest in digests:
        if not internals(cache).store.has(digest) or not internals(cache).store.verify(digest):
            return f"{reference}: blob {digest} missing or corrupt"
    return None


def cmd_load_remove_loop(cache: ImageCache, args: argparse.Namespace) -> int:
    """Load `archive` `count` times, checking the image complete right after each load, and
    remove it (not forced) between loads; the last load stays."""
    outcomes = Outcomes()
    problems: list[str] = []
    loads: list[dict[str, Any]] = []
    _wait_go()
    for i in range(args.count):
        with outcomes.op("load"):
            handles = cache.load(args.archive)
            for handle in handles:
                problem = _check_complete(cache, handle.reference)
                if problem is not None:
                    problems.append(f"load {i}: {problem}")
                loads.append({"i": i, "reference": handle.reference})
        if i < args.count - 1:
            with outcomes.op("remove"):
                cache.remove(args.reference)
    outcomes.report(problems=problems, loads=loads)
    return 0


def cmd_use_loop(cache: ImageCache, args: argparse.Namespace) -> int:
    """use(reference, holder) then release(holder), again and again, with small pauses."""
    outcomes = Outcomes()
    rng = random.Random(args.seed)
    _wait_go()
    running = _deadline(args.seconds)
    n = 0
    while running():
        holder = f"{args.holder}-{n}"
        n += 1
        with outcomes.op("use"):
            cache.use(args.reference, holder)
        time.sleep(rng.uniform(0, 0.004))
        with outcomes.op("release"):
            cache.release(holder)
        time.sleep(rng.uniform(0, 0.002))
    outcomes.report()
    return 0


def cmd_remove_reload_loop(cache: ImageCache, args: argparse.Namespace) -> int:
    """remove(reference) (not forced) again and again; reload the archive when it worked."""
    outcomes = Outcomes()
    rng = random.Random(args.seed)
    _wait_go()
    running = _deadline(args.seconds)
    while running():
        removed = False
        with outcomes.op("remove"):
            cache.remove(args.reference, force=args.force)
            removed = True
        if removed or not _cached(cache, args.reference):
            with outcomes.op("load"):
                cache.load(args.archive)
        time.sleep(rng.uniform(0, 0.002))
    outcomes.report()
    return 0


def _cached(cache: ImageCache, reference: str) -> bool:
    try:
        cache.get(reference)
    except ImageNotFoundError:
        return False
    return True


def cmd_force_loop(cache: ImageCache, args: argparse.Namespace) -> int:
    """Load when missing, use(reference, holder), then remove(reference, force=True)."""
    outcomes = Outcomes()
    _wait_go()
    running = _deadline(args.seconds)
    while running():
        if not _cached(cache, args.reference):
            with outcomes.op("load"):
                cache.load(args.archive)
        with outcomes.op("use"):
            cache.use(args.reference, args.holder)
        with outcomes.op("force-remove"):
            cache.remove(args.reference, force=True)
    outcomes.report()
    return 0


def cmd_release_loop(cache: ImageCache, args: argparse.Namespace) -> int:
    outcomes = Outcomes()
    rng = random.Random(args.seed)
    _wait_go()
    running = _deadline(args.seconds)
    released = 0
    while running():
        with outcomes.op("release"):
            released += cache.release(args.holder)
        time.sleep(rng.uniform(0, 0.002))
    outcomes.report(released=released)
    return 0


def cmd_get_server(cache: ImageCache, args: argparse.Namespace) -> int:
    """Answer ``get REF`` lines with the handle's last_used_at (read-your-writes probe)."""
    say("ready")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "get":
            break
        try:
            handle = cache.get(words[1])
        except ImageNotFoundError:
            say("got", reference=words[1], last_used_at=None)
            continue
        used = handle.last_used_at
        say("got", reference=words[1], last_used_at=None if used is None else used.isoformat())
    return 0


COMMANDS: dict[str, Callable[[ImageCache, argparse.Namespace], int]] = {
    "load-stream": cmd_load_stream,
    "load": cmd_load,
    "remove": cmd_remove,
    "prune": cmd_prune,
    "prune-loop": cmd_prune_loop,
    "load-remove-loop": cmd_load_remove_loop,
    "use-loop": cmd_use_loop,
    "remove-reload-loop": cmd_remove_reload_loop,
    "force-loop": cmd_force_loop,
    "release-loop": cmd_release_loop,
    "get-server": cmd_get_server,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("home", type=Path)
    parser.add_argument("--archive", type=Path)
    parser.add_argument("--reference", default="")
    parser.add_argument("--holder", default="holder")
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--remove", action="store_true")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--pause", default=None)
    parser.add_argument("--pause-at", type=int, default=1)
    args = parser.parse_args(argv)
    configure_logging(stream=sys.stderr)
    cache = ImageCache(args.home)
    instrument(cache, Pauser(args.pause, args.pause_at))
    try:
        return COMMANDS[args.command](cache, args)
    finally:
        cache.close()


# ------------------------------------------------------------------------- parent side


class ChildFailed(AssertionError):
    """A child did not say what it was expected to say."""


class Child:
    """A running child process: its protocol messages in a queue, stdin to talk to it."""

    def __init__(self, command: str, home: Path, *args: str, log: Path, timeout: float) -> None:
        self.timeout = timeout
        self.log = log
        self._stderr = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), command, str(home), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[str] = []  # every message kind, in order
        self.landed = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            if line.startswith(b"@@"):
                message = json.loads(line[2:])
                self.seen.append(message["kind"])
                self.messages.put(message)
        self.messages.put(None)

    def expect(self, kind: str, timeout: float | None = None) -> dict[str, Any]:
        """The next message of `kind` (earlier messages of other kinds are skipped)."""
        end = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"no {kind!r} from the child in time; {self.stderr_tail()}")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if message is None:
                raise ChildFailed(f"the child exited before {kind!r}; {self.stderr_tail()}")
            if message["kind"] == kind:
                return message

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def send(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def feed(self, data: bytes) -> None:
        """Write `data` to the child's stdin; returns when the pipe took it all (so the child
        has read all but at most a pipe buffer of it)."""
        view = memoryview(data)
        while view:
            written = os.write(self.stdin.fileno(), view[: 1 << 16])
            view = view[written:]

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()

    def kill(self) -> None:
        """SIGKILL: a real crash, nothing in the child runs afterwards. `landed` says where:
        the last message the child sent before, or ``exited`` when it had already finished."""
        finished = self.proc.poll() is not None
        self.landed = "exited" if finished else (self.seen[-1] if self.seen else "starting")
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=self.timeout)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"the child did not exit in time; {self.stderr_tail()}") from None

    def stderr_tail(self) -> str:
        self._stderr.flush()
        try:
            return "stderr: " + self.log.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "no stderr"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.close_stdin()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def lease_files(home: Path) -> list[Path]:
    leases = home / "tmp" / "leases"
    return sorted(leases.iterdir()) if leases.is_dir() else []


def partial_files(home: Path) -> list[Path]:
    """Files under tmp/ outside the leases dir (partial blobs, spooled archive entries)."""
    tmp = home / "tmp"
    if not tmp.is_dir():
        return []
    return sorted(
        p for p in tmp.rglob("*") if p.is_file() and p.relative_to(tmp).parts[0] != "leases"
    )


def blob_files(home: Path) -> set[str]:
    """Every file under blobs/, as a digest (``sha256:<hex>``) or a ``blobs/...`` path."""
    blobs = home / "blobs"
    found: set[str] = set()
    if blobs.is_dir():
        for path in blobs.rglob("*"):
            if path.is_dir():
                continue
            parts = path.relative_to(blobs).parts
            found.add(f"{parts[0]}:{parts[1]}" if len(parts) == 2 else f"blobs/{path}")
    return found


def image_blobs(cache: ImageCache, reference: str) -> dict[str, int]:
    """Every blob `inspect(reference)` names (manifest, config, layers) and its size as the
    ledger recorded it."""
    detail = cache.inspect(reference)
    with internals(cache).ledger.snapshot() as state:
        manifest = state.manifest(detail.handle.manifest_digest)
    assert manifest is not None, f"{reference}: the views have no manifest"
    sizes = {digest: size for digest, _kind, size in manifest.content.kinded_blobs()}
    named = [
        detail.handle.manifest_digest,
        detail.config.digest,
        *(layer.blob_digest for layer in detail.layers),
    ]
    assert set(named) == set(sizes), f"{reference}: inspect and the ledger disagree"
    return sizes


def assert_complete(cache: ImageCache, reference: str) -> None:
    """Every blob of the cached image is in the store, with the right size, hashing right."""
    for digest, size in image_blobs(cache, reference).items():
        stored = internals(cache).store.size(digest)
        assert stored == size, f"{reference}: blob {digest} is {stored} bytes, needs {size}"
        assert internals(cache).store.verify(digest), (
            f"{reference}: blob {digest} does not hash right"
        )


def assert_consistent(home: Path) -> list[str]:
    """The home opens, its views agree with its log, and no blob the ledger needs is
    missing (every handle's blobs, and every manifest still in the views, e.g. leased
    content of a force-removed reference). Returns the cached references."""
    with ImageCache(home) as cache:
        report = cache.rebuild(verify=True)
        assert report.identical, f"views disagree with the log: {report.tables}"
        references = [h.reference for h in cache.list()]
        for reference in references:
            assert_complete(cache, reference)
        with internals(cache).ledger.snapshot() as state:
            for manifest in state.manifests():
                for digest, _kind, size in manifest.content.kinded_blobs():
                    assert internals(cache).store.size(digest) == size, (
                        f"manifest {manifest.content.manifest_digest}: blob {digest} missing"
                    )
    return references


KEEPER = "crash-test-keeper"


def prune_and_assert_no_orphan(home: Path) -> Any:
    """Lease every cached image (so that the default prune keeps them), prune, and check
    that nothing is left on disk but their blobs: no orphan blob, no partial file, no
    lease file. Returns the prune report."""
    with ImageCache(home) as cache:
        references = [h.reference for h in cache.list()]
        for reference in references:
            cache.use(reference, KEEPER)
        report = cache.prune()
        assert sorted(h.reference for h in cache.list()) == sorted(references)
        needed: set[str] = set()
        for reference in references:
            assert_complete(cache, reference)
            needed |= set(image_blobs(cache, reference))
        on_disk = blob_files(home)
        assert on_disk <= needed, f"orphans survived prune: {sorted(on_disk - needed)}"
        tmp = home / "tmp"
        if tmp.is_dir():
            assert [p.name for p in tmp.iterdir()] in ([], ["leases"]), (
                f"tmp/ holds more than the leases dir: {sorted(tmp.iterdir())}"
            )
        stale = [p for p in lease_files(home) if p.suffix == ".lease"]
        assert not stale, f"lease files survived prune: {stale}"
        assert cache.rebuild(verify=True).identical
    return report


def release_all(home: Path) -> None:
    with ImageCache(home) as cache:
        cache.release(KEEPER)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
