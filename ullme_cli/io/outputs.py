"""The one output guard, atomic writes and locks (docs/design.md §10.2). Every writer goes through here.

- `guard_output` runs before any work. Paths are compared after resolving symlinks. It refuses an output
  that is an input, lies inside an input folder, or holds an input; an existing output without
  `overwrite`; and, on `overwrite`, a folder that holds files ullme did not write.
- `atomic_path` / `atomic_folder` stage beside the real target (symlinks resolved, so a linked output
  is written where the link points and the link stays) and rename into place only on success. What they
  commit follows the umask, like any other file the user makes.
- `replace_folder` never deletes a file that ullme did not write. Every folder that `atomic_folder`
  commits carries `.ullme-files`, the list of files it wrote. A folder being replaced must hold nothing
  else. The guard refuses early, and this check makes it hold whoever the caller is.
- `output_lock` keeps a second writer of the same output out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ullme_cli.errors import UllmeError

STDIO = "-"
HUB_PREFIX = "hf:"
STAGING_MARK = ".staging-"  # atomic_folder's staging folders: `.NAME.staging-XXXX` beside the target
WRITTEN_RECORD = ".ullme-files"  # in every folder atomic_folder commits: the files it wrote, one per line


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def real_path(path: str | Path) -> Path:
    """The path with `~` expanded and every symlink resolved, the last component included."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:  # Python before 3.13 raises this for a loop; later ones an OSError (ELOOP)
        raise UllmeError(f"{path}: its symbolic links form a loop; remove the link or name another path") from None
    except OSError as e:
        raise UllmeError(f"{path}: cannot resolve this path ({e.strerror or e})") from None


def require_output_path(path: str | Path) -> str | Path:
    """An output path that names something: `-o ''` would otherwise mean the working folder."""
    if not str(path).strip():
        raise UllmeError("the output path is empty; name a file or folder (or - for stdout where the command writes one)")
    return path


