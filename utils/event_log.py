"""TensorBoard scalars that never stop a run: the checkpoints matter, the curves are a convenience.

A write that fails (a full disk, a vanished folder) is warned about once; the run goes on without further events,
and its checkpoint saves, which handle a full disk themselves, decide whether it can continue.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

logger = logging.getLogger("php")


class EventLog:
    def __init__(self, folder: str, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter
        self.folder = folder
        self._writer = SummaryWriter(folder, purge_step=purge_step)
        # TensorBoard writes from a thread of its own, which re-raises its error there (a traceback on stderr)
        # and again at our next call; the second is reported below, the first is silenced.
        self._thread_hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread

    def _quiet_writer_thread(self, args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            self._thread_hook(args)

    def _call(self, method: str, *args) -> None:
        if self._writer is None:
            return
        try:
            getattr(self._writer, method)(*args)
        except OSError as e:
            logger.warning("cannot write TensorBoard events in %s (%s); training goes on without them", self.folder,
                           e.strerror or e)
            self._writer = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def close(self) -> None:
        self._call("close")
        self._writer = None
        threading.excepthook = self._thread_hook
