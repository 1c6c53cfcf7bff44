"""Device mesh, the logical-axis rule table, and sharded state initialisation.

Model code names only logical axes (`batch`, `embed`, `mlp`, ...); this module owns the single
table that maps them onto the mesh axes `data` and `model`, as t5x's `partitioning.py` does.
The mesh spans every process's devices, so the same code runs on one CPU, an 8-device simulated
mesh and a multi-host TPU pod.
"""

from collections.abc import Sequence
import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DATA_AXIS = "data"
MODEL_AXIS = "model"


def standard_logical_axis_rules() -> tuple[tuple[str, str | None], ...]:
  """The rule table: data parallelism on `batch`, model parallelism (Megatron-style) on
  `vocab`, `mlp`, `heads` and the codebook; everything else replicated."""
  return (
      ("batch", DATA_AXIS),
      ("vocab", MODEL_AXIS),
      ("mlp", MODEL_AXIS),
      ("heads", MODEL_AXIS),
      ("joined_kv", MODEL_AXIS),
      ("codebook", MODEL_AXIS),
      ("embed", None),
      ("kv", None),
      ("length", None),
      ("relpos_buckets", None),
      ("code_pos", None),
  )


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """Builds the (`data`, `model`) mesh and shards state and batches over it.

  Attributes:
    num_partitions: devices per model replica (the size of the `model` axis), as in t5x.
      The `data` axis takes the rest of `jax.devices()`.
    logical_axis_rules: logical axis name -> mesh axis (or None for replicated).
    num_devices: use the first `num_devices` devices (all by default; tests compare meshes).
  """

  num_partitions: int = 1
  logical_axis_rules: LogicalRules = standard_logical_axis_rules()
  num_devices: int | None = None

  def __post_init__(self):
    n = self.num_devices or jax.device_count()
    if self.num_partitions < 1 or n % self.num_partitions:
      raise ValueError(
          f"num_partitions ({self.num_partitions}) must divide the device count ({n})."
      )

  @functools.cached_property
  def mesh(self) -> Mesh:
    n = self.num_devices or jax.device_count()
    # jax.make_mesh orders devices for the physical topology (TPU ICI rings, hosts). Auto axes:
    # the compiler propagates shardings from the constraints, as pjit did for t5x.
    return jax.make_mesh(
        (n // self.num_partitions, self.num_partitions),
        (DATA_AXIS, MODEL_AXIS),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[:n],
    )

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape[DATA_AXIS]

  @contextlib.contextmanager
  def activate(self):
    """Mesh and rule context for tracing: `with_logical_constraint` resolves inside it."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
      yield

  def sharding(self, logical_spec: PartitionSpec) -> NamedSharding:
    """The mesh sharding of one logical PartitionSpec, e.g. P('batch', 'length')."""
    return nn.logical_to_mesh_sharding(logical_spec, self.mesh, self.logical_axis_rules)

  def shardings(self, logical_specs: Any) -> Any:
    """Maps a tree of logical PartitionSpecs to NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.logical_axis_rules)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    """Batches are split over `data` along their leading axis."""
    return self.sharding(PartitionSpec("batch", *([None] * (ndim - 1))))

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles a global batch from this process's shard (the whole batch on one host)."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding(v.ndim), v)
        for k, v in local_batch.items()
    }


def optimizer_state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """Shards each parameter-shaped optimizer leaf (Adam moments, ...) like its parameter.

  Leaves that are not parameter-shaped (step counts, hyperparameters, Adafactor's factored
  row/column statistics) are replicated.
  """
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
      tx,
      lambda leaf, param, sharding: sharding if leaf.shape == param.shape else replicated,
      abstract_state,
      abstract_params,
      param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding),
  )
