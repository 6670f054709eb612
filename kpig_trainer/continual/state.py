"""On-disk state of a continual run: ``state.json``, stage checkpoints, atomic writes.

Layout of a run directory::

    config.json                 the resolved configuration (continual + training arguments)
    state.json                  stages completed, replay choices, IG tables, evaluation rows
    stages/stage_01/model/      the model (or PEFT adapter) and tokenizer after stage 1
    stages/stage_01/extra.pt    stage state that is not a model (regulariser anchor, Fisher)
    stages/stage_02/trainer/    Trainer checkpoints inside a running stage (mid-stage resume)
    logs/run.log                the run's log (Python logging of kpig_trainer and transformers)
    logs/train.jsonl            the Trainer's log records (loss, ce, jsd, ig, ...), one per line
    logs/replay.jsonl           each stage boundary's replay choice and score table
    logs/*.rank<r>.*            the same files of process r > 0 in a distributed run
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpig_trainer.fileio import append_line, atomic_write_json, replace_directory

STATE_VERSION = 1


def row_order(key: str) -> int:
    """Sort key of an evaluation row: ``"init"`` first, then stages by number."""
    return -1 if key == "init" else int(key)


def in_stage_order(rows: dict[str, Any]) -> dict[str, Any]:
    """Evaluation rows keyed ``"init"``, ``"1"``, ``"2"``, ... re-ordered by :func:`row_order`."""
    return dict(sorted(rows.items(), key=lambda item: row_order(item[0])))


@dataclass
class RunState:
    """What a continual run has done so far.

    Attributes:
        fingerprint: hash of the settings that define the run's results; a resumed run must match.
        stages: stage names, in order.
        completed: number of stages whose training, evaluation and checkpoint are done.
        replay: per stage index (as a string key), the replay choice used for that stage.
        evaluation: per row key (``"init"``, ``"1"``, ``"2"``, ...), the evaluation after that stage;
            always in stage order, ``"init"`` first.
        timings: seconds spent per stage and phase.
    """

    fingerprint: str
    stages: list[str]
    completed: int = 0
    replay: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    version: int = STATE_VERSION

    def __post_init__(self) -> None:
        # Rows come from state.json in any order (older files are key-sorted: "1" < "10" < "init").
        self.evaluation = in_stage_order(self.evaluation)

    def record_evaluation(self, key: str, entry: dict[str, Any]) -> None:
        """Set the evaluation row ``key`` (``"init"``, ``"1"``, ...), keeping rows in stage order."""
        self.evaluation = in_stage_order({**self.evaluation, key: entry})

    @classmethod
    def load(cls, path: str | Path) -> "RunState":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: state version {data.get('version')!r}, expected {STATE_VERSION}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self), sort_keys=False)  # rows stay in stage order on disk


class RunDirectory:
    """Paths and checkpoint housekeeping of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def stage_dir(self, stage: int) -> Path:
        """Folder of stage ``stage`` (0-based index; folders are numbered from 1)."""
        return self.root / "stages" / f"stage_{stage + 1:02d}"

    def model_dir(self, stage: int) -> Path:
        return self.stage_dir(stage) / "model"

    def trainer_dir(self, stage: int) -> Path:
        return self.stage_dir(stage) / "trainer"

    def extra_path(self, stage: int) -> Path:
        return self.stage_dir(stage) / "extra.pt"

    def log_path(self, name: str, rank: int = 0) -> Path:
        """``logs/<name>`` of process ``rank`` (``logs/run.rank1.log`` for ``run.log`` on rank 1)."""
        path = Path(name)
        if rank:
            path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        return self.root / "logs" / path

    def append_log(self, name: str, record: dict[str, Any], rank: int = 0) -> None:
        """Append ``record`` to ``logs/<name>`` of process ``rank`` as one JSON line."""
        append_line(self.log_path(name, rank), json.dumps(record, default=str))

    def last_trainer_checkpoint(self, stage: int) -> str | None:
        """The newest complete Trainer checkpoint inside a stage, if any."""
        from transformers.trainer_utils import get_last_checkpoint

        folder = self.trainer_dir(stage)
        return get_last_checkpoint(str(folder)) if folder.is_dir() else None

    def save_model(self, stage: int, model, tokenizer) -> Path:
        """Save model (or adapter) and tokenizer into a temp folder, then rename into place."""
        final = self.model_dir(stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=final.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            replace_directory(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def finish_stage(self, stage: int, keep_last: int) -> None:
        """Drop the stage's mid-stage Trainer checkpoints and stage models older than ``keep_last``."""
        shutil.rmtree(self.trainer_dir(stage), ignore_errors=True)
        if keep_last > 0:
            for old in range(0, stage + 1 - keep_last):
                shutil.rmtree(self.model_dir(old), ignore_errors=True)
