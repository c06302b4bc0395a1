"""Read-only numpy arrays that a dataset's loader workers share with the main process instead of copying.

A dataset travels to its workers by fork (inherited pages) or, from a fork server or spawn, pickled:
an index of Python objects (a list of 1.28M (path, target) tuples, 860k annotation dicts) is then
copied into every worker, and under fork its pages are copied anyway as reference counts are touched
(copy-on-read). `SharedArray` keeps the data in one memfd (anonymous shared memory, not limited by the
size of /dev/shm); pickled for a worker start it travels as a file descriptor and the worker maps the
same pages, so each worker's private memory stays that of an empty worker whatever the index size.
Pickled anywhere else (copy.deepcopy, pickle.dumps) it carries a copy of its data.
"""
import mmap
import os
import weakref
from multiprocessing import context, reduction

import numpy as np


class SharedArray:
    """`.array`: a read-only numpy array (a copy of `array`) in memory shared with the workers."""

    def __init__(self, array=None, *, _fd=None, _dtype=None, _shape=None):
        if _fd is None:
            array = np.ascontiguousarray(array)
            _dtype, _shape = array.dtype, array.shape
        self.dtype, self.shape = np.dtype(_dtype), tuple(_shape)
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if not hasattr(os, "memfd_create"):  # not Linux: a private copy (workers then get copies)
            self.fd, self.array = None, np.array(array)
            self.array.flags.writeable = False
            return
        if _fd is None:
            _fd = os.memfd_create("simam-dataset-index", os.MFD_CLOEXEC)
            os.ftruncate(_fd, max(nbytes, 1))
        self.fd = _fd
        weakref.finalize(self, os.close, _fd)
        self._map = mmap.mmap(_fd, max(nbytes, 1))
        view = np.frombuffer(self._map, self.dtype, count=nbytes // self.dtype.itemsize).reshape(self.shape)
        if array is not None:
            view[...] = array
        view.flags.writeable = False
        self.array = view

    def __reduce__(self):
        if self.fd is not None and context.get_spawning_popen() is not None:  # a worker being started
            return _attach, (reduction.DupFd(self.fd), self.dtype.str, self.shape)
        return SharedArray, (np.array(self.array),)

    def __len__(self):
        return len(self.array)


def _attach(dup_fd, dtype, shape):
    return SharedArray(_fd=dup_fd.detach(), _dtype=dtype, _shape=shape)
