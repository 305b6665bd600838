"""vision/resnet.py and vision/vit.py written plainly in PyTorch: reference for tests, benchmark peer.

Configured by the same `ResNetConfig` / `ViTConfig`. Written the usual PyTorch way (torchvision's
ResNet v1.5 and VisionTransformer): NCHW images, BatchNorm2d(momentum=0.1, eps=1e-5) or
GroupNorm, nn.MultiheadAttention. Float32 unless the caller casts it.

    model = torch_resnet(cfg, channels=1)        # or torch_vit(cfg, channels=3)
    load_flax_resnet(model, variables)           # {"params", "batch_stats"}, boxed or not
    load_flax_vit(model, params)                 # scanned or per-layer blocks
    logits_BK = model(images_BCHW)               # model.eval(): running statistics
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# -------------------------------------------------------------------------------------------
# ResNet
# -------------------------------------------------------------------------------------------


def _norm(cfg, channels: int) -> nn.Module:
    if cfg.norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-5)
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def _conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class TorchBlock(nn.Module):
    """Basic (two 3x3) or v1.5 bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block."""

    def __init__(self, cfg, c_in: int, channels: int, stride: int):
        super().__init__()
        self.bottleneck = cfg.block == "bottleneck"
        c_out = 4 * channels if self.bottleneck else channels
        if self.bottleneck:
            self.conv1, self.norm1 = _conv(c_in, channels, 1, 1), _norm(cfg, channels)
            self.conv2, self.norm2 = _conv(channels, channels, 3, stride), _norm(cfg, channels)
            self.conv3, self.norm3 = _conv(channels, c_out, 1, 1), _norm(cfg, c_out)
        else:
            self.conv1, self.norm1 = _conv(c_in, channels, 3, stride), _norm(cfg, channels)
            self.conv2, self.norm2 = _conv(channels, channels, 3, 1), _norm(cfg, channels)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(_conv(c_in, c_out, 1, stride), _norm(cfg, c_out))
        if cfg.zero_init_residual:
            nn.init.zeros_((self.norm3 if self.bottleneck else self.norm2).weight)

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        if self.bottleneck:
            y = F.relu(self.norm2(self.conv2(y)))
            y = self.norm3(self.conv3(y))
        else:
            y = self.norm2(self.conv2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class TorchResNet(nn.Module):

    def __init__(self, cfg, channels: int = 3):
        super().__init__()
        self.cfg = cfg
        imagenet = cfg.stem == "imagenet"
        self.stem_conv = _conv(channels, cfg.width, 7 if imagenet else 3, 2 if imagenet else 1)
        self.stem_norm = _norm(cfg, cfg.width)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
        self.blocks = nn.ModuleDict()
        c_in = cfg.width
        for i, n in enumerate(cfg.stage_sizes):
            for j in range(n):
                block = TorchBlock(cfg, c_in, cfg.width * 2 ** i, 2 if i > 0 and j == 0 else 1)
                self.blocks[f"stage{i}_block{j}"] = block
                c_in = cfg.width * 2 ** i * cfg.expansion
        self.head = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():  # torchvision's init (zero_init_residual done in the blocks)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images_BCHW, features: bool = False, feature_map: bool = False):
        x = self.pool(F.relu(self.stem_norm(self.stem_conv(images_BCHW))))
        for block in self.blocks.values():
            x = block(x)
        if feature_map:
            return x
        pooled_BD = x.mean(dim=(2, 3))
        return pooled_BD if features else self.head(pooled_BD)


def torch_resnet(cfg, channels: int = 3) -> TorchResNet:
    """The PyTorch twin of vision.resnet.ResNet(cfg) for `channels`-channel images."""
    return TorchResNet(cfg, channels)


# -------------------------------------------------------------------------------------------
# ViT
# -------------------------------------------------------------------------------------------


class TorchViTBlock(nn.Module):
    """Pre-norm encoder block: x + attn(ln(x)), then x + mlp(ln(x)), as torchvision's."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.attn_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = nn.MultiheadAttention(D, cfg.num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.up, self.down = nn.Linear(D, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, D)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop(self.down(F.gelu(self.up(self.mlp_norm(x)))))


class TorchViT(nn.Module):

    def __init__(self, cfg, channels: int = 3):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.hybrid = None
        if cfg.hybrid is not None:
            self.hybrid = TorchResNet(cfg.hybrid, channels)
            channels = cfg.hybrid.feature_dim
        self.patch_embed = nn.Conv2d(channels, D, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, D) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TorchViTBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images_BCHW, features: bool = False, tokens: bool = False):
        x = images_BCHW
        if self.hybrid is not None:
            x = self.hybrid(x, feature_map=True)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patches
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if tokens:
            return x
        pooled_BD = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return pooled_BD if features else self.head(pooled_BD)


