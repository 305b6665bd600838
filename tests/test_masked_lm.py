"""The masked-LM objectives (BERT/RoBERTa token masking, SpanBERT spans) on the shared engine."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET, REPO, train_losses
from core.config import ConfigError, load_config
from lm import pipeline
from lm.objectives import masking
from lm.objectives import registry

BERT = str(REPO / "experiments/configs/lm/bert.py")


def test_mean_span_length_is_spanberts_3_8():
    assert abs(masking.mean_span_length(0.2, 10) - 3.8) < 0.01
    lengths = np.asarray(masking.span_lengths(jax.random.key(0), (200_000,), 0.2, 10))
    assert lengths.min() == 1 and lengths.max() == 10
    assert abs(lengths.mean() - masking.mean_span_length(0.2, 10)) < 0.02


@pytest.mark.parametrize("span_p", [0.0, 0.2])
def test_masking_covers_15_percent_of_real_tokens_only(span_p):
    real_BT = jnp.arange(512)[None] < jnp.array([[512], [300], [0], [400]] * 16)
    chosen = np.asarray(masking.choose_positions(jax.random.key(1), real_BT, 0.15, span_p))
    real = np.asarray(real_BT)
    assert not (chosen & ~real).any()  # never padding
    fraction = chosen.sum() / real.sum()
    # Overlapping spans cover a little less than their starts promise.
    assert 0.13 < fraction < 0.16, fraction
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], chosen[0], [0]]))))[::2]
    if span_p:
        assert runs.mean() > 3.0  # contiguous spans
    else:
        assert runs.mean() < 1.3  # independent tokens


def test_corruption_is_80_10_10():
    tokens = jnp.full((256, 256), 7, jnp.int32)
    chosen = jnp.ones_like(tokens, bool).at[:, ::2].set(False)
    out = np.asarray(masking.corrupt(jax.random.key(2), tokens, chosen, 999, 500))
    picked = out[:, 1::2]
    assert (out[:, ::2] == 7).all()  # unchosen tokens are never touched
    assert abs((picked == 999).mean() - 0.8) < 0.01
    assert abs(((picked != 999) & (picked != 7)).mean() - 0.1) < 0.01  # random (rarely 7)
    assert abs((picked == 7).mean() - 0.1) < 0.01
    assert picked.max() <= 999 and ((picked < 500) | (picked == 999)).all()


def _train_mlm(workdir, *overrides):
    from core import trainer
    config = load_config(BERT + ":size=tiny,corpus=austen,objective=spanbert",
                         [*QUIET, "--config.train.steps=30", "--config.train.checkpoint_every=100",
                          *overrides])
    setup = pipeline.build(config, workdir)
    assert isinstance(setup.task, masking.MaskedLMTask)
    assert setup.task.mask_id == setup.tokenizer.vocab_size  # one id past the vocabulary
    return trainer.train(config, workdir, setup.task, setup.data)


def test_spanbert_loss_falls_and_a_2x2x2_mesh_matches_one_device(tmp_path):
    _train_mlm(tmp_path / "one", "--config.mesh.num_devices=1", "--config.mesh.ici.data=1")
    _train_mlm(tmp_path / "mesh", "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2",
               "--config.mesh.ici.tensor=2")
    one, mesh = train_losses(tmp_path / "one"), train_losses(tmp_path / "mesh")
    np.testing.assert_allclose([mesh[s] for s in sorted(mesh)], [one[s] for s in sorted(one)],
                               rtol=2e-5)
    early, late = np.mean([one[s] for s in range(1, 6)]), np.mean([one[s] for s in range(26, 31)])
    assert late < early - 0.3, (early, late)


def test_bad_masked_lm_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="objective"):
        load_config(BERT + ":objective=electra", [])
    with pytest.raises(ConfigError, match="positions 'absolute' is not one of"):
        load_config(BERT + ":positions=absolute", [])
    # Rotary by default (learned positions stall on the unigram plateau; bert.py's docstring).
    assert load_config(BERT + ":size=tiny", []).model.pos_emb == "rope"
    assert load_config(BERT + ":size=tiny,positions=learned", []).model.pos_emb == "learned"
    config = load_config(BERT + ":size=tiny", ["--config.model.causal=true"])
    with pytest.raises(ValueError, match="causal=False"):
        registry.make_task(config, 512)
    config = load_config(BERT + ":size=tiny", ["--config.masking.rate=1.5"])
    with pytest.raises(ValueError, match="rate"):
        registry.make_task(config, 512)
