"""The README's main job: build a small image, then walk it through the cache with the real
command line: load, images, inspect, verify, use, a refused remove, tag, materialize (the layer
EROFS images, fsmeta and VMDK a microVM boots), release, prune, the cache as it was
(`images --at`), explain, events, history, the audit log's verify, rebuild --verify.

It runs against a fresh temporary home (or `--home`) and exits non-zero if any step does not
do what the contract says, so it doubles as an end-to-end smoke test.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

from imageledger.tools.imagebuild import ImageSpec, build_docker_archive, build_oci_layout

HELLO = b"#!/bin/sh\necho 'hello from an imageledger demo image'\n"


def _run(home: Path, *args: str, expect: int = 0) -> None:
    from imageledger.tools.cli import main

    print(f"\n$ imageledger {shlex.join(args)}", flush=True)
    code = main(["--home", str(home), *args])
    if code != expect:
        msg = f"`imageledger {shlex.join(args)}` exited {code}, expected {expect}"
        raise SystemExit(msg)
    if expect:
        print(f"(exit {code}, as expected)", flush=True)


def run_demo(home: str | None, *, keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="imageledger-demo-"))
    cache_home = Path(home) if home else work / "home"
    try:
        spec = ImageSpec(
            layers=(
                {"etc/os-release": b"ID=imageledger-demo\n", "etc/hostname": b"demo\n"},
                {"usr/local/bin/hello": HELLO},
            ),
            architecture="arm64",
            variant="v8",
            cmd=("/usr/local/bin/hello",),
            labels={"org.opencontainers.image.title": "hello"},
            names=("demo/hello:1.0",),
        )
        archive = build_docker_archive(work / "hello.tar", [spec]).path
        layout = build_oci_layout(work / "hello-oci", [spec]).path
        print(f"built a 2-layer linux/arm64 image: {archive} and {layout}")
        _run(cache_home, "load", str(archive))
        _run(cache_home, "load", str(layout), "--tag", "demo/hello:latest")
        _run(cache_home, "images")
        _run(cache_home, "inspect", "demo/hello:1.0")
        _run(cache_home, "verify")  # every blob read back and hashed
        _run(cache_home, "use", "demo/hello:1.0", "--holder", "sandbox-1")
        _run(cache_home, "rm", "demo/hello:latest")  # an alias: only untags
        _run(cache_home, "rm", "demo/hello:1.0", expect=4)  # the last name of a leased image
        _run(cache_home, "tag", "demo/hello:1.0", "demo/hello:stable")
        _run(cache_home, "materialize", "demo/hello:stable")  # EROFS layers, fsmeta, VMDK
        _run(cache_home, "prune", "--dry-run")
        _run(cache_home, "release", "sandbox-1")
        _run(cache_home, "prune")
        _run(cache_home, "images")
        _run(cache_home, "images", "--at", "4")  # as it was after event 4: both names
        _run(cache_home, "explain", "demo/hello:1.0")  # why it is gone, citing positions
        _run(cache_home, "events", "--type", "ImagesPruned")
        _run(cache_home, "history", "demo/hello:1.0")
        _run(cache_home, "audit", "verify")  # every leaf, the tree, the signed checkpoints
        _run(cache_home, "rebuild", "--verify")
        print("\ndemo complete: every step did what the contract says")
        return 0
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
