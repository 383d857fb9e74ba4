"""learned family."""
