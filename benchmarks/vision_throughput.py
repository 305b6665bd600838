"""Training throughput (images/s) of our ResNet and ViT against the same models in PyTorch,
measured in one run.

Both sides train the same architecture (benchmarks/torch_vision.py mirrors vision/resnet.py and
vision/vit.py) on the same Fashion-MNIST-shaped batch with the same optimiser (SGD + Nesterov for
the ResNet, AdamW for the ViT, as experiments/configs/vision/classify.py), without augmentation,
alternating rounds so machine noise hits both alike; medians are reported. MFU = XLA-counted
model FLOP/s / peak (the best measured matmul rate on CPU, the datasheet bf16 number on a GPU).

    python -m benchmarks.vision_throughput --model resnet
    python -m benchmarks.vision_throughput --model vit --batch 256
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import train_throughput  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from core.config import load_config  # noqa: E402
from core.optim import build_optimizer  # noqa: E402
from core.step import make_train_step  # noqa: E402
from core.train_state import TrainState  # noqa: E402
from vision import models  # noqa: E402
from vision.classify import ImageClassificationTask  # noqa: E402
from vision.data import DatasetInfo, FASHION_MNIST_CLASSES  # noqa: E402

CONFIG = "experiments/configs/vision/classify.py"
INFO = DatasetInfo("fashion_mnist", (28, 28, 1), 10, FASHION_MNIST_CLASSES, (0.2860,), (0.3530,))


def a_batch(batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (batch, *INFO.image_shape)).astype(np.uint8),
            rng.integers(0, 10, batch).astype(np.int32))


class JaxTrainer(train_throughput.JaxTrainer):
    """The GPT benchmark's timing loop (run) around an image classifier's train step."""

    def __init__(self, config, batch: int):
        task = ImageClassificationTask(models.build_model(config.model, INFO), INFO)
        self.task = task
        optimizer, schedule = build_optimizer(config.optim, 10_000)
        params = jax.jit(lambda r: jax.tree_util.tree_map(
            lambda x: x.unbox() if hasattr(x, "unbox") else x, task.init_params(r),
            is_leaf=lambda x: hasattr(x, "unbox")))(jax.random.key(0))
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params),
                                model_state=task.init_model_state(jax.random.key(1)))
        self.step = jax.jit(make_train_step(task, optimizer, schedule, 1, 0), donate_argnums=0)
        images, labels = a_batch(batch)
        self.batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels),
                      "mask": jnp.ones(batch, jnp.int32)}
        self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))


class TorchTrainer:
    def __init__(self, config, batch: int):
        import torch
        from benchmarks import torch_vision
        self.torch = torch
        cfg = models.model_config(config.model, INFO)
        build = torch_vision.torch_resnet if config.model.kind == "resnet" else torch_vision.torch_vit
        self.model = build(cfg, channels=1).train()
        o = config.optim
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.learning_rate,
                                             momentum=o.momentum, nesterov=o.nesterov,
                                             weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate,
                                               betas=(o.b1, o.b2), eps=o.eps,
                                               weight_decay=o.weight_decay)
        self.clip = o.clip_norm
        images, labels = a_batch(batch)
        mean, std = INFO.mean[0], INFO.std[0]
        self.images = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        self.labels = torch.from_numpy(labels).long()

    def run(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
        loss.item()
        return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("resnet", "vit"), default="resnet")
    parser.add_argument("--size", choices=("default", "preset"), default="default",
                        help="the config's size: default (CPU-sized) or the module's preset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)

    config = load_config(f"{CONFIG}:model={args.model},size={args.size}")
    trainers = {"jax": JaxTrainer(config, args.batch)}
    if args.torch:
        trainers["torch"] = TorchTrainer(config, args.batch)
    times = train_throughput.timed_rounds(trainers, args.rounds, args.steps_per_round)

    flops_per_image = trainers["jax"].task.train_flops_per_example()
    peak, machine = train_throughput.machine_and_peak("float32")
    result = {
        "model": {"kind": args.model, "size": args.size, "params": int(trainers["jax"].num_params),
                  "batch": args.batch, "image": list(INFO.image_shape),
                  "optimizer": config.optim.name},
        "train_flops_per_image": flops_per_image, "flops_source": "3 x XLA cost analysis of the forward",
        **machine,
    }
    for name, samples in times.items():
        result[name] = train_throughput.side_result(samples, args.batch, flops_per_image, peak,
                                                    "images")
    if "torch" in result:
        result["jax_over_torch_speed"] = result["jax"]["images_per_s"] / result["torch"]["images_per_s"]
    return emit(result, args.out)


if __name__ == "__main__":
    main()
