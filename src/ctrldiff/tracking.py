"""Experiment tracking (`--report-to`): what a run logs to metrics.jsonl, its config and the monitoring batch's
sample grid, also sent to TensorBoard, Weights & Biases or MLflow through accelerate's tracker classes.

metrics.jsonl stays the source of truth (`--resume` reads it); a tracker is a live view of it. A resumed loop
re-makes, bit for bit, the records after its last checkpoint, and the tracker already holds them: a record
whose (loop, step) metrics.jsonl held when the run was resumed is not sent again, so no step is logged twice.
The trackers are started with the run folder (`Run`), before any work, so one that cannot start is a one-line
error while nothing has been computed; only where the run folder is written, i.e. on the main process. Nothing is
imported unless a tracker is asked for.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import uuid
from pathlib import Path

import numpy as np

from .io import CtrlDiffError, read_json, reason, write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")  # each is its package's name and ctrldiff's extra
REPORT_TO = ("none", *TRACKERS, "all")
PROJECT = "ctrldiff"  # the wandb project and MLflow experiment every run goes to
STATE = "tracking.json"  # in the run folder: the trackers reported to, and the wandb / MLflow run ids


def trackers_for(report_to: str) -> list[str]:
    """The trackers `--report-to` names ("all": every one installed); one that is not installed is an error."""
    if report_to not in REPORT_TO:
        raise CtrlDiffError(f"--report-to {report_to!r}; choose from {list(REPORT_TO)}")
    if report_to == "all":
        names = [n for n in TRACKERS if _installed(n)]
        if not names:
            raise CtrlDiffError("--report-to all: no tracker is installed; pip install 'ctrldiff[tensorboard]' "
                                "(or [wandb], [mlflow])")
        return names
    if report_to != "none" and not _installed(report_to):
        raise CtrlDiffError(f"--report-to {report_to}: the {report_to} package is not installed; "
                            f"pip install 'ctrldiff[{report_to}]'")
    return [] if report_to == "none" else [report_to]


def reported_to(folder: Path) -> str:
    """The `--report-to` a run folder was last reported with ("none" if never)."""
    return _state(folder)["report_to"]


def _state(folder: Path) -> dict:
    """tracking.json, checked (a damaged one is a one-line error naming it); none yet: nothing opened."""
    path = Path(folder) / STATE
    if not path.exists():
        return {"report_to": "none", "opened": {}}
    state = read_json(path)
    if not (isinstance(state, dict) and state.get("report_to") in REPORT_TO and isinstance(state.get("opened"), dict)
            and all(isinstance(v, dict) for v in state["opened"].values())):
        raise CtrlDiffError(f"{path} is damaged: expected {{\"report_to\": one of {list(REPORT_TO)}, \"opened\": "
                            "{tracker: run ids}}; restore it or delete it (the tracker runs start afresh)")
    return state


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def record_key(record: dict) -> tuple:
    """(loop, step) of a metrics.jsonl record: fine-tuning and pre-training records carry a step, a classifier's
    its name and epoch."""
    return record.get("classifier"), record["step"] if "step" in record else record.get("epoch")


def hparams(config: dict) -> dict:
    """The resolved config as a flat table of dotted keys (`rl.lr_emb`); a list, dict or null becomes its JSON
    text, which every tracker's hyper-parameter table accepts."""
    flat = {}
    for section, value in config.items():
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            key = section if k is None else f"{section}.{k}"
            flat[key] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return flat


_active = None  # the Tracker whose trackers are open


