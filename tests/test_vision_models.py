"""vision/resnet.py and vision/vit.py: published parameter counts, equality with a PyTorch twin
(benchmarks/torch_vision.py) with the same weights, BatchNorm's two modes, pooling, hybrids and
config errors."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import torch_vision
from vision import resnet, vit
from vision.resnet import ResNet, ResNetConfig
from vision.vit import ViT, ViTConfig

TOL = 1e-4


def randomized(variables, seed: int):
    """The variables with every parameter moved off its init (zero-initialised heads and norm
    scales would hide wiring mistakes) and running statistics set to non-trivial values."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(variables))
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        keys = [getattr(k, "key", None) for k in path]
        shape = leaf.shape
        if keys[-1] == "var":
            new = rng.uniform(0.5, 1.5, shape)
        elif keys[-1] in ("mean", "bias"):
            new = 0.1 * rng.standard_normal(shape)
        elif keys[-1] == "scale":
            new = rng.uniform(0.5, 1.5, shape)
        else:  # kernels and embeddings: normal with variance 1 / fan-in
            one = shape[1:] if "layers" in keys else shape  # scanned: a leading layer axis
            fan_in = int(np.prod(one[:-1])) if len(one) > 1 else 1
            if keys[-1] in ("w_q", "w_k", "w_v"):  # (D, heads, H)
                fan_in = one[0]
            new = rng.standard_normal(shape) / np.sqrt(fan_in)
        out.append(jnp.asarray(new, jnp.float32))
    return jax.tree_util.tree_unflatten(tree, out)


def random_variables(module, *args, seed: int):
    """Variables of `module` filled by `randomized`, without running its initialisers: random
    initialisers cost ~0.3 s of XLA compile each on CPU, and these tests overwrite them anyway."""
    return randomized(jax.eval_shape(lambda key: module.init(key, *args), jax.random.key(0)), seed)


def to_torch(images_BHWC) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images_BHWC, np.float32).transpose(0, 3, 1, 2).copy())


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------------------------------
# Parameter counts (torchvision's published models; params only, not BatchNorm statistics)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                           ("resnet50", 25_557_032)])
def test_resnet_param_counts_equal_torchvision(name, expected):
    assert resnet.num_params(resnet.preset(name), (224, 224, 3)) == expected


def test_vit_b16_param_count_equals_torchvision():
    assert vit.num_params(vit.preset("vit_b16"), channels=3) == 86_567_656


def test_torch_twins_have_the_same_param_counts():
    cfg = ResNetConfig((1, 2), "bottleneck", width=8, num_classes=7)
    ours = resnet.num_params(cfg, (32, 32, 3))
    assert sum(p.numel() for p in torch_vision.torch_resnet(cfg, 3).parameters()) == ours
    vcfg = ViTConfig(image_size=16, patch=4, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                     num_classes=7)
    ours = vit.num_params(vcfg, channels=2)
    assert sum(p.numel() for p in torch_vision.torch_vit(vcfg, 2).parameters()) == ours


# ------------------------------------------------------------------------------------------
# ResNet against PyTorch
# ------------------------------------------------------------------------------------------

RESNETS = {
    "basic-small": (ResNetConfig((1, 1), "basic", width=8, num_classes=5, stem="small"),
                    (8, 8, 1)),
    "bottleneck-imagenet": (ResNetConfig((1, 2), "bottleneck", width=4, num_classes=5),
                            (32, 32, 3)),
    "basic-group": (ResNetConfig((1, 1), "basic", width=8, num_classes=5, stem="small",
                                 norm="group"), (8, 8, 2)),
}


def _torch_norm_paths(model):
    """{torch BatchNorm module: its path in the flax batch_stats tree}."""
    paths = {model.stem_norm: ("stem_norm",)}
    for name, block in model.blocks.items():
        for k in (1, 2, 3):
            if hasattr(block, f"norm{k}"):
                paths[getattr(block, f"norm{k}")] = (name, f"norm{k}")
        if block.proj is not None:
            paths[block.proj[1]] = (name, "proj_norm")
    return paths


