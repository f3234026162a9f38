"""Stage train_temporal: train a two-stage temporal model on per-frame features and predict the test split.

The model's own numbers (sizes, dropout, loss weights) are the section named after the model in the file given
by --model-params (params.yaml under DVC), because a matrix stage cannot pick ``${<model>.key}`` in its command;
the stage lists those keys as single params. Checkpoints are selected on a seeded hold-out of the training videos,
never on the test split.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from etesvs.data.feature_sequences import FeatureDataset, collate_features  # noqa: E402
from etesvs.data.labels import load_label_info  # noqa: E402
from etesvs.engine import (  # noqa: E402
    MODELS,
    build_loss,
    build_model,
    cleanup_distributed,
    count_parameters,
    fit,
    flops_per_frame,
    load_checkpoint,
    predict,
    seed_everything,
    setup_distributed,
    unwrap_model,
)
from etesvs.errors import EtesvsError, run_main  # noqa: E402
from etesvs.io import atomic_path, read_json, read_yaml, write_json  # noqa: E402
from etesvs.losses import boundary_pos_weight_from_counts, class_weights_from_counts  # noqa: E402

LOSS_KEYS = {"smoothing_weight", "boundary_weight", "similarity_sigma"}
CURVE_COLUMNS = ["epoch", "train_loss", "train_acc", "train_f1_50", "val_loss", "val_acc", "val_f1_50"]


def read_model_params(path: Path | None, model: str) -> tuple[dict, dict]:
    """Split section ``model`` of a params file into constructor kwargs and loss kwargs (plain numbers)."""
    if path is None:
        return {}, {}
    params = read_yaml(path) or {}
    section = params.get(model, {}) if isinstance(params, dict) else None
    if not isinstance(section, dict):
        raise EtesvsError(f"{path}: section '{model}' must be a mapping of numbers")
    accepted = set(inspect.signature(MODELS[model]).parameters) - {"in_channels", "num_classes"}
    model_args, loss_args = {}, {}
    for key, value in section.items():
        if not isinstance(value, (int, float, bool)):
            raise EtesvsError(f"{path}: {model}.{key} must be a number, got {value!r}")
        if key in LOSS_KEYS:
            loss_args[key] = float(value)
        elif key in accepted:
            model_args[key] = value
        else:
            known = ", ".join(sorted(accepted | LOSS_KEYS))
            raise EtesvsError(f"{path}: unknown key {model}.{key} (known keys: {known})")
    return model_args, loss_args


def hold_out(videos: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the training videos into (train, validation); validation gets round(fraction * n) >= 1."""
    if not 0.0 <= fraction < 1.0:
        raise EtesvsError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(videos) < 2:
        return list(videos), []
    order = np.random.default_rng(seed).permutation(len(videos))
    num_val = min(max(int(round(fraction * len(videos))), 1), len(videos) - 1)
    val = sorted(videos[i] for i in order[:num_val])
    held_out = set(val)
    return [v for v in videos if v not in held_out], val


