"""Continual instruction tuning around any trainer: run arguments, training methods and
regularizers as plug-ins, replay strategies and the callback that selects between stages, the
runner, its resumable state and the stage table."""

from kpig_trainer._lazy import lazy_exports

_EXPORTS = {
    "ContinualArguments": "kpig_trainer.continual.arguments",
    "ContinualMethod": "kpig_trainer.continual.methods",
    "register_method": "kpig_trainer.continual.methods",
    "get_method": "kpig_trainer.continual.methods",
    "ReplayCallback": "kpig_trainer.continual.callbacks",
    "ReplayRequest": "kpig_trainer.continual.replay",
    "ReplayChoice": "kpig_trainer.continual.replay",
    "ReplayStrategy": "kpig_trainer.continual.replay",
    "get_replay_strategy": "kpig_trainer.continual.replay",
    "register_replay_strategy": "kpig_trainer.continual.replay",
    "merge_state_dicts": "kpig_trainer.continual.merging",
    "merge_models": "kpig_trainer.continual.merging",
    "lm_cocktail_weights": "kpig_trainer.continual.merging",
    "uniform_weights": "kpig_trainer.continual.merging",
    "example_losses": "kpig_trainer.continual.merging",
    "ContinualRunner": "kpig_trainer.continual.runner",
    "RunDirectory": "kpig_trainer.continual.state",
    "RunState": "kpig_trainer.continual.state",
    "stage_table": "kpig_trainer.continual.table",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
