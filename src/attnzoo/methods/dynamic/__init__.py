"""dynamic family."""
