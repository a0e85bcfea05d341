"""`python -m raytrain_yolo.bench`: plain Ultralytics vs raytrain_yolo vs the GPU-only step vs the tuner's pick.

All rows are steady-state images/s measured the same way (worker.ThroughputMeter: per-step timestamps, each
epoch's first 20% of steps skipped, windows of --window-steps steps), in one run on one machine, on the same
synthetic dataset. Results go to <out>/bench.json and <out>/bench.md as each row finishes, so a run cut short
still leaves what it measured.

    python -m raytrain_yolo.bench --out experiments/results            # one GPU: the full benchmark
    python -m raytrain_yolo.bench --cpu --images 64 --imgsz 64 --window-steps 2 --windows 2   # smoke test
    python -m raytrain_yolo.bench --only device,gpu,map --out ...   # issue 9: the device loader and its mAP

Parts, in the order they run (cli.py): device (`--loader device` rows, largest batch first), switches (issue 23:
--prefetch, compile, CUDA graphs, NCHW, all, each a device-loader row at the largest batch), store (the same
with the images kept as JPEG bytes, `--loader device-jpeg`), gpu (GPU-only step), augment (the device loader's
augmentation alone), native, raytrain, tune, ddp (the GPU-only step under DDP with and without
`find_unused_parameters`, on a world of 1), map (the same short training run with each loader, validation mAP
side by side), compile (device loader with torch.compile), big (a --big-images set, COCO-sized by default, with
the JPEG store: start-up, bytes held, images/s).

Modules: context.py (the run's settings and data), report.py (rows, ratios, bench.json/bench.md), training.py
(rows that train: Ultralytics, raytrain_yolo, the tuner, mAP), step.py (the GPU-only step, augmentation alone),
cli.py (the command line and the order of the parts).
"""
