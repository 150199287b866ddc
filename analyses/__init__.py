"""Analyses: one module per figure or check, each a function from MLflow runs to a figure and its table."""
