"""local family."""