def write_curves(path: Path, history: list[dict]) -> None:
    """Training curves, one row per epoch (DVC plots with x=epoch)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{row[key]:.6g}" if key in row else "") for key in CURVE_COLUMNS})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def write_probabilities(path: Path, probabilities: dict[str, np.ndarray], *, classes: list[str], model: str) -> None:
    """One float32 (T, C) dataset per video, written atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["model"] = model
            handle.attrs["classes"] = json.dumps(classes)
            for video, probs in probabilities.items():
                handle.create_dataset(video, data=probs.astype(np.float32), compression="gzip")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--features", type=Path, required=True, help="features.h5 (one (T, D) dataset per video)")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (labels.h5, info.json)")
    parser.add_argument("--out-checkpoint", type=Path, required=True, help="directory for last.pt and best.pt")
    parser.add_argument("--predictions", type=Path, required=True, help="directory for probs.h5 and model.json")
    parser.add_argument("--reports", type=Path, required=True, help="directory for curves.csv")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard log directory")
    parser.add_argument("--model-params", type=Path, default=None,
                        help="YAML file whose section named after --model holds the model's numbers")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sample-rate", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 avoids contention on a shared CPU")
    args = parser.parse_args(argv)

    dist = setup_distributed()
    try:
        _run(args, dist)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, dist) -> None:
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    generator = seed_everything(args.seed)
    model_kwargs, loss_kwargs = read_model_params(args.model_params, args.model)
    info = load_label_info(args.labels)
    train_videos, val_videos = hold_out(list(info.train), args.val_fraction, args.seed)
    if not train_videos:
        raise EtesvsError(f"{args.labels / 'info.json'}: the train split is empty")
    datasets = {
        name: FeatureDataset(args.features, args.labels, videos, sample_rate=args.sample_rate)
        for name, videos in (("train", train_videos), ("val", val_videos), ("test", list(info.test)))
    }
    counts = datasets["train"].label_counts(info.num_classes)
    model_args = {"in_channels": datasets["train"].feature_dim, "num_classes": info.num_classes, **model_kwargs}
    model = build_model(args.model, model_args).to(dist.device)
    loss_fn = build_loss(
        args.model,
        class_weights=class_weights_from_counts(counts.class_counts).tolist(),
        boundary_pos_weight=boundary_pos_weight_from_counts(counts.num_boundaries, counts.num_frames),
        **loss_kwargs,
    ).to(dist.device)
    if dist.is_distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=dist.device.type == "cuda")

    loader_args = dict(batch_size=args.batch_size, collate_fn=collate_features, num_workers=args.num_workers)
    if dist.is_distributed:
        sampler = DistributedSampler(datasets["train"], num_replicas=dist.world_size, rank=dist.rank, seed=args.seed)
        train_loader = DataLoader(datasets["train"], sampler=sampler, **loader_args)
    else:
        train_loader = DataLoader(datasets["train"], shuffle=True, generator=generator, **loader_args)
    val_loader = DataLoader(datasets["val"], **loader_args) if val_videos else None

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(args.tensorboard))
    logged = {"epoch": 0}

    def on_epoch_end(history: list[dict]) -> None:
        for row in history:
            if row["epoch"] > logged["epoch"]:
                for key, value in row.items():
                    if key != "epoch":
                        split, metric = key.split("_", 1)
                        writer.add_scalar(f"{metric}/{split}", value, global_step=int(row["epoch"]))
                logged["epoch"] = int(row["epoch"])
        writer.flush()
        write_curves(args.reports / "curves.csv", history)

    config = {
        "loss_args": loss_kwargs, "lr": args.lr, "batch_size": args.batch_size, "sample_rate": args.sample_rate,
        "seed": args.seed, "train_videos": train_videos, "val_videos": val_videos,
        "num_frames": {video: info.num_frames.get(video) for video in train_videos + val_videos},
        "features_attrs": datasets["train"].attrs, "world_size": dist.world_size,
    }
    result = fit(
        model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=train_loader, val_loader=val_loader,
        epochs=args.epochs, checkpoint_dir=args.out_checkpoint, model_name=args.model, model_args=model_args,
        config=config, device=dist.device, background_ids=info.background_ids, generator=generator, scaler=scaler,
        is_main=dist.is_main, on_epoch_end=on_epoch_end if dist.is_main else None,
    )
    if dist.is_distributed:
        torch.distributed.barrier()
    if not dist.is_main:
        return
    writer.close()
    write_curves(args.reports / "curves.csv", result.history)

    best = load_checkpoint(args.out_checkpoint / "best.pt", map_location=dist.device)
    network = unwrap_model(model)
    network.load_state_dict(best["model"])
    test_loader = DataLoader(datasets["test"], **loader_args)
    probabilities = predict(network, test_loader, device=dist.device, sample_rate=args.sample_rate)
    write_probabilities(args.predictions / "probs.h5", probabilities, classes=list(info.classes), model=args.model)

    test_lengths = [len(datasets["test"].full_rate_labels(v)) for v in datasets["test"].videos] or [256]
    flops_length = max(int(np.median(test_lengths)) // args.sample_rate, 1)
    step_flops = flops_per_frame(network, in_channels=model_args["in_channels"], length=flops_length)
    attrs = datasets["train"].attrs
    # Two-stage cost = feature extractor + temporal model, per frame, so that the rows of the summary
    # compare end to end with the streaming model (the extractor's numbers come from extract_features).
    extractor_file = args.features.parent / "info.json"
    extractor = read_json(extractor_file) if extractor_file.is_file() else {}
    temporal_params, temporal_flops = count_parameters(network), step_flops / args.sample_rate
    write_json(args.predictions / "model.json", {
        "model": args.model,
        "params": temporal_params + int(extractor.get("params") or 0),
        "flops_per_frame": temporal_flops + float(extractor.get("flops_per_frame") or 0.0),
        "temporal_params": temporal_params,
        "temporal_flops_per_frame": temporal_flops,
        "extractor_params": extractor.get("params"),
        "extractor_flops_per_frame": extractor.get("flops_per_frame"),
        "flops_per_model_step": step_flops,
        "flops_input_length": flops_length,
        "sample_rate": args.sample_rate,
        "backbone_pretrained": attrs.get("backbone_pretrained"),
        "feature_extractor": attrs.get("extractor"),
        "best_epoch": int(best["epoch"]),
        "epochs": args.epochs,
        "val_videos": val_videos,
        "model_args": model_args,
    })
    best_row = next((row for row in result.history if row["epoch"] == best["epoch"]), {})
    print(
        f"train_temporal: {args.model}, {count_parameters(network)} parameters, best epoch {best['epoch']} "
        f"(val acc {best_row.get('val_acc', float('nan')):.1f}, F1@50 {best_row.get('val_f1_50', float('nan')):.1f}); "
        f"{len(probabilities)} test videos -> {args.predictions / 'probs.h5'}"
    )


if __name__ == "__main__":
    run_main(main)
