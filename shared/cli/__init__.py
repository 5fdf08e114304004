"""The ``radstream`` command line."""
