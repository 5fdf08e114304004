"""Chest CT analysis: lungs, nodule and mass candidates, learned false-positive reduction."""
