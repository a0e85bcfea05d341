"""What every job shares: typed config, the one preflight pass, command-line plumbing, console,
storage (pyarrow filesystems), MLflow tracking, and val/predict's job planning."""
