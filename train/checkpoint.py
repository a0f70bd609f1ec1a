"""Checkpoints: orbax `CheckpointManager` (async, keep N), resume from the latest good step.

A checkpoint holds the train state (`state`), the input iterator's state (`data`) and a little metadata (`meta`).
orbax writes each step into a temporary folder and renames it when complete, so a process killed mid-save leaves
no half-written step behind. A latest step that still fails to restore (damaged on disk) is reported, moved aside
to `<step>.corrupt` and the previous step is used.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1), create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, abstract_state):
        """`(step, state, data_state, meta)` of the newest step that restores, or None if there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings: arrays come back sharded like that.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: do not use it
                log.error("checkpoint step %d in %s cannot be restored (%s: %s); moving it aside and using the "
                          "previous one", step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
                self._set_aside(step)
                continue
            return step, restored.state, restored.data, restored.meta
        return None

    def _set_aside(self, step: int):
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            target = f"{path}.corrupt"
            if os.path.exists(target):
                shutil.rmtree(target)
            if os.path.exists(path):
                os.rename(path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._manager.close()
        self._manager = self._open()

    def save(self, step: int, state, data_state: dict, meta: dict):
        """Starts saving `step` in the background (the caller decides when: every K steps, at the end, on
        SIGTERM); the arrays are copied off the device before this returns, so `state` may be donated next."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=True)

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


class StopRequest:
    """Set on SIGTERM (a preemption notice) so the loop can save and exit at the next step boundary.

    With several processes the JAX preemption service owns SIGTERM and agrees on a common step
    (`multihost_utils.reached_preemption_sync_point`); alone, a plain signal handler is enough.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._event.set()

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
