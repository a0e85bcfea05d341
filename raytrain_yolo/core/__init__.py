"""The ground floor every job stands on: typed config, command-line plumbing, console, storage (pyarrow
filesystems), joining Ray, MLflow tracking. Imports nothing above it (`plan/`, `train/`, the jobs)."""
