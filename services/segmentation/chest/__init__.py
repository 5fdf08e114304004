"""Chest CT analysis: lungs, nodule and mass candidates, learned false-positive reduction.

``chest_ct(vol, geo) -> TaskResult`` (pipeline), ``evaluate_chest`` (evaluate) for the
quality benchmark; the classifier's model file is ``nodule_classifier.json`` beside this file.
"""

from services.segmentation.chest.evaluate import evaluate_chest
from services.segmentation.chest.pipeline import VERSION, analyse, chest_ct

__all__ = ["VERSION", "analyse", "chest_ct", "evaluate_chest"]
