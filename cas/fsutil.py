"""Small filesystem primitives with the durability and no-follow rules the rest relies on."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
FALLOC_FL_KEEP_SIZE = 0x01
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 0x2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting: the final
    fsync then has little left to do, and disk writes overlap with whatever comes next."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # best effort: errors surface at fsync


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def syncfs(fd: int) -> bool:
    """Make every file of ``fd``'s filesystem durable (syncfs(2)); False where that is not
    available or failed (the caller then fsyncs its files one by one)."""
    return _syncfs is not None and _syncfs(fd) == 0


def syncfs_at(path: str | os.PathLike[str]) -> bool:
    """syncfs(2) of the filesystem holding the folder ``path``; False if it did not happen."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return syncfs(fd)
    finally:
        os.close(fd)


#: More files (or folders) than this are made durable by one syncfs(2), not an fsync each:
#: past a few dozen, one flush of the filesystem costs less than their fsyncs one by one.
SYNCFS_MIN_FILES = 32

_T = TypeVar("_T")


def sync_each_or_all(items: Sequence[_T], fsync_one: Callable[[_T], object], syncfs_from: Callable[[_T], bool],
                     many: int = SYNCFS_MIN_FILES) -> None:
    """Make ``items`` durable: one syncfs(2) of their filesystem, reached through
    ``syncfs_from(items[0])``, when there are more than ``many`` of them (they must all be on
    that filesystem); else, or where syncfs did not happen, ``fsync_one`` of each. The one
    place that decides between the two."""
    if len(items) > many and syncfs_from(items[0]):
        return
    for item in items:
        fsync_one(item)


def sync_files(fds: Iterable[int], many: int = SYNCFS_MIN_FILES) -> None:
    """fsync each file, or one syncfs(2) of their filesystem when there are many of them."""
    sync_each_or_all(list(fds), os.fsync, syncfs, many)


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate disk blocks for [offset, offset+length) without changing the file's size or
    content, so a later write there cannot fail with ENOSPC. False where unsupported."""
    if _fallocate is None or length <= 0:
        return _fallocate is not None
    if _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def preallocate(fd: int, size: int) -> None:
    """Give a new file its final size, with blocks allocated where the filesystem can."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def remove_any(path: str) -> None:
    """Remove whatever is at ``path`` (file, link, or whole directory), never following links."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            shutil.rmtree(path)
        except RecursionError:  # deeper than Python's recursion limit (PATH_MAX allows ~2048)
            _rmtree_iteratively(path)
    else:
        os.unlink(path)


def _rmtree_iteratively(path: str) -> None:
    """Remove the folder ``path`` and everything in it, with an explicit stack, following no
    link (a link is removed, never what it points to)."""
    stack = [path]
    while stack:
        folder = stack[-1]
        deeper = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    deeper.append(entry.path)
                else:
                    os.unlink(entry.path)
        if deeper:
            stack.extend(deeper)
        else:
            os.rmdir(folder)
            stack.pop()


def open_beneath(base: str, path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` (absolute, under the folder ``base``) following no symlink below ``base``.

    ``O_NOFOLLOW`` alone guards only the last component: a folder on the way swapped for a
    link after a snapshot would lead outside. Here every component after ``base`` is opened
    relative to its parent's descriptor with ``O_NOFOLLOW``, so a link anywhere below
    ``base`` fails with ELOOP (or ENOTDIR). ``base`` itself is resolved normally.
    """
    rel = os.path.relpath(path, base)
    parts = rel.split(os.sep)
    if rel == "." or rel.startswith("..") or "" in parts:
        raise ValueError(f"{path!r} is not below {base!r}")
    dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)


_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share all of src's blocks (Linux)


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Make the empty file ``dst_fd`` a reflink copy of ``src_fd`` (the blocks are shared
    until either is written: instant, no space); False where the filesystem cannot."""
    import fcntl

    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM,
                       errno.EBADF, errno.ETXTBSY):
            return False
        raise


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of one file to the same offset of another, inside
    the kernel (copy_file_range(2)); through user space only where the kernel cannot."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            _copy_in_user_space(src_fd, dst_fd, offset + done, length - done)
            return
        if n == 0:  # the source ended early: the caller checks the source did not change
            raise OSError(errno.EIO, f"source ended {length - done} bytes early at offset {offset + done}")
        done += n


def _copy_in_user_space(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    step = 8 << 20
    end = offset + length
    while offset < end:
        data = os.pread(src_fd, min(step, end - offset), offset)
        if not data:
            raise OSError(errno.EIO, f"source ended {end - offset} bytes early at offset {offset}")
        pwrite_all(dst_fd, data, offset)
        offset += len(data)
