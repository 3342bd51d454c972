"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop training cleanly at a step boundary.

Clusters end jobs with a signal: Slurm sends SIGTERM at preemption or the time limit (or the
signal chosen with --signal, often SIGUSR1, some time before it), and Ctrl-C is SIGINT. The first
such signal only sets a flag: the training loop finishes the step it is in, writes a checkpoint
(with -o), says so, and stops with exit status 128 + the signal's number; -y 1 resumes from that
checkpoint bit for bit. A second signal stops at once (Interrupted is raised from the handler):
a checkpoint being written then is abandoned -- atomic.atomic_write_with removes its temporary
file, and the file name appears only once it is complete -- so the last complete checkpoint is
left as it was.

The loop asks one question, StopSignals.stop_now(), at the same point of every step. With several
ranks the answer must be the same on all of them (or some would wait in a collective for ranks
that stopped): agree= takes a function that combines the local flag across ranks -- an all-reduce
(max) over the communicator -- so that every rank stops after the same step.
"""

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """Training stopped by a signal. A BaseException, as KeyboardInterrupt, so that no
    `except Exception` on the way swallows a second signal's immediate stop.
    signum: the signal; step: the steps taken (None if unknown); checkpoint: the checkpoint
    written on the way out ("" if none); immediate: a second signal cut the run short."""

    def __init__(self, signum, step=None, checkpoint="", immediate=False, message=""):
        self.signum, self.step, self.checkpoint, self.immediate = signum, step, checkpoint, immediate
        super().__init__(message or f"stopped by {signal_name(signum)}")

    @property
    def exit_status(self):
        return 128 + int(self.signum)


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Installs the handlers for the duration of a `with` block (where it can: only the main
    thread may), and restores the previous ones after.

        with StopSignals() as stop:      # or stop = StopSignals().install() ... stop.restore()
            for step in ...:
                if stop.stop_now(): ...   # save, then raise Interrupted(stop.signum, ...)
    """

    def __init__(self, signals=STOP_SIGNALS, agree=None):
        self.signals = tuple(signals)
        self.agree = agree  # flag -> the flag combined over all ranks (an all-reduce max); None: one rank
        self.signum = 0     # the first signal received (0: none)
        self.count = 0
        self.installed = False
        self._previous = {}

    def install(self):
        """Take over the signals (from the main thread only; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        return self

    def restore(self):
        """Give the signals back to their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.installed = False

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.signum = signum
            # os.write, not print: a handler may run in the middle of a print to the same stream
            _say(f"\nreceived {signal_name(signum)}: finishing this step, then writing a checkpoint and stopping "
                 f"(send it again to stop at once)\n")
            return
        raise Interrupted(signum, immediate=True,
                          message=f"stopped at once by a second signal ({signal_name(signum)})")

    def request(self, signum=signal.SIGTERM):
        """Ask for a stop as a first signal would (for tests, and callers with their own handlers)."""
        self.count = max(self.count, 1)
        self.signum = self.signum or signum

    def stop_now(self):
        """Has any rank received a stop signal? Every rank must call this at the same point of the
        same step; returns the signal's number (0: go on)."""
        flag = int(self.signum)
        return int(self.agree(flag)) if self.agree is not None else flag


def stop_message(signum, step, saved, output_dir, resuming):
    """What the run says when a stop signal ends it at the top of `step` (steps taken so far)."""
    name = signal_name(signum)
    if saved:
        return f"stopped by {name} after step {step}: checkpoint {saved} written; resume with -y 1"
    if resuming:
        return f"stopped by {name} at step {step}, before any step after the checkpoint it resumed from"
    if step == 0:
        return f"stopped by {name} before the first step: no checkpoint written"
    if not output_dir:
        return f"stopped by {name} after step {step}: no checkpoint written (no -o)"
    return f"stopped by {name} after step {step}: its checkpoint could not be written (see above)"


def _say(text):
    try:
        os.write(2, text.encode())
    except OSError:
        pass
