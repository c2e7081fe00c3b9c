"""MeshError: a mesh, rule table or batch that does not fit the devices is
one clear message naming the option, never a stack trace from jax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.cli.main import main
from rlhf_jax.runner.mesh import MeshConfig, MeshError, Placement
from rlhf_jax.train import TrainState

PARAMS = {"w": jnp.ones((8, 16)), "b": jnp.zeros((16,))}
AXES = {"w": P("embed", "mlp"), "b": P("mlp")}
OPT = optax.adam(1e-3)


def _init(params, rng):
  return TrainState.create(params, OPT, rng)


@pytest.fixture(scope="module")
def fsdp_placement(devices8):
  return Placement.create(MeshConfig(data=4, fsdp=2), devices8)


def test_mesh_that_does_not_fit_names_flags_and_device_count(devices8):
  with pytest.raises(MeshError) as e:
    Placement.create(MeshConfig(data=3), devices8)
  msg = str(e.value)
  assert "--mesh.data 3 --mesh.fsdp 1 --mesh.tensor 1" in msg
  assert "8 devices" in msg


def test_check_batch_names_the_option(devices8):
  placement = Placement.create(MeshConfig(data=4), devices8[:4])
  assert placement.batch_divisor == 4
  placement.check_batch(8, "--x")  # divisible: no error
  with pytest.raises(MeshError, match=r"--x = 6 .*divisible by the 4"):
    placement.check_batch(6, "--x")


def test_init_state_with_an_optimizer_as_param_axes(fsdp_placement):
  with pytest.raises(MeshError, match="optimizer"):
    fsdp_placement.init_state(
      _init, PARAMS, jax.random.key(0), param_axes=[optax.adam(1e-3)]
    )


@pytest.mark.parametrize(
  "none_axes",
  [{"w": P(None, None), "b": P(None)}, {"w": None, "b": None}],
  ids=["P(None)", "None"],
)
def test_rules_that_shard_no_parameter(fsdp_placement, none_axes):
  with pytest.raises(MeshError, match="param_axes") as e:
    fsdp_placement.init_state(
      _init, PARAMS, jax.random.key(0), param_axes=[none_axes]
    )
  assert "rules fsdp" in str(e.value)


def test_init_state_shards_params_and_adam_moments(fsdp_placement):
  # The control case of the two above: named axes shard over 'fsdp'.
  state, shardings = fsdp_placement.init_state(
    _init, PARAMS, jax.random.key(0), param_axes=[AXES]
  )
  assert shardings.params["w"].spec == P("fsdp", None)
  assert shardings.opt_state[0].mu["b"].spec == P("fsdp")
  assert shardings.step.spec == P()
  np.testing.assert_array_equal(np.asarray(state.params["w"]), 1.0)


def test_batch_not_divisible(fsdp_placement):
  with pytest.raises(MeshError, match="batch size = 6 .*divisible by the 8"):
    fsdp_placement.batch({"x": np.zeros((6, 3))})
  x = np.arange(24).reshape(8, 3)
  got = fsdp_placement.batch({"x": x})["x"]
  assert got.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(got), x)


def test_cli_mesh_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", "off")  # keep the tests' cache
  run_dir = tmp_path / "run"
  args = ["rm", "--preset", "smoke", "--mesh.data", "3"]
  assert main([*args, "--run-dir", str(run_dir)]) == 2
  out, err = capsys.readouterr()
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("rlhf-jax: error: --mesh.data 3 "), err
  assert "8 devices" in err
  assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("address", ["localhost:99999", "localhost:0", "h:x"])
def test_coordinator_address_needs_a_port_in_range(address):
  """Port 99999 passed the digits check and every process then hung
  waiting for a coordinator that could not exist."""
  from rlhf_jax.runner.mesh import DistributedConfig, start_distributed

  with pytest.raises(MeshError) as e:
    start_distributed(DistributedConfig(address, 2, 1))
  assert str(e.value) == (
    f"--distributed.coordinator-address {address!r}: expected HOST:PORT "
    "with a port in 1..65535 (e.g. 127.0.0.1:12345)"
  )


def test_batch_padded_otherwise_is_refused_before_placing(fsdp_placement):
  """A right-padded prompt would give wrong logprobs without an error
  inside the step (it predicts the first response token from the prompt's
  last slot), so the host batch is checked before it is placed."""
  prompt = np.ones((8, 4), bool)
  prompt[3, 2:] = False  # right-padded
  with pytest.raises(ValueError, match=r"prompt_mask\[3\] is not left-pad"):
    fsdp_placement.batch({"prompt_mask": prompt})
  prompt[3] = [False, False, True, True]
  got = fsdp_placement.batch({"prompt_mask": prompt})["prompt_mask"]
  np.testing.assert_array_equal(np.asarray(got), prompt)


def test_jit_step_extra_must_be_placed(fsdp_placement):
  """Host (numpy) arrays in ``extra`` failed with "'numpy.ndarray' object
  has no attribute 'sharding'"."""
  _, shardings = fsdp_placement.init_state(
    _init, PARAMS, jax.random.key(0), param_axes=[AXES]
  )
  ref = {"w": np.ones((8, 16)), "b": jnp.zeros((16,))}
  with pytest.raises(TypeError, match=r"extra\[0\]\['w'\] is a ndarray with"):
    fsdp_placement.jit_step(lambda s, b, r: (s, {}), shardings, extra=(ref,))
  placed = {"w": jnp.ones((8, 16)), "b": jnp.zeros((16,))}
  fsdp_placement.jit_step(lambda s, b, r: (s, {}), shardings, extra=(placed,))
  # Abstract ones with their shardings, as the background compile passes.
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    placed,
  )
  fsdp_placement.jit_step(lambda s, b, r: (s, {}), shardings, extra=(abstract,))
