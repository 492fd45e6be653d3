"""The command lines (``nbcore-*`` console scripts and ``python -m nbcore.<module>``): argument
parsing and wiring only; the work is the library modules'. Nothing in the library imports this package."""
