"""Entry point of the `rlhf-jax` command."""

import sys

_HELP = """\
usage: rlhf-jax {sft,rm,dpo,ppo,run,generate,eval,export} ...

rlhf_jax command line. The pipeline subcommands land with the CLI issue;
the library (rlhf_jax.*) is usable from Python today.
"""


def main(argv: list[str] | None = None) -> int:
  """Prints help; subcommands are added by the CLI issue."""
  del argv
  sys.stdout.write(_HELP)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
