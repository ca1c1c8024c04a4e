"""Figures: one module per topic, each function taking results/arrays and an output path."""
