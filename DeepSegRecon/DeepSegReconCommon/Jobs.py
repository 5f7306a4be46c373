"""The one job controller of a DeepSegRecon panel: the module's run and the fine-tune section's training job,
polled by one timer.

No Qt here, so the tests drive it with a real worker job: ``timer`` is the panel's ``qt.QTimer`` (``start()``,
``stop()``; its ``timeout()`` calls :meth:`JobController.tick`), ``showError(text, title)`` the error dialog, and
a job's ``view`` is anything with ``progressBar``, ``etaLabel`` and ``statusLabel`` (the panel's widgets).

A job's logic is a scene logic (``deepsegrecon.scene``): its own start method (the button's one Logic call) has
started the worker; ``poll()`` reports progress and, when the worker has finished, imports the result into the
scene; ``cancel()`` stops the worker and leaves the scene as it was. A job goes running -> succeeded | failed |
cancelled, and is then dropped; the timer stops when no job is left.
"""

import logging

FINAL_STATES = ("succeeded", "failed", "cancelled")
POLL_INTERVAL_MS = 200


def formatEta(seconds):
    if seconds is None:
        return ""
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"about {seconds} s left"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"about {minutes} min {seconds:02d} s left"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes:02d} min left"


def describeRun(status):
    """The status line of a running job: "stage: message"."""
    stage, message = status.get("stage") or "", status.get("message") or ""
    return f"{stage}: {message}" if stage and message else stage or message or "Running..."


class _Job:
    def __init__(self, logic, view, title, describe, onSucceeded, onEnded, cancelledText):
        self.logic, self.view, self.title = logic, view, title
        self.describe, self.onSucceeded, self.onEnded = describe, onSucceeded, onEnded
        self.cancelledText = cancelledText


class JobController:
    """The jobs of one panel ("run", "finetune"), polled by one timer; see the module docstring."""

    def __init__(self, timer, showError):
        self.timer = timer
        self.showError = showError
        self.jobs = {}  # name ("run", "finetune") -> _Job
        self.states = {}  # name -> the state last shown (running, succeeded, failed, cancelled)

    def running(self, name=None):
        return name in self.jobs if name else bool(self.jobs)

    def started(self, name, logic, view, title, text, describe=describeRun, onSucceeded=None, onEnded=None,
                cancelledText="Cancelled; the scene was left unchanged."):
        """``logic`` has just started a job: show it and poll it. ``onSucceeded(status)`` shows the result and
        may return the status line; ``onEnded()`` follows every end (the panel updates its buttons)."""
        self.jobs[name] = _Job(logic, view, title, describe, onSucceeded, onEnded, cancelledText)
        self.states[name] = "running"
        view.progressBar.value = 0
        view.etaLabel.text = ""
        view.statusLabel.text = text
        self.timer.start()

    def tick(self):
        """One timer tick: poll every job; show its progress, or its end."""
        for name in list(self.jobs):
            try:
                status = self.jobs[name].logic.poll()
            except Exception as e:  # the timer must never keep firing on an error
                logging.exception(f"DeepSegRecon: polling the {name} job failed")
                status = {"state": "failed", "error": f"{type(e).__name__}: {e}"}
            self.show(name, status)
        if not self.jobs:
            self.timer.stop()

    def show(self, name, status):
        job = self.jobs[name]
        state = status.get("state")
        if state == "running":
            job.view.progressBar.value = int(round(100 * float(status.get("fraction") or 0.0)))
            job.view.etaLabel.text = formatEta(status.get("eta_s"))
            job.view.statusLabel.text = job.describe(status)
        elif state in FINAL_STATES:
            self.finish(name, status)
        else:  # idle: the logic was cancelled from elsewhere
            self.finish(name, {"state": "cancelled"})

    def cancelAll(self, reason):
        """The scene is closing or the panel goes away: stop every job (nothing is added to the scene)."""
        for name in list(self.jobs):
            try:
                self.jobs[name].logic.cancel()
            except Exception:
                logging.exception(f"DeepSegRecon: cancelling the {name} job failed")
            self.finish(name, {"state": "cancelled"}, text=f"Cancelled: {reason}.")

    def finish(self, name, status, text=None):
        job = self.jobs.pop(name)
        state = self.states[name] = status["state"]
        view = job.view
        view.etaLabel.text = ""
        view.progressBar.value = 100 if state == "succeeded" else 0
        error = None
        if text is None and state == "succeeded":
            text = "Done."
            if job.onSucceeded is not None:
                try:
                    text = job.onSucceeded(status) or text
                except Exception as e:  # the result is in the scene; only showing it failed
                    logging.exception(f"DeepSegRecon: showing the result of the {name} job failed")
                    text = f"Done, but showing the result failed: {type(e).__name__}: {e}"
        elif text is None and state == "cancelled":
            text = job.cancelledText
        elif text is None:
            error = status.get("error") or "unknown error"
            text = f"Failed: {error}"
        view.statusLabel.text = text
        if not self.jobs:
            self.timer.stop()
        if error is not None:
            self.showError(f"{job.title} failed.\n\n{error}", job.title)
        if job.onEnded is not None:
            job.onEnded()
