"""Reading the next input while something else runs: the first scan's decompression overlaps torch's import and
the model load (about 0.4 s of a 512x512x200 CT's 4.5 s), and in a folder run each next scan is read while the
current one is segmented. ITK and zlib do the work in C++ without Python's global lock, so a thread is enough."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from AbdomenSegLib.io.images import read_image


class ReadAhead:
    """`get_prepared(path)` returns (`read_image(path, segmentation_ok=False)`, `prepare(image)` or None), or raises
    their error, made in the background if `path` was in `paths`; the next path of the list starts at once.
    `prepare` (inference.prepare_input: the check and the model space, no torch needed) lets the first scan's
    ~0.2 s of resampling hide under torch's import too."""

    def __init__(self, paths: list, prepare=None):
        self._paths = [Path(p) for p in paths]
        self._prepare = prepare
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="AbdomenSeg read-ahead")
        self._futures: dict = {}
        self._submit(0)

    def _submit(self, index: int) -> None:
        if index < len(self._paths) and index not in self._futures:
            self._futures[index] = self._pool.submit(self._read, self._paths[index])

    def _read(self, path: Path) -> tuple:
        image = read_image(path, segmentation_ok=False)
        return image, self._prepare(image) if self._prepare else None

    def get_prepared(self, path) -> tuple:
        path = Path(path)
        if path not in self._paths:  # not planned (e.g. a file that appeared since): read it now
            return self._read(path)
        index = self._paths.index(path)
        self._submit(index)
        future = self._futures.pop(index)
        self._submit(index + 1)  # at most one scan read ahead: memory stays at two volumes
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
