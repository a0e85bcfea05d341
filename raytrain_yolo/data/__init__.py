"""Datasets: the embedded synthetic data for every task, and object-storage datasets copied to each node."""
