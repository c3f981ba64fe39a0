"""Files of an untrusted checkpoint folder: names taken from its own JSON (an index's shard
names, a tokenizer config's file names) must not reach outside the folder."""
from __future__ import annotations

import os

# "/" always (the separator in every Hugging Face file list); "\\" too, so a name written
# for Windows means the same everywhere
_SEPARATORS = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())


def inside(folder: str, name: str, error_cls: type[Exception]) -> str:
    """The real path of the file `name` directly in checkpoint folder `folder`, or raise
    `error_cls` (ModelLoadError, ConfigError, TokenizerError, ...) saying what was wrong.

    `name` must be a plain file name: a non-empty string without a path separator ('/' or
    '\\'), NUL, and not "." or "..". Its real path (every symlink resolved) must lie in the
    folder's real path (or a subfolder of it): a symlink to another file of the folder is
    fine, one to anywhere else is not. One exception, the Hugging Face hub cache: each file of a
    snapshot folder `<repo>/snapshots/<revision>/` is a symlink to `<repo>/blobs/<hash>`
    (the same download), and those are accepted. Whether the file exists is left to the
    caller. Open the returned path, not folder/name, so that what was checked is what is
    read.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "\0" in name:
        raise error_cls(f"{_short(name)} is not a file name; checkpoint files are named by a "
                        f"plain file name in {folder!r}")
    if any(sep in name for sep in _SEPARATORS):
        raise error_cls(f"{_short(name)} is a path, not a file name: checkpoint files must be "
                        f"directly in the checkpoint folder {folder!r} (a name with '/', '\\' "
                        "or '..' could reach any file on the machine); fix the name")
    root = os.path.realpath(os.fspath(folder))
    real = os.path.realpath(os.path.join(root, name))
    blobs = _hub_blobs(root)
    if not (_within(real, root) or (blobs is not None and _within(real, blobs))):
        raise error_cls(f"{os.path.join(folder, name)!r} is a symlink that resolves outside the "
                        f"checkpoint folder (to {real!r}); the engine reads only files inside "
                        "the folder: copy the file into it instead of linking")
    return real


def _within(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _hub_blobs(root: str) -> str | None:
    """`<repo>/blobs` when `root` is a hub cache snapshot `<repo>/snapshots/<revision>`."""
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) != "snapshots":
        return None
    return os.path.join(os.path.dirname(snapshots), "blobs")


def _short(name) -> str:
    """repr of a name, at most about 80 characters (the name comes from an untrusted file)."""
    if isinstance(name, str):
        return repr(name[:80]) + ("…" if len(name) > 80 else "")
    return f"a {type(name).__name__} value"     # no repr: it may be huge
