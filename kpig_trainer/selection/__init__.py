"""INSTA-style task selection by instruction-embedding similarity: the selector, the embedder
alignment, and ``kpig select``."""

from kpig_trainer._lazy import lazy_exports

_EXPORTS = {
    "InstructionSelector": "kpig_trainer.selection.selector",
    "align_embedder": "kpig_trainer.selection.align",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
