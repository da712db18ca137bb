"""Evaluation of trained models: the maths behind the paper's classifier tables."""
