"""Frame-by-frame access to large (T, ...) arrays, so that memory stays flat as T grows.

A depth video of 1000 frames at 512x512 is 1 GB of float32; recon needs one frame at a time.
:class:`FrameSequence` is the small read-only protocol the reconstruction stage uses for such arrays
(``shape``, ``dtype``, ``len``, ``seq[k]`` -> one frame, iteration in order, ``np.asarray(seq)`` to
load everything). Implementations:

* :class:`NpyFrames`: a ``.npy`` file, or one member of an ``.npz`` archive. Frames are read with
  plain file reads (never a memory map: pages of a map count in the process's resident memory until
  the kernel reclaims them). An *uncompressed* member (``np.savez``, and every ``depth.npz`` ex4d
  writes) is read at random; a compressed member (``np.savez_compressed``) is decompressed as a stream,
  so reading frames in order costs one pass and going back restarts the stream.
* :class:`MappedFrames`: frames computed on demand by a function (e.g. converted and resized).
* :class:`TemporaryFrames`: a temporary ``.npy`` written with :class:`NpyFrameWriter` (e.g. an
  estimator's raw output, spilled so that it can be normalised over the whole clip in a second pass),
  deleted by :meth:`FrameSequence.release` or when the object is garbage collected.

:func:`write_npz_stored` writes an uncompressed ``.npz`` whose arrays may be any of these, one frame
at a time; :func:`open_npz` lists and opens the members of an ``.npz``.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import weakref
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


class FrameSequence:
    """A read-only sequence of equally shaped frames: ``shape`` (T, ...), ``dtype``, ``seq[k]``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    def frame(self, k: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            k = int(index)
            if k < 0:
                k += len(self)
            if not 0 <= k < len(self):
                raise IndexError(f"frame {index} out of range for {len(self)} frames")
            return self.frame(k)
        if isinstance(index, slice):
            return np.stack([self.frame(k) for k in range(*index.indices(len(self)))]) if len(
                range(*index.indices(len(self)))) else np.empty((0, *self.frame_shape), self.dtype)
        raise TypeError(f"frame sequences take an int or a slice, not {type(index).__name__}")

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(len(self)):
            yield self.frame(k)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for k in range(len(self)):
            out[k] = self.frame(k)
        return out if dtype is None else out.astype(dtype, copy=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def head(self, num: int) -> "FrameSequence":
        """The first ``num`` frames (no data is read)."""
        return MappedFrames(min(int(num), len(self)), self.frame_shape, self.dtype, self.frame)

    def release(self) -> None:
        """Free what backs the frames (open files, temporary files); the sequence must not be read after."""


class MappedFrames(FrameSequence):
    """Frames made on demand: ``fn(k)`` -> frame k (shape ``frame_shape``, dtype ``dtype``).

    release: called by :meth:`release` (e.g. to delete a temporary file that ``fn`` reads).
    """

    def __init__(self, num: int, frame_shape, dtype, fn: Callable[[int], np.ndarray],
                 release: Callable[[], None] | None = None):
        self.shape = (int(num), *(int(s) for s in frame_shape))
        self.dtype = np.dtype(dtype)
        self._fn = fn
        self._release = release

    def frame(self, k: int) -> np.ndarray:
        return self._fn(k)

    def release(self) -> None:
        if self._release is not None:
            self._release()


def release_frames(*arrays) -> None:
    """:meth:`FrameSequence.release` for each argument that is a frame sequence (ndarrays are left alone)."""
    for array in arrays:
        if isinstance(array, FrameSequence):
            array.release()


def iter_frames(array) -> Iterator[np.ndarray]:
    """Frames of an ndarray or a :class:`FrameSequence`, in order."""
    if isinstance(array, FrameSequence):
        yield from array
    else:
        for k in range(len(array)):
            yield array[k]


def read_ahead(items: Iterable[T], ahead: int = 2) -> Iterator[T]:
    """Iterate ``items`` on a thread of its own, up to ``ahead`` items in advance of the consumer.

    For sources that wait on something other than Python (video decoding, file reads): the wait
    then overlaps the consumer's work. Items arrive in order; an exception raised by the source is
    raised again, unchanged, at the point the consumer reaches it. Closing the iterator (or
    dropping it) stops the thread within one item.
    """
    import queue
    import threading

    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    buffer: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    source = iter(items)

    def fill() -> None:
        try:
            for item in source:
                if not _put(buffer, (True, item), stop):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            _put(buffer, (False, error), stop)
            return
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # a generator's own cleanup (an open video file) runs here, not at GC
                close()
        _put(buffer, (True, done), stop)

    thread = threading.Thread(target=fill, name="read ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _put(buffer, entry, stop) -> bool:
    """Queue ``entry`` unless ``stop`` is set first; returns whether it was queued."""
    import queue

    while not stop.is_set():
        try:
            buffer.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def frames_sha1(array) -> str:
    """sha1 of the C-order bytes of ``array`` (T, ...), read frame by frame (equal to hashing the
    whole contiguous array at once)."""
    digest = hashlib.sha1()
    for frame in iter_frames(array):
        digest.update(np.ascontiguousarray(frame))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# .npy / .npz members read frame by frame


class NpyFrames(FrameSequence):
    """Frames of a ``.npy`` file (``key=None``) or of the member ``key`` of an ``.npz``.

    Raises ValueError (bad header, object dtype, Fortran order) or OSError / zipfile.BadZipFile; the
    callers turn those into one-line errors naming the file.
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None):
        self.path = Path(path)
        self.key = key
        self._file = None  # open handle (raw file, or a decompressing stream for a compressed member)
        self._zip = None
        self._next = 0  # next frame index of a stream
        if key is None:
            with open(self.path, "rb") as handle:
                shape, fortran, dtype = _read_npy_header(handle)
                self._offset = handle.tell()
            self._stream = False
        else:
            with zipfile.ZipFile(self.path) as archive:
                info = archive.getinfo(f"{key}.npy")
                self._stream = info.compress_type != zipfile.ZIP_STORED
                with archive.open(info) as member:
                    shape, fortran, dtype = _read_npy_header(member)
                    header_size = member.tell() if not self._stream else _tell(member)
                if not self._stream:
                    self._offset = _member_data_offset(self.path, info) + header_size
                self._info = info
                self._header_size = header_size
        if dtype.hasobject:
            raise ValueError(f"'{key or 'array'}' holds Python objects, which need pickle")
        if fortran and len(shape) > 1:
            raise ValueError(f"'{key or 'array'}' is stored in Fortran order; save it with np.ascontiguousarray")
        if len(shape) == 0:
            shape = (1,)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._frame_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    @property
    def compressed(self) -> bool:
        return self._stream

    def close(self) -> None:
        for handle in (self._file, self._zip):
            if handle is not None:
                handle.close()
        self._file = self._zip = None

    def release(self) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def frame(self, k: int) -> np.ndarray:
        out = np.empty(self.shape[1:], dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if not self._stream:
            if self._file is None:
                self._file = open(self.path, "rb")
            self._file.seek(self._offset + k * self._frame_bytes)
            got = self._file.readinto(view)
        else:
            if self._file is None or k < self._next:
                self.close()
                self._zip = zipfile.ZipFile(self.path)
                self._file = self._zip.open(self._info)
                self._file.read(self._header_size)
                self._next = 0
            while self._next < k:  # skip forward, a bounded chunk at a time
                left = (k - self._next) * self._frame_bytes
                while left:
                    chunk = self._file.read(min(left, 1 << 24))
                    if not chunk:
                        break
                    left -= len(chunk)
                self._next = k
            got = _read_full(self._file, view)
            self._next = k + 1
        if got != self._frame_bytes:
            raise ValueError(f"'{self.key or 'array'}' is truncated: frame {k} is incomplete")
        return out


class NpyFrameWriter:
    """Write a ``.npy`` of ``shape`` (T, ...) one frame (or a few) at a time; the header comes first.

    with NpyFrameWriter(path, (T, H, W), np.float32) as writer:
        writer.write(frames)   # (n, H, W), in order, n >= 1, T frames in all

    Leaving the block with fewer than T frames written (other than through an exception) is a
    ValueError: the file would be truncated.
    """

    def __init__(self, path: str | os.PathLike, shape, dtype):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.written = 0
        self._handle = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        if _needs_v2(header):
            np.lib.format.write_array_header_2_0(self._handle, header)
        else:
            np.lib.format.write_array_header_1_0(self._handle, header)

    def write(self, frames: np.ndarray) -> None:
        frames = np.ascontiguousarray(frames, dtype=self.dtype)
        if frames.shape[1:] != self.shape[1:] or self.written + len(frames) > self.shape[0]:
            raise ValueError(f"cannot write frames of shape {frames.shape} at frame {self.written} into "
                             f"an array of shape {self.shape}")
        self._handle.write(frames.tobytes())
        self.written += len(frames)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "NpyFrameWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None and self.written != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.written} of {self.shape[0]} frames were written")


class TemporaryFrames(NpyFrames):
    """The frames of a temporary ``.npy`` that this object owns: the file is deleted by :meth:`release`,
    or when the object is garbage collected, or at interpreter exit, whichever comes first."""

    def __init__(self, path: str | os.PathLike):
        self._finalizer = weakref.finalize(self, _unlink_quietly, str(path))
        super().__init__(path)

    def release(self) -> None:
        self.close()
        self._finalizer()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _tell(member) -> int:
    try:
        return member.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):  # pragma: no cover - old zipfile
        raise ValueError("cannot locate the array data in the archive") from None


def _read_full(handle, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = handle.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_npy_header(handle) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    return np.lib.format._read_array_header(handle, version)  # (3, 0): utf-8 field names


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: its local header is 30 bytes + name + extra field."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def npz_members(path: str | os.PathLike) -> list[str]:
    """Array names in an ``.npz`` (member names without ``.npy``)."""
    with zipfile.ZipFile(path) as archive:
        return [name[:-4] if name.endswith(".npy") else name for name in archive.namelist()]


def read_npz_small(path: str | os.PathLike, key: str) -> np.ndarray:
    """Load one (small) member of an ``.npz`` completely, without pickle."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def write_npz_stored(handle, arrays: dict) -> None:
    """Write ``arrays`` (name -> ndarray or :class:`FrameSequence`) as an *uncompressed* ``.npz`` into
    the binary file ``handle``, one frame at a time.

    ``np.load`` reads the result like any ``.npz``; :class:`NpyFrames` reads its frames at random
    without loading a whole member.
    """
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                if isinstance(value, FrameSequence):
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)),
                              "fortran_order": False, "shape": tuple(value.shape)}
                    np.lib.format.write_array_header_2_0(member, header) if _needs_v2(header) else \
                        np.lib.format.write_array_header_1_0(member, header)
                    for frame in value:
                        member.write(np.ascontiguousarray(frame, dtype=value.dtype).tobytes())
                else:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def _needs_v2(header: dict) -> bool:
    return len(repr(header)) > 65000
