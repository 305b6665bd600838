"""What an image classifier's evaluation shows a person: a grid of test images with predicted
(and, where wrong, true) labels, and the confusion matrix; both as PNG, the matrix also as JSON."""
from __future__ import annotations

import json
import pathlib

import numpy as np


def confusion_matrix(labels_N: np.ndarray, predictions_N: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels_N, predictions_N), 1)
    return counts


def save_prediction_grid(images_NHWC: np.ndarray, labels_N: np.ndarray, predictions_N: np.ndarray,
                         class_names, path: pathlib.Path, columns: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = -(-len(images_NHWC) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 1.75))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, label, predicted in zip(np.ravel(axes), images_NHWC, labels_N, predictions_N):
        gray = image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=255)
        right = label == predicted
        title = class_names[predicted] if right else f"{class_names[predicted]}\n({class_names[label]})"
        ax.set_title(title, fontsize=7, color="black" if right else "red")
    fig.suptitle("predicted label (true label in red where wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_confusion(counts: np.ndarray, class_names, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 0.8 + 0.55 * k))
    ax.imshow(counts, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"confusion matrix: {counts.sum()} test images, accuracy {accuracy:.2%}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: pathlib.Path, images_NHWC, labels_N, predictions_N, class_names,
                 grid_size: int = 32) -> dict:
    """Writes predictions.png, confusion.png and confusion.json under `out`; returns the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    counts = confusion_matrix(labels_N, predictions_N, len(class_names))
    save_prediction_grid(images_NHWC[:grid_size], labels_N[:grid_size], predictions_N[:grid_size],
                         class_names, out / "predictions.png")
    save_confusion(counts, class_names, out / "confusion.png")
    per_class = np.diag(counts) / np.maximum(counts.sum(1), 1)
    result = {"accuracy": float(np.trace(counts) / max(counts.sum(), 1)),
              "per_class_accuracy": dict(zip(class_names, map(float, per_class))),
              "confusion": counts.tolist(), "class_names": list(class_names)}
    (out / "confusion.json").write_text(json.dumps(result, indent=1))
    return result
