"""``python -m rlhf_jax``: the ``rlhf-jax`` command."""

from rlhf_jax.cli.main import main

if __name__ == "__main__":
  raise SystemExit(main())
