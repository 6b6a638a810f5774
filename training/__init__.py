"""Ray Train jobs for each stage of the cascade, the shard loaders, and MLflow tracking."""