class Tracker:
    """The experiment trackers of one run folder."""

    def __init__(self, folder: Path, report_to: str, config: dict, logged: set):
        """logged: the (loop, step) keys of the records metrics.jsonl held when the run was resumed."""
        self.folder, self.report_to, self.config, self.logged = folder, report_to, config, logged
        self.names = trackers_for(report_to)
        self.trackers: list | None = None  # opened at the first record
        self.axes: dict[str, str] = {}  # wandb: each tag's step axis

    def start(self) -> None:
        """Start the trackers (`_open`); Run calls it before any work."""
        self._open()

    def log(self, record: dict) -> None:
        """Send the record's numbers (tags prefixed by its loop, e.g. `monitor-compress4/loss`) at its step."""
        loop, step = record_key(record)
        if (loop, step) in self.logged:
            return
        values = {f"{loop}/{k}" if loop else k: v for k, v in record.items()
                  if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self._open():
            if t.name == "wandb":
                t.log({**values, self._axis(t.tracker, values, loop): step})
            else:
                t.log(values, step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """One image (H, W, C uint8) at a fine-tuning step (sent once, like that step's record)."""
        if (None, step) in self.logged:
            return
        plain = image[..., 0] if image.shape[-1] == 1 else image  # (H, W) for grey: what wandb and MLflow take
        for t in self._open():
            if t.name == "tensorboard":
                t.log_images({name: image[None]}, step=step, dataformats="NHWC")
            elif t.name == "wandb":
                import wandb

                t.tracker.log({name: wandb.Image(plain), self._axis(t.tracker, [name], None): step})
            else:  # accelerate's MLflow tracker has no log_images
                import mlflow

                mlflow.log_image(plain, key=name, step=step)

    def _axis(self, run, tags, loop: str | None) -> str:
        """wandb keeps one step counter that only grows, and a run's loops each count from 0: each tag is plotted
        against its loop's own step instead (`step`, or `<loop>/epoch` for a classifier)."""
        axis = f"{loop}/epoch" if loop else "step"
        for tag in tags:
            if tag not in self.axes:
                run.define_metric(tag, step_metric=axis)
                self.axes[tag] = axis
        return axis

    def _open(self) -> list:
        """Start the trackers once, continuing the run's own tracker runs (their ids are in tracking.json)."""
        global _active
        if self.trackers is not None:
            return self.trackers
        if _active is not None:  # wandb's and MLflow's active run is one per process: finish the previous run's
            _active.close()
        from accelerate import PartialState

        PartialState()  # what an Accelerator sets up: the trackers ask it which process is the main one
        opened = _state(self.folder)["opened"]
        self.trackers = []
        for name in self.names:
            try:
                t, ids = _start(name, self.folder, opened.get(name))
                if name not in opened:  # a continued tracker run has its hyper-parameters already
                    t.store_init_configuration(hparams(self.config))
            except Exception as e:  # noqa: BLE001 - each tracker library fails in its own way: one line, naming it
                self.close()
                raise CtrlDiffError(f"--report-to {self.report_to}: {name} failed to start ({type(e).__name__}: "
                                    f"{reason(e)})") from None
            opened[name] = ids
            self.trackers.append(t)
        write_json(self.folder / STATE, {"report_to": self.report_to, "opened": opened})
        _active = self
        atexit.register(self.close)
        return self.trackers

    def close(self) -> None:
        """Finish every tracker (flush and close its files); a later record opens them again."""
        global _active
        for t in self.trackers or []:
            t.finish()
        self.trackers, self.axes = None, {}
        if _active is self:
            _active = None
        atexit.unregister(self.close)


def _start(name: str, folder: Path, ids: dict | None):
    """accelerate's tracker `name` for a run folder, started: a new tracker run (ids None) or the one `ids`
    names. Returns it and the ids that continue it."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":  # <run>/tensorboard/: `tensorboard --logdir runs` shows each run folder as a run
        t = TensorBoardTracker("tensorboard", folder)
    elif name == "wandb":  # offline unless the user set WANDB_MODE: nothing is sent, nothing prompts
        ids = ids or {"id": uuid.uuid4().hex[:12]}
        t = WandBTracker(PROJECT, name=str(folder), id=ids["id"], resume="allow", dir=str(folder),
                         mode=os.environ.get("WANDB_MODE", "offline"))
    else:  # to MLflow's tracking URI (MLFLOW_TRACKING_URI; by default a local store)
        t = MLflowTracker(PROJECT, run_id=(ids or {}).get("run_id"), run_name=str(folder))
    t.start()
    return t, {"run_id": t.tracker.info.run_id} if name == "mlflow" else ids or {}
