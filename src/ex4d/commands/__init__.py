"""One module per ``ex4d`` subcommand; each defines ``register(subparsers)``. See ex4d.cli."""
