"""Data parallelism: placement on devices, data-parallel train steps, one-bit exchange, HLO bytes.

Data parallelism (CSE 176 Lecture 11): "split minibatch into chunks & distribute to GPUs/nodes": D devices
hold the same parameters, each takes the gradient of its chunk's mean loss, and the mean of
the D gradients is the gradient of the global batch, so D devices take the step one device
would take on it. One module per concept:

* `jaxdl.parallel.placement`: devices and where state and batches live -- the pmap layout
  (`replicate`, `unreplicate`, `shard_batch`) and the mesh layout (`data_mesh`, `put_state`,
  `put_batch`, `state_specs`, `PerDevice`), replicated or fully sharded (`fsdp_shardings`);
* `jaxdl.parallel.steps`: `make_pmap_train_step`, `make_sharded_train_step` and the scan-fused
  `make_sharded_train_loop`, all around `jaxdl.train_step.step_body`;
* `jaxdl.parallel.onebit`: `onebit_allreduce` (one bit per gradient element) and its packing;
* `jaxdl.parallel.hlo`: `collective_bytes`, read off a compiled program.

The mesh axis name is also the axis name of the collectives: a model's `BatchNorm` must be built
with ``axis_name`` equal to it (default ``"batch"`` everywhere) to normalize over the global batch.
"""

from jaxdl.parallel.hlo import collective_bytes
from jaxdl.parallel.onebit import (
    CrossDeviceTransformation,
    OneBitState,
    onebit_allreduce,
    pack_signs,
    unpack_signs,
)
from jaxdl.parallel.placement import (
    FSDP_MIN_SIZE,
    PerDevice,
    data_mesh,
    fsdp_shardings,
    local_devices,
    put_batch,
    put_state,
    replicate,
    shard_batch,
    state_specs,
    unreplicate,
)
from jaxdl.parallel.steps import (
    make_pmap_train_step,
    make_sharded_train_loop,
    make_sharded_train_step,
)

__all__ = [
    "local_devices",
    "replicate",
    "unreplicate",
    "shard_batch",
    "data_mesh",
    "put_state",
    "put_batch",
    "state_specs",
    "fsdp_shardings",
    "FSDP_MIN_SIZE",
    "PerDevice",
    "CrossDeviceTransformation",
    "OneBitState",
    "onebit_allreduce",
    "pack_signs",
    "unpack_signs",
    "collective_bytes",
    "make_pmap_train_step",
    "make_sharded_train_step",
    "make_sharded_train_loop",
]
