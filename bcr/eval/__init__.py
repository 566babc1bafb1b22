"""Evaluation: the task-scaling sweep over N, its statistics, and its report files and plots."""
