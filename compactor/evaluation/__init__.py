"""Evaluation: the metrics of the design notes and the harness that measures compactions."""