@pytest.mark.parametrize("case", sorted(RESNETS))
def test_resnet_matches_torch_in_eval_and_train(case):
    cfg, shape = RESNETS[case]
    x = images((4, *shape))
    variables = random_variables(ResNet(cfg), x, False, seed=1)
    model = torch_vision.load_flax_resnet(torch_vision.torch_resnet(cfg, shape[-1]), variables)

    model.eval()
    with torch.no_grad():
        want_logits, want_pooled = model(to_torch(x)), model(to_torch(x), features=True)
    logits = ResNet(cfg).apply(variables, x, False)
    pooled = ResNet(cfg).apply(variables, x, False, features=True)
    assert logits.shape == (4, 5) and pooled.shape == (4, cfg.feature_dim)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(pooled, want_pooled.numpy(), atol=TOL, rtol=TOL)

    # Train mode: batch statistics in the forward pass, running statistics updated.
    model.train()
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, args[0]))
             for m in _torch_norm_paths(model)]
    with torch.no_grad():
        want_logits = model(to_torch(x))
    for h in hooks:
        h.remove()
    logits, updates = ResNet(cfg).apply(variables, x, True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=TOL, rtol=TOL)
    if cfg.norm == "group":
        assert not updates.get("batch_stats")
        return
    assert len(inputs) == len(jax.tree.leaves(variables["batch_stats"])) // 2
    for module, path in _torch_norm_paths(model).items():
        batch_BCHW = inputs[module].double().numpy()
        mean_C, var_C = batch_BCHW.mean(axis=(0, 2, 3)), batch_BCHW.var(axis=(0, 2, 3))
        old, new = variables["batch_stats"], updates["batch_stats"]
        for p in path:
            old, new = old[p], new[p]
        np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean_C,
                                   atol=TOL, rtol=TOL)
        np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var_C, atol=TOL, rtol=TOL)


def test_batchnorm_eval_is_per_example_and_train_is_not():
    cfg, shape = RESNETS["basic-small"]
    x = images((6, *shape), seed=3)
    variables = random_variables(ResNet(cfg), x, False, seed=2)
    batch = ResNet(cfg).apply(variables, x, False)
    alone = ResNet(cfg).apply(variables, x[:1], False)
    np.testing.assert_allclose(batch[:1], alone, atol=1e-5, rtol=1e-5)
    train_batch, _ = ResNet(cfg).apply(variables, x, True, mutable=["batch_stats"])
    train_half, _ = ResNet(cfg).apply(variables, x[:3], True, mutable=["batch_stats"])
    assert np.abs(np.asarray(train_batch[:3]) - np.asarray(train_half)).max() > 1e-3


def test_zero_init_residual_zeroes_the_last_norm_of_each_branch():
    for zero in (True, False):
        cfg = ResNetConfig((1,), "bottleneck", width=4, stem="small", zero_init_residual=zero)
        params = nn.meta.unbox(resnet.init_variables(cfg, jax.random.key(0), (4, 4, 1))["params"])
        block = params["stage0_block0"]
        np.testing.assert_array_equal(block["norm3"]["scale"], 0.0 if zero else 1.0)
        np.testing.assert_array_equal(block["norm2"]["scale"], 1.0)
        np.testing.assert_array_equal(block["proj_norm"]["scale"], 1.0)


