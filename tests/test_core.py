"""Issue 2: the real Ultralytics loop in a Ray TorchTrainer with CPU (gloo) DDP workers (checks sharpened in issue 14)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import load_summary, run_cli, total_train_loss
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic

N_TRAIN = 99  # odd on purpose: the DistributedSampler pads one index to split it over 2 ranks
EPOCHS = 4


RUN = ("--cpu", "--no-validate-untrained", "--no-tracking", "--synthetic-train", N_TRAIN, "--synthetic-val", 32,
       f"epochs={EPOCHS}", "batch=16", "imgsz=128")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("core")
    proc = run_cli("fit", "--num-workers", 2, "--storage-path", storage, "--name", "ddp2", "--trace-samples", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, storage, load_summary(storage, "ddp2")


def test_one_and_two_workers_reach_comparable_losses(ddp_run):
    """Issue 2: DDP scaling is right. The same run (data, seed, global batch) on one worker trains like the 2-rank
    run above: a loss scaled by 0 (no learning) or by 2x (a double step) shows up as a gap far beyond run-to-run
    noise. (Once test_scaling.py's own pair of runs; the 2-rank side is this module's run.)

    One worker, Ultralytics' loader: Ultralytics never calls `set_epoch` at world size 1, and --trace-samples must
    still show each epoch training on every image once, in a new order (once test_gpu_path's own fit)."""
    _, storage, two = ddp_run
    proc = run_cli("fit", "--num-workers", 1, "--storage-path", storage, "--name", "ddp1", "--trace-samples", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_summary(storage, "ddp1")
    orders = [e["indices"] for e in one["workers"][0]["samples"]]
    assert [e["epoch"] for e in one["workers"][0]["samples"]] == list(range(EPOCHS))
    assert all(sorted(o) == list(range(N_TRAIN)) for o in orders), "each epoch trains on every image once"
    assert orders[0] != orders[1], "one worker replayed epoch 1's order"
    assert one["world_size"] == 1 and two["world_size"] == 2
    for s in (one, two):
        assert total_train_loss(s["history"][-1]) < total_train_loss(s["history"][0]), "both must learn"
    l1, l2 = total_train_loss(one["metrics"]), total_train_loss(two["metrics"])
    assert abs(l1 - l2) / l1 < 0.15, (l1, l2)


def test_summary_has_the_promised_keys(ddp_run):
    proc, storage, s = ddp_run
    assert "summary" in proc.stdout and str(storage / "ddp2" / "summary.json") in proc.stdout
    assert s["world_size"] == 2 and s["device"] == "cpu" and s["backend"] == "gloo"
    assert s["epochs_completed"] == EPOCHS
    for key in ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "train/box_loss", "train/cls_loss"):
        assert key in s["metrics"], key
    assert s["images_per_second"] > 0
    assert Path(s["last_checkpoint"]).is_file() and Path(s["best_checkpoint"]).is_file()
    assert Path(s["ray_result_path"]).is_dir()
    assert [h["epoch"] for h in s["history"]] == list(range(1, EPOCHS + 1))


def test_ranks_are_real_ddp(ddp_run):
    _, _, s = ddp_run
    workers = sorted(s["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["pid"] != workers[1]["pid"]
    assert workers[0]["params_sha256"] == workers[1]["params_sha256"], "DDP must keep parameters identical"


def test_each_epoch_the_ranks_split_the_dataset(ddp_run):
    _, _, s = ddp_run
    r0, r1 = (sorted(s["workers"], key=lambda w: w["rank"])[i]["samples"] for i in (0, 1))
    assert len(r0) == len(r1) == EPOCHS
    for epoch, (a, b) in enumerate(zip(r0, r1)):
        assert a["epoch"] == b["epoch"] == epoch, "set_epoch must be called on the sampler every epoch"
        both = a["indices"] + b["indices"]
        assert set(both) == set(range(N_TRAIN))
        assert len(both) == N_TRAIN + 1  # padded to a multiple of 2
        assert sum(c - 1 for c in Counter(both).values()) == 1  # overlap only by the padding
    assert r0[0]["indices"] != r0[1]["indices"], "each epoch must reshuffle"


def test_loss_falls(ddp_run):
    _, _, s = ddp_run
    first, last = s["history"][0], s["history"][-1]
    assert total_train_loss(last) < total_train_loss(first)


def test_checkpoints_hold_the_last_and_the_best_epoch(ddp_run):
    """last.pt is the model after the final epoch, best.pt the one of the best fitness: a stale or mixed-up
    checkpoint (an earlier epoch's, or the untrained model) fails here. Both are the final weights as Ultralytics
    leaves them (issue 39): stripped of the optimizer (`strip_optimizer`: epoch -1, half precision), with the
    epoch's results and metrics kept."""
    import torch
    from ultralytics import YOLO

    _, _, s = ddp_run
    last = torch.load(s["last_checkpoint"], map_location="cpu", weights_only=False)
    best = torch.load(s["best_checkpoint"], map_location="cpu", weights_only=False)
    assert last["optimizer"] is None and best["optimizer"] is None and last["epoch"] == best["epoch"] == -1
    assert next(last["model"].parameters()).dtype == torch.float16
    assert [int(e) for e in last["train_results"]["epoch"]] == list(range(1, EPOCHS + 1))  # after the final epoch
    fitness = [h["fitness"] for h in s["history"]]
    assert best["train_metrics"]["fitness"] == pytest.approx(max(fitness))
    assert YOLO(s["last_checkpoint"]).task == "detect"


def test_two_gloo_ranks_give_the_one_rank_gradient(ddp_run, ray_local, tmp_path):
    """The first optimizer step's gradient, of a known loss, on the same 4 images: 2 DDP ranks (2 images each)
    must give what 1 rank gives. A loss scaled by 0 (the CPU world size Ultralytics derives), by 2 too many or
    too few, or ranks that do not all-reduce, all fail here. The loss is a sum over images of the squared
    outputs with BatchNorm on running statistics, so that it is exactly additive over the images; the model
    starts from the trained checkpoint on both sides."""
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _, _, s = ddp_run
    data = ensure_synthetic(SyntheticSpec(train=4, val=4, imgsz=64))
    no_aug = dict(mosaic=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0, perspective=0.0, flipud=0.0,
                  fliplr=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, mixup=0.0, cutmix=0.0, copy_paste=0.0)
    args = dict(data=str(data), model=s["last_checkpoint"], epochs=1, batch=4, nbs=4, imgsz=64, workers=0,
                val=False, save=False, plots=False, warmup_epochs=0, close_mosaic=0, seed=0, **no_aug)

    def probe(config):
        import torch
        import ray.train
        import ray.train.torch

        from raytrain_yolo.train.adapter import trainer_class, unwrap

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()

        def known_loss(preds, batch):
            n = batch["img"].shape[0]
            per_image = torch.zeros(n)
            stack = [preds]
            while stack:
                p = stack.pop()
                if isinstance(p, dict):
                    stack += list(p.values())
                elif isinstance(p, (list, tuple)):
                    stack += list(p)
                elif isinstance(p, torch.Tensor) and p.ndim and p.shape[0] == n and p.is_floating_point():
                    per_image = per_image + p.float().pow(2).flatten(1).mean(1)
            return per_image.sum(), {"known_loss": per_image.mean().detach()}

        class Probe(trainer_class("detect")):
            def optimizer_step(self):
                if not getattr(self, "probed", False):
                    self.probed = True
                    grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                             for p in unwrap(self.model).parameters()]
                    torch.save(torch.cat(grads), f"{config['out']}/w{world}-r{rank}.pt")
                super().optimizer_step()

        def eval_batchnorm(trainer):  # after Ultralytics' model.train(): running statistics, per image
            for m in trainer.model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()

        overrides = {**config["args"], "project": config["out"], "name": f"w{world}-r{rank}", "exist_ok": True}
        trainer = Probe(overrides=overrides, device=ray.train.torch.get_device(), world_size=world)
        def use_known_loss(trainer):  # the trained model and its EMA copy (which the epoch's validation uses)
            for model in (unwrap(trainer.model), trainer.ema.ema if trainer.ema else None):
                if model is not None:
                    model.criterion = known_loss

        trainer.add_callback("on_pretrain_routine_end", use_known_loss)
        trainer.add_callback("on_train_batch_start", eval_batchnorm)
        trainer.train()

    for world in (1, 2):  # on the session's shared head (ray_local), not a local Ray of its own
        TorchTrainer(probe, train_loop_config={"args": args, "out": str(tmp_path)},
                     scaling_config=ScalingConfig(num_workers=world, use_gpu=False),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=f"grad{world}")).fit()
    one, r0, r1 = (torch.load(tmp_path / f, weights_only=True) for f in ("w1-r0.pt", "w2-r0.pt", "w2-r1.pt"))
    assert one.norm() > 0, "no gradient at all"
    assert torch.equal(r0, r1), "the ranks must hold the same all-reduced gradient"
    rel = ((r0 - one).norm() / one.norm()).item()
    assert rel < 1e-3, f"2-rank gradient differs from the 1-rank gradient by {rel:.3%} of its norm"
