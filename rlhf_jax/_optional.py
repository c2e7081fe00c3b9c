"""Dependencies of the ``cli`` extra, imported only where they are used.

``pip install rlhf_jax`` installs the library (jax, flax, optax, orbax,
tokenizers, ...). The ``rlhf-jax`` application and a few library features
need more: ``pip install "rlhf_jax[cli]"``. Those features import their
package through ``import_cli_dependency``, so a lean install imports every
library module and fails, only when such a feature is used, with an
ImportError that names the extra.

>>> import_cli_dependency("json", purpose="reading JSON").__name__
'json'
>>> import_cli_dependency("no_such_mod", purpose="Plots")
Traceback (most recent call last):
...
ImportError: Plots needs the no_such_mod package: pip install "rlhf_jax[cli]"
"""

import importlib
import importlib.util
from types import ModuleType

CLI_EXTRA_INSTALL = 'pip install "rlhf_jax[cli]"'

# Top-level modules of the ``cli`` extra's packages (pyproject.toml).
CLI_MODULES = (
  "tyro",
  "rich",
  "tensorboardX",
  "matplotlib",
  "vaderSentiment",
  "pyarrow",
)


def import_cli_dependency(module: str, *, purpose: str) -> ModuleType:
  """Imports ``module`` (a package of the ``cli`` extra, or a submodule).

  Args:
    module: dotted module name, e.g. "pyarrow.parquet".
    purpose: what needs it, for the message, e.g. "reading Parquet files".

  Returns:
    The imported module.

  Raises:
    ImportError: the package is not installed; the message says how to
      install the extra. An ImportError raised inside an installed package
      propagates unchanged.
  """
  top = module.split(".")[0]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != top:
      raise
    raise ImportError(
      f"{purpose} needs the {top} package: {CLI_EXTRA_INSTALL}"
    ) from e


def missing_cli_modules() -> list[str]:
  """The modules of ``CLI_MODULES`` that are not installed (none imported)."""
  return [m for m in CLI_MODULES if importlib.util.find_spec(m) is None]
