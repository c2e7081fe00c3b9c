"""The `rlhf-jax` command line (tyro subcommands)."""
