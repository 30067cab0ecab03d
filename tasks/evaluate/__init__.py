"""Evaluation: greedy predictions scored per row, extra suites, lm-evaluation-harness suites."""
