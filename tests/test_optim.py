"""AdamW's weight decay reaches weight matrices and embeddings only."""
import jax

from core.optim import _decay_mask
from lm import model as model_lib


def test_decay_mask_spares_every_bias_and_norm():
    cfg = model_lib.preset("gpt2", vocab_size=64, num_layers=1, d_model=16, num_heads=2,
                           max_len=8)
    params = jax.eval_shape(model_lib.Decoder(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8), "int32"))["params"]
    mask = {jax.tree_util.keystr(path): decays for path, decays in
            jax.tree_util.tree_leaves_with_path(_decay_mask(params))}
    spared = sorted(name for name, decays in mask.items() if not decays)
    decayed = sorted(name for name, decays in mask.items() if decays)
    assert any("b_q" in n for n in spared) and any("b_down" in n for n in spared)
    assert all("norm" in n or "'b_" in n for n in spared), spared
    assert all("'w_" in n or "embed" in n for n in decayed), decayed
    assert any("token_embed" in n for n in decayed) and any("w_up" in n for n in decayed)
