"""Image quality: FID and KID against reference statistics, CLIP score, and the emoji demo's task measures, and
the shapes task's object detector (``ldm.evaluation.shapes``).

No Lightning in here: ``ldm.training.evaluation`` runs the ``Evaluator`` during training, ``evaluate.py`` on
saved checkpoints, ``python -m ldm.evaluation.reference_stats`` makes the reference statistics.
"""

from ldm.evaluation.evaluator import Evaluator

__all__ = ["Evaluator"]
