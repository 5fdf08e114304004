"""Getting instances in: the scanner SDK (publisher) used by the CLI and the gateway."""
