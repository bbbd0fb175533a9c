"""Training with Hugging Face Accelerate: one loop for a CPU, a GPU or many, with exact resume.

The recipe is the paper's (official config_imagenet32.py): Adam(0.9, 0.999), linear warm-up then
a constant learning rate, gradient clipping at 1.0, the random-channel objective, and an EMA of
the weights that is what gets evaluated and sampled. `train()` is that recipe from top to bottom;
start-up checks are in startup.py, one optimizer step in step.py, checkpoints in resume.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..evaluation import codec_baselines, evaluate, save_heatmap
from ..model.transformer import AxialTransformer
from ..model.video import build_model
from .checkpoint import checkpoint_path
from .config import RunConfig
from .distributed import agree, replicas_in_sync
from .ema import EMA
from .errors import TrainingError, naming
from .optimizer_state import adam
from .resume import export_problem, restore, save_checkpoint, write_export
from .run_log import MetricsLog, TrainMeter, eval_metrics, run_outputs, save_samples
from .signals import Preempted, Preemption
from .startup import Start, begin_run, start_run
from .step import Objective, learning_rate, optimizer_step, training_batches


def train(cfg: RunConfig) -> dict:
    """Train, evaluate, checkpoint and export as `cfg` says. Returns the final record;
    {"complete": final record} when run_dir holds this run finished already (both with the
    run's `outputs` on the main process); {"preempted": signal name, "step", "checkpoint"} when
    SIGTERM or SIGINT stopped it (step and checkpoint None during start-up)."""
    with Preemption() as preemption:
        try:
            with start_run(cfg) as start:
                if start.complete is None:
                    return run(cfg, start, preemption)
                start.accelerator.end_training()
                main = start.accelerator.is_main_process
                return {"complete": start.complete,
                        **({"outputs": run_outputs(cfg.run_dir)} if main else {})}
        except Preempted as stop:
            return {"preempted": stop.signal_name, "step": None, "checkpoint": None}


def run(cfg: RunConfig, start: Start, preemption: Preemption) -> dict:
    """The loop, then the final checkpoint, evaluation and outputs. Nothing is written before
    the run's objects are built: a failure up to then is a failed start-up (`begin_run`)."""
    accelerator, t = start.accelerator, cfg.train
    main, run_dir = accelerator.is_main_process, Path(cfg.run_dir)
    model, ema, objective, optimizer, loader = build(cfg, start)
    resumed = start.checkpoint
    state = restore(resumed, model, optimizer, ema) if resumed else {"step": 0, "skipped_steps": 0}
    begin_run(cfg, start)
    start.checkpoint = None  # the tensors read are freed once loaded
    step = state["step"]
    saved_at = step if resumed else None
    skipped_in_row = 0  # not carried over a resume: a run that diverged resumes with a lower lr

    def checkpoint() -> int:
        save_checkpoint(accelerator, model, optimizer, ema,
                        {"step": step, "skipped_steps": state["skipped_steps"]}, run_dir,
                        cfg.checkpoint.keep)
        return step

    def every(n: int) -> bool:  # a periodic action, except at the last step (the final phase)
        return n > 0 and step % n == 0 and step < t.steps

    bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, disable=not main)
    log = MetricsLog(accelerator, run_dir / "metrics.jsonl", bar)
    try:
        stale = resumed and main and export_problem(run_dir, resumed.path)
        if stale:  # a kill or a full disk came between the checkpoint and its export
            bar.write(f"{stale}: writing the export again from {resumed.path.name}")
            write_export(ema, run_dir)
        if main:
            bar.write(f"{f'resuming from {resumed.path}' if resumed else 'starting'}: "
                      f"{model.num_parameters():,} parameters, {len(start.train_set)} train / "
                      f"{len(start.test_set)} test {'clips' if cfg.model.frames else 'images'} "
                      f"on {accelerator.device}, batch "
                      f"{t.batch_size} = {start.micro_batch} x {accelerator.num_processes} "
                      f"process(es) x {t.grad_accumulation} accumulation")
        # The thread count is logged: CPU results are bit-identical only under the same one.
        log(step, {"start": "resume" if resumed else "fresh",
                   "parameters": model.num_parameters(), "processes": accelerator.num_processes,
                   "threads": torch.get_num_threads(),
                   "precision": "bf16" if accelerator.mixed_precision == "bf16" else "fp32",
                   "train_images": len(start.train_set),
                   "test_images": len(start.test_set)}, echo=False)
        batches = training_batches(loader, accelerator, step * t.grad_accumulation)
        meter = TrainMeter(accelerator, t.batch_size)
        preemption.defer()  # steps are unsaved from here: a signal waits for the step's end
        while step < t.steps:
            lr = learning_rate(step, t)
            result = optimizer_step(accelerator, objective, optimizer, batches, step, lr, t,
                                    lambda: preemption.received is not None)
            step += 1
            if result.skipped:
                state["skipped_steps"] += 1
                skipped_in_row += 1
                if main:
                    bar.write(f"step {step}: non-finite loss or gradient, no update "
                              f"({skipped_in_row} in a row)")
                if skipped_in_row >= t.max_skipped_steps:
                    raise TrainingError(
                        f"{skipped_in_row} steps in a row (up to step {step}) were skipped "
                        "(non-finite loss or gradient): the run diverged. Resume from the last "
                        "checkpoint with a lower train.lr, or raise train.max_skipped_steps")
            else:
                skipped_in_row = 0
                ema.update(model, step - 1)
            meter.add(None if result.skipped else result.loss)
            bar.update(1)
            if step % cfg.log.every == 0 or step == t.steps or result.stop:
                log(step, meter.record(lr, state["skipped_steps"],
                                       result.grad_norm if t.grad_clip > 0 else None))
            if result.stop:
                if saved_at != step:
                    saved_at = checkpoint()
                raise Preempted(preemption.received or "a signal to another process")
            if every(cfg.eval.every):
                log(step, eval_record(cfg, ema, start)[0])
            if every(cfg.log.sample_every):
                save_samples(accelerator, ema, cfg, step)
            if every(cfg.checkpoint.every):
                saved_at = checkpoint()
        if saved_at != step:  # the final checkpoint
            saved_at = checkpoint()
        bar.close()
        if agree(accelerator, preemption.received is not None)[0]:
            raise Preempted(preemption.received or "a signal to another process")
        preemption.stop_at_once()  # everything is saved: a signal from here on stops at once
        final = finish(cfg, start, model, ema, log, step)
        preemption.defer()  # the run is complete once the record is written: a late signal
        log(step, final, echo=False)  # changes nothing
    except Preempted as stop:
        bar.close()
        log(step, {"preempted": stop.signal_name})
        accelerator.end_training()
        path = None if saved_at is None else checkpoint_path(run_dir, saved_at)
        return {"preempted": stop.signal_name, "step": saved_at, "checkpoint": path}
    finally:
        bar.close()
    accelerator.end_training()
    return {**final, "outputs": run_outputs(run_dir)} if main else final


