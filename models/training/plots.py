"""Learning-curve plots (PNG, matplotlib's non-interactive Agg backend)."""
from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """Loss and accuracy per epoch (train and evaluation) of one run."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["eval_loss"] for h in history], "s-", label="eval")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy loss")
    ax1.legend()
    ax2.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train (during the epoch)")
    ax2.plot(ep, [h["eval_accuracy"] for h in history], "s-", label="eval")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(histories: list[list[dict]], labels: list[str], path: str, title: str = "") -> None:
    """Evaluation accuracy per epoch of several runs (seeds / folds) in one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for hist, label in zip(histories, labels):
        ax.plot([h["epoch"] for h in hist], [h["eval_accuracy"] for h in hist], "o-", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
