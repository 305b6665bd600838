"""The same config on 1 device and on a 2x2x2 data/fsdp/tensor mesh trains to the same losses."""
import jax
import numpy as np
from jax.sharding import NamedSharding

from conftest import tiny_config, train_losses, train_tiny
from core.engine import Engine
from lm import pipeline

STEPS = ["--config.train.steps=5", "--config.train.checkpoint_every=100"]
MESH_222 = ["--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2"]


def test_2x2x2_mesh_matches_one_device(tmp_path):
    train_tiny(tmp_path / "one", *STEPS, "--config.mesh.num_devices=1", "--config.mesh.ici.data=1")
    train_tiny(tmp_path / "mesh", *STEPS, *MESH_222)
    one, mesh = train_losses(tmp_path / "one"), train_losses(tmp_path / "mesh")
    assert sorted(one) == sorted(mesh) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([mesh[s] for s in sorted(mesh)], [one[s] for s in sorted(one)],
                               rtol=2e-5)
    assert one[5] < one[1]  # and it is learning


def test_parameters_and_batches_are_really_sharded(tmp_path):
    config = tiny_config(*MESH_222)
    setup = pipeline.build(config, tmp_path)
    engine = Engine(config, setup.task)
    state = engine.init_state()
    specs = {jax.tree_util.keystr(path): leaf.sharding.spec
             for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    used_axes = {axis for spec in specs.values() for dim in spec if dim
                 for axis in (dim if isinstance(dim, tuple) else (dim,))}
    assert {"fsdp", "tensor"} <= used_axes, specs
    split = [leaf for leaf in jax.tree_util.tree_leaves(state.params)
             if leaf.addressable_shards[0].data.size < leaf.size]
    assert len(split) >= len(jax.tree_util.tree_leaves(state.params)) // 2
    for leaf in split:  # each of the 8 devices holds a piece, never the whole array
        assert isinstance(leaf.sharding, NamedSharding)
        assert len(leaf.addressable_shards) == 8
    # Adam moments follow their parameters' shardings.
    mu = state.opt_state[1][0].mu
    for p, m in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(mu)):
        assert m.sharding.spec == p.sharding.spec
    batch = engine.global_batch(next(setup.data.train))
    assert batch["tokens"].sharding.spec[0] == ("data", "fsdp")
    assert batch["tokens"].addressable_shards[0].data.shape[0] == config.train.global_batch_size // 4


def test_checkpoint_restores_onto_another_mesh_and_training_continues(tmp_path):
    horizon = ["--config.optim.decay_steps=10", "--config.train.checkpoint_every=3"]
    train_tiny(tmp_path / "reference", "--config.train.steps=10", *horizon)
    train_tiny(tmp_path / "moved", "--config.train.steps=6", *horizon)
    train_tiny(tmp_path / "moved", "--config.train.steps=10", *horizon, *MESH_222)
    reference, moved = train_losses(tmp_path / "reference"), train_losses(tmp_path / "moved")
    assert sorted(moved) == list(range(1, 11))  # resumed at 7, not restarted
    np.testing.assert_allclose([moved[s] for s in range(7, 11)],
                               [reference[s] for s in range(7, 11)], rtol=1e-4)