def build(cfg: RunConfig, start: Start) -> tuple:
    """The model, its EMA, the objective and Adam, and the data loader, prepared by Accelerate
    (DDP, device placement, the seedable sampler)."""
    from accelerate.utils import set_seed

    t = cfg.train
    loader = DataLoader(start.train_set, batch_size=start.micro_batch, shuffle=True,
                        drop_last=True, num_workers=cfg.data.workers)
    set_seed(t.seed)  # the same init on every process
    model = build_model(cfg.model).set_gradient_checkpointing(t.gradient_checkpointing)
    ema = EMA(model, t.ema_decay)
    objective, optimizer, loader = start.accelerator.prepare(
        Objective(model, t.objective), adam(model.parameters(), t), loader)
    ema.model.to(start.accelerator.device)
    return model, ema, objective, optimizer, loader


def eval_record(cfg: RunConfig, ema: EMA, start: Start, per_pixel: bool = False):
    """The EMA model's test bits/dim as a record, and the heatmap with `per_pixel`. A model
    trained with label dropout is also scored told "no class": eval/bpd_no_class."""

    def run_eval(per_pixel: bool, no_class: bool = False):
        return evaluate(ema.model, start.test_set, start.accelerator, cfg.eval.batch_size,
                        cfg.eval.max_images, cfg.eval.bf16, per_pixel, cfg.data.workers,
                        progress=start.accelerator.is_main_process, no_class=no_class)

    metrics, heatmap = run_eval(per_pixel)
    record = eval_metrics(metrics, cfg.model.channels)
    if cfg.train.label_dropout:
        record["eval/bpd_no_class"] = run_eval(False, no_class=True)[0]["bpd"]
    return record, heatmap


def finish(cfg: RunConfig, start: Start, model: AxialTransformer, ema: EMA, log: MetricsLog,
           step: int) -> dict:
    """The final evaluation and the codec baselines, shown before anything is written (a full
    disk then loses no figure unseen), then samples and the heatmap. Returns the final record,
    which the caller writes last: a run stopped before that does them all again when resumed."""
    accelerator = start.accelerator
    record, heatmap = eval_record(cfg, ema, start, per_pixel=cfg.eval.heatmap)
    final = {"final": True, **record, "replicas_in_sync": replicas_in_sync(accelerator, model)}
    if accelerator.is_main_process and cfg.eval.baselines:
        final.update(codec_baselines(start.test_set, cfg.eval.max_images, progress=True))
    log.show(step, final)
    if cfg.log.sample_every:
        save_samples(accelerator, ema, cfg, step)
    if accelerator.is_main_process and heatmap is not None:
        with naming(Path(cfg.run_dir) / "heatmap.png"):
            save_heatmap(heatmap, Path(cfg.run_dir) / "heatmap.png")
    return final
