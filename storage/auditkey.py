"""The audit log's signing key: where it is kept, how it is made, how it is read.

The key signs every checkpoint of the home's log (`domain.note`); whoever holds it can sign a
history, so it is handled as a secret everywhere:

- by default it lives in the home, ``audit/signer.key``, made on first use with mode 0600 in a
  0700 directory (written whole under a temporary name, then linked into place: two processes
  that make it at once end with one key, the first), never through a link planted there;
- an operator who keeps keys elsewhere names a file with ``IMAGELEDGER_AUDIT_KEY`` (or the
  API's `key_path`): that file is read, never made or changed, and its permissions are the
  operator's (secret volumes are often 0644 inside their container);
- a key in the home that group or others may read is refused (it may have leaked: make a new
  log's key deliberately rather than sign with it);
- the file holds the signer key string (Go's note format, ``PRIVATE+KEY+<name>+...``) and a
  newline; its name must be the log's origin, so a key made for another log never signs this
  one;
- no error message, log line or repr carries the key or the file's content.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final

from imageledger.domain.errors import AuditKeyError, NoteError
from imageledger.storage import layout
from imageledger.storage.home import Dir

if TYPE_CHECKING:  # the crypto loads when a key is read or made, not with every command
    from imageledger.domain.note import Signer

KEY_ENV: Final = "IMAGELEDGER_AUDIT_KEY"
_MAX_KEY_FILE: Final = 4096


class AuditKeys:
    """The signing key of one home's log (see the module docstring)."""

    def __init__(self, home: Dir, key_path: str | os.PathLike[str] | None = None) -> None:
        self.home = home
        named = key_path if key_path is not None else os.environ.get(KEY_ENV) or None
        self.external = Path(named) if named is not None else None

    @property
    def where(self) -> str:
        """Where the key is (a path; never its content)."""
        if self.external is not None:
            return str(self.external)
        return str(self.home.path / layout.AUDIT / layout.AUDIT_KEY)

    def signer(self, origin: str, *, create: bool) -> Signer:
        """The log's signer; made in the home when there is none yet and `create` (an
        operator's key file is never made). `AuditKeyError` when it is missing, unreadable,
        malformed, too open, or made for another log."""
        if self.external is not None:
            text = self._read_external(self.external)
        else:
            found = self._read_home()
            if found is None:
                if not create:
                    msg = (
                        f"{self.where}: no audit key yet (`imageledger audit checkpoint` makes one)"
                    )
                    raise AuditKeyError(msg)
                return self._make(origin)
            text = found
        from imageledger.domain.note import Signer

        try:
            signer = Signer.from_string(text.strip())
        except NoteError as e:
            msg = f"{self.where}: not an audit signing key ({e})"
            raise AuditKeyError(msg) from None
        if signer.name != origin:
            msg = f"{self.where}: the key is for the log {signer.name!r}, not this one ({origin!r})"
            raise AuditKeyError(msg)
        return signer

    # ------------------------------------------------------------------ reading

    def _read_external(self, path: Path) -> str:
        try:
            with path.open("rb") as f:
                data = f.read(_MAX_KEY_FILE + 1)
        except OSError as e:
            msg = f"{path}: cannot read the audit key ({e.strerror or type(e).__name__})"
            raise AuditKeyError(msg) from None
        return self._text(data)

    def _read_home(self) -> str | None:
        try:
            directory = self.home.sub(layout.AUDIT)
        except FileNotFoundError:
            return None
        with directory:
            try:
                f = directory.open_read(layout.AUDIT_KEY)
            except FileNotFoundError:
                if directory.stat(layout.AUDIT_KEY) is not None:
                    msg = f"{self.where}: not a regular file"
                    raise AuditKeyError(msg) from None
                return None
            with f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    msg = (
                        f"{self.where}: group or others may read the audit key "
                        f"(mode {stat.S_IMODE(mode):04o}); it is not used: restrict it "
                        "(chmod 600) if it never left this machine"
                    )
                    raise AuditKeyError(msg)
                data = f.read(_MAX_KEY_FILE + 1)
        return self._text(data)

    def _text(self, data: bytes) -> str:
        if len(data) > _MAX_KEY_FILE:
            msg = f"{self.where}: not an audit signing key (too long)"
            raise AuditKeyError(msg)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            msg = f"{self.where}: not an audit signing key (not UTF-8 text)"
            raise AuditKeyError(msg) from None

    # ------------------------------------------------------------------ making

    def _make(self, origin: str) -> Signer:
        from imageledger.domain.note import generate_signer

        signer = generate_signer(origin)
        data = (signer.to_string() + "\n").encode()
        with self.home.sub(layout.AUDIT, create=True) as directory:
            os.chmod(directory.fd, 0o700)
            tmp = f".{layout.AUDIT_KEY}.{os.getpid()}.tmp"
            directory.delete(tmp)
            try:
                with directory.create(tmp, 0o600) as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    # link, not rename: a key another process made meanwhile is kept (it may
                    # have signed already), and this one is dropped.
                    os.link(
                        tmp,
                        layout.AUDIT_KEY,
                        src_dir_fd=directory.fd,
                        dst_dir_fd=directory.fd,
                        follow_symlinks=False,
                    )
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise
                    directory.delete(tmp)
                    return self.signer(origin, create=False)
                directory.fsync()
            finally:
                directory.delete(tmp)
        return signer
