"""Metrics with bootstrap intervals, and the SAE-versus-baselines comparison every task reports."""