def torch_vit(cfg, channels: int = 3) -> TorchViT:
    """The PyTorch twin of vision.vit.ViT(cfg) for `channels`-channel images."""
    return TorchViT(cfg, channels)


# -------------------------------------------------------------------------------------------
# Weight copy: Flax -> PyTorch
# -------------------------------------------------------------------------------------------


def _unboxed(variables) -> dict:
    import flax.linen as flax_nn
    return flax_nn.meta.unbox(variables)


def _put(dst: torch.Tensor, src) -> None:
    src = torch.from_numpy(np.array(src, dtype=np.float32))  # a writable, contiguous copy
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: torch {tuple(dst.shape)} vs flax {tuple(src.shape)}")
    dst.copy_(src)


def _put_conv(conv: nn.Conv2d, p: dict) -> None:
    _put(conv.weight, np.asarray(p["kernel"]).transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if conv.bias is not None:
        _put(conv.bias, p["bias"])


def _put_norm(norm: nn.Module, params: dict, stats: dict | None) -> None:
    if isinstance(norm, nn.GroupNorm):
        params = params["group_norm"]
    _put(norm.weight, params["scale"])
    _put(norm.bias, params["bias"])
    if isinstance(norm, nn.BatchNorm2d):
        _put(norm.running_mean, stats["mean"])
        _put(norm.running_var, stats["var"])


@torch.no_grad()
def load_flax_resnet(model: TorchResNet, variables: dict) -> TorchResNet:
    """Copies vision.resnet.ResNet variables ({"params", "batch_stats"}) into `model`."""
    variables = _unboxed(variables)
    params, stats = variables["params"], variables.get("batch_stats", {})
    _put_conv(model.stem_conv, params["stem_conv"])
    _put_norm(model.stem_norm, params["stem_norm"], stats.get("stem_norm"))
    for name, block in model.blocks.items():
        p, s = params[name], stats.get(name, {})
        for k in (1, 2, 3) if block.bottleneck else (1, 2):
            _put_conv(getattr(block, f"conv{k}"), p[f"conv{k}"])
            _put_norm(getattr(block, f"norm{k}"), p[f"norm{k}"], s.get(f"norm{k}"))
        if block.proj is not None:
            _put_conv(block.proj[0], p["proj_conv"])
            _put_norm(block.proj[1], p["proj_norm"], s.get("proj_norm"))
    if "head" in params:
        _put(model.head.weight, np.asarray(params["head"]["kernel"]).T)
        _put(model.head.bias, params["head"]["bias"])
    return model


@torch.no_grad()
def load_flax_vit(model: TorchViT, variables: dict) -> TorchViT:
    """Copies vision.vit.ViT params (or {"params", "batch_stats"} of a BatchNorm hybrid)."""
    variables = _unboxed(variables)
    params = variables["params"] if "params" in variables else variables
    cfg = model.cfg
    D = cfg.d_model
    if model.hybrid is not None:
        load_flax_resnet(model.hybrid, {"params": params["hybrid"],
                                        "batch_stats": variables.get("batch_stats", {}).get(
                                            "hybrid", {})})
    _put_conv(model.patch_embed, params["patch_embed"])
    if model.cls_token is not None:
        _put(model.cls_token, params["cls_token"])
    _put(model.pos_embed, np.asarray(params["pos_embed"])[None])
    _put(model.final_norm.weight, params["final_norm"]["scale"])
    _put(model.final_norm.bias, params["final_norm"]["bias"])
    _put(model.head.weight, np.asarray(params["head"]["kernel"]).T)
    _put(model.head.bias, params["head"]["bias"])

    as_np = lambda tree: {m: {k: np.asarray(v) for k, v in sub.items()} for m, sub in tree.items()}
    stacked = as_np(params["layers"]) if "layers" in params else None
    for i, block in enumerate(model.blocks):
        if stacked is not None:
            p = {m: {k: v[i] for k, v in sub.items()} for m, sub in stacked.items()}
        else:
            p = as_np(params[f"layers_{i}"])
        for norm, name in ((block.attn_norm, "attn_norm"), (block.mlp_norm, "mlp_norm")):
            _put(norm.weight, p[name]["scale"])
            _put(norm.bias, p[name]["bias"])
        a = p["attn"]
        _put(block.attn.in_proj_weight,
             np.concatenate([a[w].reshape(D, D) for w in ("w_q", "w_k", "w_v")], 1).T)
        _put(block.attn.in_proj_bias, np.concatenate([a[b].ravel() for b in ("b_q", "b_k",
                                                                            "b_v")]))
        _put(block.attn.out_proj.weight, a["w_o"].reshape(D, D).T)
        _put(block.attn.out_proj.bias, a["b_o"])
        m = p["mlp"]
        _put(block.up.weight, m["w_up"].T)
        _put(block.up.bias, m["b_up"])
        _put(block.down.weight, m["w_down"].T)
        _put(block.down.bias, m["b_down"])
    return model