def disk_full(error: BaseException, folder: Path) -> str | None:
    """Why a write into `folder` failed for lack of space, or None when it did not: ENOSPC/EDQUOT, or any
    write error (numpy's "N requested and M written", faiss's RuntimeError) while the filesystem has no
    free block left. Asked before the failed write's partial file is removed."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return error.strerror or "no space left on device"
    if isinstance(error, (OSError, RuntimeError)):
        try:
            if os.statvfs(folder).f_bavail == 0:
                return "no space left on device"
        except OSError:
            return None
    return None


def _discard_partial(error: BaseException, target: Path, folder: Path, cleanup) -> None:
    """Remove a failed write's partial output (`cleanup`); when the disk was full, raise that as one line
    that names the output, else return for the caller to re-raise `error`."""
    full = disk_full(error, folder)
    cleanup()
    if full is not None:
        raise UllmeError(f"{target}: could not be written: {full}; the partial file was removed (free some space and run again)") from None


def local_input(name: str | Path | None) -> Path | None:
    """The local file or folder an input names, or None for stdin, a hub name or nothing that exists.
    `hf:PATH` names a local folder when PATH exists."""
    if name is None:
        return None
    text = str(name)
    if text in (STDIO, ""):  # "": an unset input (a recipe's empty eval.task_dir), not the working folder
        return None
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX) :].rsplit(":", 1)[0] if not Path(text[len(HUB_PREFIX) :]).exists() else text[len(HUB_PREFIX) :]
    path = Path(text).expanduser()
    return real_path(path) if path.exists() or path.is_symlink() else None


def _relation(target: Path, source: Path) -> str | None:
    if target == source or (target.is_file() and source.is_file() and os.path.samefile(target, source)):  # a hard link too
        return "is the input"
    if source in target.parents:
        return "lies inside the input"
    if target in source.parents:
        return "holds the input"
    return None


def guard_output(
    outputs: Iterable[str | Path],
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    folder: bool = False,
    exists_ok: bool = False,
    may_hold_inputs: bool = False,
) -> None:
    """Check every output of a command before it does any work.

    Refused, each in one line naming both paths: an output that is an input, lies inside one or holds
    one (symlinks resolved); a parent that is a file; a file where a folder goes or the reverse; an
    existing output without `overwrite` (unless `exists_ok`: a folder the command adds to, such as a run
    folder); with `overwrite`, a folder that holds files ullme did not write. `may_hold_inputs`: a folder
    that ullme only adds files to under names of its own (evaluate's results cache) may contain an input.
    """
    sources = [(str(name), path) for name in inputs if (path := local_input(name)) is not None]
    existing = []
    for out in outputs:
        if str(out) == STDIO:
            continue
        target = real_path(require_output_path(out))
        for name, source in sources:
            relation = _relation(target, source)
            if relation == "holds the input" and may_hold_inputs:
                continue
            if relation:
                raise UllmeError(f"{out}: {relation} {name} of this command; choose another output")
        parent = next((p for p in target.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UllmeError(f"{out}: cannot write here: {parent} is a file, not a folder")
        if target.exists() and target.is_dir() != folder:
            raise UllmeError(f"{out}: is a {'file' if folder else 'folder'}; expected a {'folder' if folder else 'file'} path")
        if target.exists():
            existing.append((out, target))
    if existing and not (overwrite or exists_ok):
        raise UllmeError(f"{existing[0][0]}: exists already; pass --overwrite to replace it")
    if folder and overwrite:
        for out, target in existing:
            foreign = foreign_files(target)
            if foreign and not (target / WRITTEN_RECORD).exists():
                raise UllmeError(f"{out}: has no {WRITTEN_RECORD} record of what ullme wrote there (an older ullme's folder, or not ullme's; "
                                 f"it holds {foreign[0]}); --overwrite replaces only folders it can tell are ullme's: remove it yourself")  # fmt: skip
            if foreign:
                raise UllmeError(f"{out}: holds files that ullme did not write ({foreign[0]}); --overwrite replaces only ullme's own folders")


def _files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != WRITTEN_RECORD)


def foreign_files(folder: Path) -> list[str]:
    """The files below `folder` that its `.ullme-files` record does not list (all of them, without one)."""
    if not folder.is_dir():
        return []
    present = _files_below(folder)
    try:
        written = set((folder / WRITTEN_RECORD).read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        written = set()
    return [f for f in present if f not in written]


def make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UllmeError(f"{target}: cannot write here: a parent of it is a file, not a folder") from None


def _apply_umask(path: Path) -> None:
    """mkstemp, mkdtemp and some writers (safetensors) create 0600/0700 entries; give them the usual modes."""
    umask = current_umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside the real `path`; rename it into place only if the block succeeds."""
    target = real_path(path)
    make_parent(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _apply_umask(Path(tmp))
        os.replace(tmp, target)
    except BaseException as error:
        _discard_partial(error, target, target.parent, lambda: Path(tmp).unlink(missing_ok=True))
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside the real `path`; if the block succeeds it replaces `path` (two
    renames), otherwise it is removed. A crash leaves the old folder or the new one, never half of one."""
    target = real_path(path)
    make_parent(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    try:
        yield staging
        commit_folder(staging, target)
    except BaseException as error:
        _discard_partial(error, target, target.parent, lambda: shutil.rmtree(staging, ignore_errors=True))
        raise


def commit_folder(staging: Path, target: Path) -> None:
    """Record what the staging folder holds (`.ullme-files`), give it the umask's modes, and put it in
    `target`'s place. For writers that stage a folder themselves (several processes writing one DCP
    checkpoint); everyone else uses `atomic_folder`."""
    (staging / WRITTEN_RECORD).write_text("".join(f + "\n" for f in _files_below(staging)), encoding="utf-8")
    _apply_umask(staging)
    replace_folder(staging, target)


def replace_folder(staging: Path, target: Path) -> None:
    """Put a finished staging folder in `target`'s place (two renames when `target` exists). A `target`
    that holds a file ullme did not write is left as it is, and the error names that file."""
    target = real_path(target)
    if target.exists():
        foreign = foreign_files(target)
        if foreign:
            raise UllmeError(f"{target}: holds files that ullme did not write ({foreign[0]}); not replaced")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` while writing it: a second writer fails at once, with a clear error.

    The lock is `flock` on `.NAME.lock` beside the real output; the kernel drops it when the process dies,
    so a SIGKILL leaves no stale lock, only an empty file that the next writer reuses.
    """
    if str(path) == STDIO:
        yield
        return
    target = real_path(path)
    created = [p for p in target.parents if not p.exists()]
    make_parent(target)
    lock_path = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UllmeError(f"{path}: another ullme process is writing this output; wait for it or choose another") from None
        try:  # the file may have been removed by the previous holder between our open and our lock
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        for folder in created:  # folders made only for this output, left empty by a failure
            try:
                folder.rmdir()
            except OSError:
                pass


@contextmanager
def guarded(outputs: list, inputs=(), overwrite: bool = False, folder: bool = False, exists_ok: bool = False) -> Iterator[None]:
    """`guard_output`, then hold the lock of the first output while the block writes."""
    guard_output(outputs, inputs, overwrite, folder, exists_ok)
    with output_lock(outputs[0]):
        yield
