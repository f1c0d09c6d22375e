"""CLI command groups; each module defines a typer app or a `register(app)` function."""
