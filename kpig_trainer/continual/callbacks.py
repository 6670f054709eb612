"""Stage-boundary hooks of a continual run."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

from transformers import TrainerCallback

from kpig_trainer.continual.replay import ModelScorer, ReplayChoice, ReplayRequest, ReplayStrategy, get_replay_strategy
from kpig_trainer.distributed import full_weights

logger = logging.getLogger(__name__)


class LogRecordsCallback(TrainerCallback):
    """Hands every Trainer log record (loss, ce, jsd, ig, ...) of the main process to ``write``."""

    def __init__(self, write: Callable[[dict[str, Any]], Any]) -> None:
        self.write = write

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.write({"step": state.global_step, **logs})


class ReplayCallback(TrainerCallback):
    """Chooses the replay set of the next stage when a stage's training ends.

    At ``on_train_end`` the model as it stands scores the seen tasks (the ``kpig`` strategy: the
    information gain of ``N`` sampled instances of every seen task; scoring is sharded over the
    processes and all-gathered, so every rank selects the same tasks) and the strategy picks
    the replay set. The choice is kept in :attr:`choice` and handed to ``on_choice`` (the
    continual runner writes it to the run state).

    Args:
        strategy: a :class:`~kpig_trainer.continual.replay.ReplayStrategy` or its registered name.
        request: the :class:`~kpig_trainer.continual.replay.ReplayRequest` of the next stage.
        collator: builds the paired batches the scorer needs.
        alpha: exponential decay of Info.
        batch_size: instances per scoring forward.
        on_choice: called with the :class:`~kpig_trainer.continual.replay.ReplayChoice`.
        show_progress: progress bar while scoring.
    """

    def __init__(
        self,
        strategy: ReplayStrategy | str,
        request: ReplayRequest,
        collator: Callable,
        *,
        alpha: float = 0.3,
        batch_size: int = 8,
        on_choice: Callable[[ReplayChoice], Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.strategy = get_replay_strategy(strategy) if isinstance(strategy, str) else strategy
        self.request = request
        self.collator = collator
        self.alpha = alpha
        self.batch_size = batch_size
        self.on_choice = on_choice
        self.show_progress = show_progress
        self.choice: ReplayChoice | None = None
        self.seconds: float | None = None

    def select(self, model) -> ReplayChoice:
        """Score with ``model`` and choose: the one path at a stage's end and on resume (a run
        stopped between stages), usable outside a Trainer.
        :attr:`seconds` is the wall time it took (scoring included)."""
        began = time.perf_counter()
        scorer = None
        if self.strategy.needs_model and self.request.seen_tasks:
            scorer = ModelScorer(
                model, self.collator, alpha=self.alpha, batch_size=self.batch_size, show_progress=self.show_progress
            )
        # ZeRO-3: the full weights on every rank, at a stage's end as on resume (one path).
        with full_weights(model) if scorer is not None else contextlib.nullcontext():
            self.choice = self.strategy.select(self.request, scorer)
        self.seconds = time.perf_counter() - began
        summary = (
            ", ".join(
                f"{t} ({self.choice.scores[t]:.4f})" if t in self.choice.scores else t for t in self.choice.tasks
            )
            or "nothing"
        )
        logger.info(
            "stage %d replay (%s): %s; %d instances",
            self.request.stage + 1,
            self.strategy.name,
            summary,
            len(self.choice.instances),
        )
        if self.on_choice is not None:
            self.on_choice(self.choice)
        return self.choice

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ReplayCallback needs the model in the callback arguments")
        self.select(model)
