"""exact family."""