def test_parameters_carry_logical_axis_names():
    cfg, shape = RESNETS["bottleneck-imagenet"]
    params = resnet.param_shapes(cfg, shape)["params"]
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == len(leaf.value.shape)
    assert params["stem_conv"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert params["stage1_block0"]["norm2"]["scale"].names == ("conv_out",)
    assert params["head"]["kernel"].names == ("embed", "classes")
    vparams = vit.param_shapes(vit.preset("vit_fmnist"), 1)["params"]
    assert vparams["patch_embed"]["kernel"].names == (None, None, "conv_in", "embed")
    assert vparams["layers"]["attn"]["w_q"].names == ("layers", "embed", "heads", "head_dim")
    assert vparams["head"]["kernel"].names == ("embed", "classes")


# ------------------------------------------------------------------------------------------
# ViT against PyTorch
# ------------------------------------------------------------------------------------------

SMALL_VIT = ViTConfig(image_size=(8, 12), patch=2, num_layers=2, d_model=16, num_heads=4,
                      mlp_dim=32, num_classes=5, scan_layers=False)
HYBRID_STEM = ResNetConfig((1, 1), "basic", width=4, stem="small", norm="group")
VITS = {
    "cls-scanned": dataclasses.replace(SMALL_VIT, scan_layers=True),
    "mean": dataclasses.replace(SMALL_VIT, pool="mean"),
    "hybrid-group": dataclasses.replace(SMALL_VIT, image_size=(16, 16), patch=1,
                                        hybrid=HYBRID_STEM),
    "hybrid-batch": dataclasses.replace(SMALL_VIT, image_size=(16, 16), patch=2, pool="mean",
                                        hybrid=dataclasses.replace(HYBRID_STEM, norm="batch")),
}


def vit_outputs(cfg, variables, x, train=False, rngs=None):
    """Logits, pooled features and tokens of one ViT, each through its own entry point."""
    model = ViT(cfg)
    return {"logits": model.apply(variables, x, train, rngs=rngs),
            "features": model.apply(variables, x, train, features=True, rngs=rngs),
            "tokens": model.apply(variables, x, train, method="tokens", rngs=rngs)}


@pytest.mark.parametrize("case", sorted(VITS))
def test_vit_matches_torch(case):
    cfg = VITS[case]
    x = images((3, *cfg.image_size, 2), seed=4)
    variables = random_variables(ViT(cfg), x, False, seed=5)
    model = torch_vision.load_flax_vit(torch_vision.torch_vit(cfg, 2), variables).eval()
    with torch.no_grad():
        want = {kind: model(to_torch(x), **{kind: True}).numpy() for kind in ("features",
                                                                             "tokens")}
        want["logits"] = model(to_torch(x)).numpy()
    got = jax.jit(lambda v, x: vit_outputs(cfg, v, x))(variables, x)
    assert got["tokens"].shape == (3, cfg.num_tokens, cfg.d_model)
    assert got["features"].shape == (3, cfg.d_model) and got["logits"].shape == (3, 5)
    for kind in got:
        np.testing.assert_allclose(got[kind], want[kind], atol=TOL, rtol=TOL, err_msg=kind)


def test_vit_pooling_and_hybrid_shapes():
    x = images((2, 8, 12, 3))
    for pool, tokens in (("cls", 4 * 6 + 1), ("mean", 4 * 6)):
        cfg = dataclasses.replace(SMALL_VIT, pool=pool)
        params = vit.param_shapes(cfg, 3)["params"]
        assert cfg.num_tokens == tokens and params["pos_embed"].value.shape == (tokens, 16)
        assert ("cls_token" in params) == (pool == "cls")
        out = jax.jit(lambda v, x: vit_outputs(cfg, v, x))(
            random_variables(ViT(cfg), x, False, seed=7), x)
        assert out["tokens"].shape == (2, tokens, 16)
        np.testing.assert_allclose(out["features"], out["tokens"][:, 0] if pool == "cls"
                                   else out["tokens"].mean(1), atol=1e-6)
    # Hybrid: an ImageNet stem (/4) and 2 stages (/2) -> 32/8 = 4x4 map, patch 1 -> 16 tokens.
    cfg = ViTConfig(image_size=32, patch=1, num_layers=1, d_model=16, num_heads=2, mlp_dim=16,
                    num_classes=3, pool="mean",
                    hybrid=ResNetConfig((1, 1), "bottleneck", width=4, norm="group"))
    assert cfg.grid == (4, 4) and cfg.num_tokens == 16
    params = vit.param_shapes(cfg, 3)["params"]
    assert params["patch_embed"]["kernel"].value.shape == (1, 1, 32, 16)  # 4 * 2 * width 4
    assert "head" not in params["hybrid"]
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    out = jax.eval_shape(lambda p, x: ViT(cfg).apply({"params": p}, x, False, method="tokens"),
                         params, x)
    assert out.shape == (2, 16, 16)


def test_vit_dropout_only_in_train_mode():
    cfg = dataclasses.replace(SMALL_VIT, dropout=0.5)
    x = images((2, 8, 12, 1))
    variables = random_variables(ViT(cfg), x, False, seed=6)
    apply = jax.jit(lambda key, train: ViT(cfg).apply(variables, x, train,
                                                      rngs={"dropout": key}),
                    static_argnums=1)
    a, b = apply(jax.random.key(1), True), apply(jax.random.key(2), True)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_array_equal(apply(jax.random.key(1), False), apply(jax.random.key(2), False))


# ------------------------------------------------------------------------------------------
# Config errors name the bad field
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,field", [
    (lambda: ResNetConfig(()), "stage_sizes"),
    (lambda: ResNetConfig((2, 0)), "stage_sizes"),
    (lambda: ResNetConfig((2,), block="wide"), "block"),
    (lambda: ResNetConfig((2,), stem="cifar"), "stem"),
    (lambda: ResNetConfig((2,), norm="layer"), "norm"),
    (lambda: ResNetConfig((2,), width=0), "width"),
    (lambda: ResNetConfig((2,), num_classes=-1), "num_classes"),
    (lambda: ResNetConfig((2,), dtype="int8"), "dtype"),
    (lambda: resnet.preset("resnet19"), "resnet19"),
    (lambda: ViTConfig(image_size=28, patch=5), "patch=5"),
    (lambda: ViTConfig(image_size=(28, 28, 1)), "image_size"),
    (lambda: ViTConfig(pool="max"), "pool"),
    (lambda: ViTConfig(d_model=130, num_heads=4), "num_heads"),
    (lambda: ViTConfig(dropout=1.5), "dropout"),
    (lambda: ViTConfig(image_size=28, patch=2, hybrid=ResNetConfig((1,))), "stride 4"),
    (lambda: vit.preset("vit_b32"), "vit_b32"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_wrong_image_size_is_a_clear_error():
    cfg = vit.preset("vit_fmnist", num_layers=1)
    with pytest.raises(ValueError, match=r"\(B, 28, 28, C\)"):
        jax.eval_shape(lambda key: ViT(cfg).init(key, jnp.zeros((1, 32, 32, 1)), False),
                       jax.random.key(0))
    with pytest.raises(ValueError, match="hybrid.norm='group'"):
        jax.eval_shape(lambda key: vit.init_params(VITS["hybrid-batch"], key, 2),
                       jax.random.key(0))
