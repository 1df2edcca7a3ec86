"""Checkpoints that training writes and inference reads: Orbax saves and restores (every host
takes part), their failure handling, and the checks of a checkpoint's tree against a model."""
