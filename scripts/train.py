"""Train a causal LM or a sequence classifier. Kill it at any moment; run the same command again to resume bit-for-bit.

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py --config configs/tiny_lm.yaml

Exit codes: 0 finished (or already complete), 75 checkpointed after a stop request (run again), 2 bad input,
3 stopped on a non-finite loss (--nan_policy), 74 the machine failed the run (full disk, unwritable folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from resumable.agreement import agree_on_plan
from resumable.backend import make_backend, prepare_backend
from resumable.checkpoint import amend_checkpoint, read_progress, step_name
from resumable.checkpoint_writer import checkpoint_writer
from resumable.config import cache_root, parse_config, parse_duration
from resumable.disk import check_output_dir_writable, disk_full_exits
from resumable.errors import exit_on_user_error
from resumable.export import finish_run
from resumable.launch import check_distributed, enable_cpu_distributed
from resumable.logs import get_logger, log_to_file, setup_logging
from resumable.preemption import EXIT_FINISHED, EXIT_REQUEUE, StopRequest, inject_fault, parse_signals, write_run_status
from resumable.ranks import ranks
from resumable.remote import RemoteMirror, is_remote, staging_dir
from resumable.resume_plan import apply_plan, complete_record, plan_total_steps, read_complete
from resumable.retention import RetentionPolicy
from resumable.trackers import choose_trackers, describe, mark_preempting, start_trackers

log = get_logger("resumable.train")


@exit_on_user_error
@disk_full_exits  # a full disk in any write (a log line, the final model) is one line naming the file, exit 74
def main(argv: list[str] | None = None) -> int:
    # --- config
    cfg = parse_config(argv, description=__doc__)
    setup_logging(cfg.log_level)
    # handlers first: a preemption signal during the slow start-up must not kill the process
    budget = parse_duration(cfg.max_run_time) if cfg.max_run_time else None
    stop = StopRequest(parse_signals(cfg.stop_signals), budget, cfg.max_steps_per_run).install()
    mirror = None
    if is_remote(cfg.output_dir):  # s3:// or gs://: train in a local staging dir, the bucket is the durable copy
        mirror = RemoteMirror(cfg.output_dir, staging_dir(cfg.output_dir, cache_root(cfg)))
        cfg.output_dir = str(mirror.local_dir)
    out = Path(cfg.output_dir)

    enable_cpu_distributed()
    accelerator_kwargs = prepare_backend(cfg)  # DeepSpeed on CPU: gloo; FSDP without GPUs: one line; --deterministic
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.utils.logging import disable_progress_bar

    from resumable.averaging import averaging_for
    from resumable.data import build_dataloaders, load_raw_datasets, load_tokenizer, tokenize_datasets
    from resumable.data_checks import label_names
    from resumable.disk_space import require_disk
    from resumable.divergence import NanGuard, poison, skip_update, stop_diverged
    from resumable.feed import feed_for
    from resumable.metrics import TrainLog, baselines, evaluate, example_hashes, generation_for
    from resumable.modeling import build_model, check_model_limits
    from resumable.restore import restore

    # --- accelerator
    disable_progress_bar()  # the library's "Writing model shards" bars; our own step bar stays
    trackers = choose_trackers(cfg.report_to)
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_DIR", str(out))  # keep wandb's files with the run, not in the cwd
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,  # [] makes accelerate warn about nothing
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs")),
        # our loop steps the scheduler once per optimizer step (accelerate would step it once per process)
        step_scheduler_with_optimizer=False,
        # shuffle order = f(seed, epoch): the only way a resumed epoch sees the same order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        **accelerator_kwargs,
    )
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    check_distributed(world)
    team = ranks(accelerator)  # collectives that wait longer than --ddp_timeout for work one rank does alone
    plan = agree_on_plan(team, cfg, mirror)  # rank 0: continue, branch, start over, extend or nothing to do
    if plan.complete:
        log.info(plan.complete)
        if is_main:
            with contextlib.suppress(OSError):  # a finished run on a read-only mount is still finished
                write_run_status(out, "finished", EXIT_FINISHED, read_complete(out).get("step", 0))
                if mirror:
                    mirror.push_file("run_status.json")
        accelerator.end_training()
        return EXIT_FINISHED
    resume_dir = plan.resume
    check_output_dir_writable(out)  # every rank: a read-only output dir is one line now, not after start-up
    backend = make_backend(accelerator, cfg)  # what DDP, DeepSpeed and FSDP do differently lives there
    log.info(f"{cfg.task} run in {out}: {world} process(es) on {accelerator.device}, {backend.describe()}, precision "
             f"{accelerator.mixed_precision}; {describe(cfg.report_to, trackers)}")  # fmt: skip

    # --- data (nothing in the output dir changes before the data and the model are known to be usable)
    check_model_limits(cfg)  # the model's config only: an unknown or unreachable model fails before the data work
    set_seed(cfg.seed)
    with team.in_turn():  # rank 0 builds corpora, tokenizer and caches; then each node's first; then the rest
        raw = load_raw_datasets(cfg)  # --streaming: validation and the stream's first rows
        tokenizer = load_tokenizer(cfg, raw)
        train_ds, eval_ds = tokenize_datasets(cfg, raw, tokenizer)  # --streaming: train_ds is read as it goes
    train_dl, eval_dl = build_dataloaders(cfg, train_ds, eval_ds, tokenizer)
    generation = generation_for(cfg, eval_ds, tokenizer, eval_dl.collate_fn)  # seq2seq: generated text is scored
    unit = f"blocks of {cfg.block_size} tokens" if cfg.task == "causal_lm" else "examples"
    log.info(f"Data: {'streamed' if cfg.streaming else len(train_ds)} training and {len(eval_ds)} validation {unit}")

    # --- model, optimizer, scheduler
    set_seed(cfg.seed)  # model init must not depend on how much randomness data preparation used
    model = build_model(cfg, tokenizer, label_names(cfg, raw))  # id2label: what pipelines print
    decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2]  # ZeRO-3: placeholders
    no_decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) < 2]  # biases and norms
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: placeholders
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    ga, bs = cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size
    feed = feed_for(accelerator, cfg, train_dl, train_ds, team)  # where in the data the loop is, and how it gets back
    averages = averaging_for(accelerator, cfg, model, feed)  # EMA or SWA: kept, checkpointed, evaluated, final/
    policy = RetentionPolicy.from_config(cfg)
    writer = checkpoint_writer(accelerator, cfg, policy, mirror)  # --async_save: commits in the background
    saved = read_progress(resume_dir) if resume_dir is not None else None
    total_steps = plan_total_steps(cfg, feed.batches_per_epoch, (world, bs, ga), saved)
    scheduler = averages.schedule(get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, total_steps))
    scheduler = backend.prepare_scheduler(scheduler, optimizer)
    log.info(f"Model: {n_params:,} parameters (weight decay on {len(decay)} of {len(decay) + len(no_decay)} tensors); "
             f"{feed.describe()}, global batch {world * bs * ga}, "
             f"{total_steps} steps in total")  # fmt: skip

    # --- resume (the output dir is touched from here on)
    require_disk(cfg, n_params, len(list(model.parameters())))  # every rank (so all exit 74 together), rank 0 logs
    team.wait()  # every process has its plan before anything is moved
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        apply_plan(plan, out, mirror)  # a start-over moves the old train.log aside first
        log_to_file(out / "train.log")
        for line in plan.info:
            log.info(line)
        for line in plan.warnings:
            log.warning(line)
        if mirror:
            mirror.push_missing()  # checkpoints an earlier run committed but never finished uploading
        log.info(f"Checkpoints: {cfg.checkpoints_dir} ({'resuming' if resume_dir else 'fresh start'})")
    team.wait()
    progress, resume_msg = restore(accelerator, cfg, plan, (world, bs, ga), feed, scheduler, total_steps)
    averages.resume(resume_dir)
    train_log = TrainLog(out / "train_log.jsonl")
    if is_main:  # records past the checkpoint are about to be redone (a pending evaluation too)
        train_log.truncate_after(progress.step, keep_eval=not progress.eval_pending)
    samples_log = TrainLog(out / "samples" / f"rank{accelerator.process_index}.jsonl") if cfg.record_samples else None
    if samples_log:
        samples_log.truncate_after(progress.step)
    settings = {k: v for k, v in vars(cfg).items() if v is not None}
    start_trackers(accelerator, cfg, trackers, settings, progress.step, progress.tracker_run_id)
    guard = NanGuard(cfg.nan_policy, cfg.max_nan_skips, scaler_active=accelerator.scaler is not None)

    def state() -> tuple[int, str]:
        return progress.step, json.dumps(dataclasses.asdict(progress), sort_keys=True)

    # what the newest checkpoint of this output dir holds (a checkpoint of another run's dir is not ours to amend)
    in_store = resume_dir is not None and resume_dir.resolve().parent == cfg.checkpoints_dir.resolve()
    last_saved = state() if in_store else (-1, "")

    def run_eval() -> bool:
        """Evaluate at `progress.step`; False if a stop request interrupted it (it is re-run on resume)."""
        inject_fault("sigterm_before_eval", progress.step)
        t0 = time.perf_counter()
        metrics = evaluate(accelerator, model, eval_dl, cfg.task, stop.eval_should_stop, generation)
        averaged = metrics and averages.evaluated(lambda: evaluate(accelerator, model, eval_dl, cfg.task,
                                                                  stop.eval_should_stop, generation), metrics)  # fmt: skip
        progress.eval_pending = metrics is None or averaged is None
        if progress.eval_pending:
            return False
        metrics.update(averaged)
        stop.note_eval(time.perf_counter() - t0)
        progress.last_eval, progress.last_eval_step = metrics, progress.step
        value = metrics[cfg.metric_for_best_model]
        best = progress.best_metric
        # a NaN is never best: every later comparison with it is False, so it would stay best for good
        if math.isfinite(value) and (best is None or (value > best if cfg.greater_is_better else value < best)):
            progress.best_metric, progress.best_step = value, progress.step
        if is_main:
            train_log.append({"step": progress.step, **metrics})
        accelerator.log(metrics, step=progress.step)
        return True

    def save(last: bool = False) -> None:
        """Commit a checkpoint at this step, or record what changed since this step's (an evaluation re-run).
        `last`: the run ends after it, so --async_save waits for its commit (an error in it is the run's)."""
        nonlocal last_saved
        t0 = time.perf_counter()  # what the save keeps training waiting, a pending background write included
        writer.wait()  # --async_save: the pending save is committed first (and its error raised here)
        if last_saved == state():
            return
        if last_saved[0] == progress.step:  # the state is the same; only its record (metrics, best) changed
            folder = cfg.checkpoints_dir / step_name(progress.step)
            if is_main:
                amend_checkpoint(folder, progress)
                writer.after_commit(folder)  # retention (the best pool may change), upload
        else:
            recorded = {"settings": cfg.resume_settings(), "retention": dataclasses.asdict(policy)}
            files = {**feed.checkpoint_files(), **averages.checkpoint_files()}  # a stream position, the average
            writer.save(progress, recorded, files)  # commit, retention, upload (--async_save: in the background)
        team.wait()  # the others wait for rank 0's upload here, not in the next step's all-reduce
        # --max_run_time leaves room for the save and its upload (a background one included)
        stop.note_save(time.perf_counter() - t0 + writer.background_s)
        last_saved = state()
        if last:
            writer.wait()

    # --- training loop
    interrupted = False
    if progress.eval_pending:  # a stop deferred (or cut short) this step's evaluation: do it, record it
        interrupted = not run_eval()
        save()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not is_main, unit="step", dynamic_ncols=True)
    steps_this_run = 0
    model.train()
    while progress.step < total_steps and not interrupted:
        t0 = time.perf_counter()
        batches, micro = feed.epoch(progress)  # index level or a stream's cursors: skipped data is never read
        window_start = micro  # accumulation windows count from here (an elastic resume may start mid-window)
        window_loss = torch.zeros((), device=accelerator.device)
        t_step = time.perf_counter()
        for batch in batches:
            if resume_msg:  # one line, once the first resumed batch is in hand
                log.info(f"{resume_msg}; fast-forwarded {micro} batches in {(time.perf_counter() - t0) * 1e3:.1f} ms")
                resume_msg = ""
            window = feed.window(window_start)  # the epoch's last window may be short
            last_micro = micro - window_start == window - 1
            if samples_log:
                samples_log.append(
                    {"step": progress.step + 1, "epoch": progress.epoch, "samples": example_hashes(batch)}
                )
            with backend.micro_step(model, last_micro):
                loss = poison(model(**batch).loss, progress.step + 1) / window  # the real window size, not ga
                backend.backward(loss, last_micro)
            window_loss += loss.detach()
            micro += 1
            if not last_micro:
                continue
            # --- optimizer step, once every rank knows the loss and gradients are finite
            grad_norm = backend.clip_gradients(model)
            done = progress.step + 1 >= total_steps
            eval_due = done or bool(cfg.eval_steps and (progress.step + 1) % cfg.eval_steps == 0)
            stop.note_step(time.perf_counter() - t_step)
            stop.check_budgets(steps_this_run + 1, eval_due)
            # one all-reduce carries the loss, the stop flag and the non-finite flag: ranks agree for free
            flag = torch.full((1,), float(stop.local_flag), device=accelerator.device)  # a fill: no host copy
            local = torch.cat([window_loss.float().view(1), flag, guard.local_flag(window_loss, grad_norm).view(1)])
            stats = accelerator.reduce(local, "sum").cpu()  # the step's one device sync: every rank decides alike
            step_loss, stopping, bad = (stats[0] / world).item(), stats[1].item() > 0, stats[2].item() > 0
            lr = scheduler.get_last_lr()[0]  # the rate this update uses (the scheduler moves on after it)
            if diverged := guard.diverged(bad, progress, step_loss, grad_norm):
                return stop_diverged(writer, out, progress.step, diverged)
            if bad:
                skip_update(accelerator)
            elif found := backend.step(optimizer):  # DeepSpeed checks the gradients inside its step
                return stop_diverged(writer, out, progress.step, f"step {progress.step + 1}: {found}")
            applied = not (bad or accelerator.optimizer_step_was_skipped)
            if bad or applied:  # an fp16 overflow skips the schedule's step too: keep it in line
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            steps_this_run += 1
            progress.samples_seen += window * bs * world
            progress.samples_in_epoch += window * bs * world
            progress.batches_in_epoch = window_start = micro
            epoch_end = feed.epoch_done(micro)
            averages.after_step(applied, progress.epoch if epoch_end else None)  # EMA: every update; SWA: epochs
            if epoch_end:
                progress.epoch, progress.batches_in_epoch, progress.samples_in_epoch = progress.epoch + 1, 0, 0
            # --- log, evaluate, save
            if is_main:
                record = {"step": progress.step, "epoch": progress.epoch, "train/loss": step_loss, "lr": lr}
                train_log.append({**record, "time": round(time.time(), 4)})
            if progress.step % cfg.logging_steps == 0:
                accelerator.log({"train/loss": step_loss, "lr": lr}, step=progress.step)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # shown by the update below
            bar.update(1)
            if eval_due and stopping:  # a stop never waits for an evaluation: the resumed run does it first
                progress.eval_pending = True
            elif eval_due:
                interrupted = not run_eval()
            new_best = cfg.keep_best > 0 and progress.best_step == progress.step  # the best model is never lost
            periodic = cfg.checkpointing_steps and progress.step % cfg.checkpointing_steps == 0
            if done or stopping or interrupted or progress.batches_in_epoch == 0 or periodic or new_best:
                save()
            if done or stopping or interrupted:
                break
            window_loss = torch.zeros((), device=accelerator.device)
            t_step = time.perf_counter()
        else:
            continue
        break
    bar.close()

    # --- stop early, or finish
    if progress.step < total_steps or progress.eval_pending:
        save(last=True)
        mark_preempting(stop.reason)  # a scheduler's stop: a W&B sweep requeues the run, not crashed
        pending = ", its evaluation runs first on resume" if progress.eval_pending else ""
        log.warning(
            f"Stopped ({stop.reason or 'evaluation interrupted'}); checkpoint {step_name(progress.step)} saved"
            f"{pending}. Run the same command to resume."
        )
        if is_main:
            elapsed = time.monotonic() - stop.started
            write_run_status(out, "requeue", EXIT_REQUEUE, progress.step, reason=stop.reason or "", elapsed=elapsed)
            if mirror:
                mirror.push_file("run_status.json")
        team.wait()  # no rank exits (and makes torchrun kill the others) before all are done
        accelerator.end_training()  # after the barrier: it destroys the process group
        return EXIT_REQUEUE
    save(last=True)
    weights = backend.gather_weights(model, cfg.checkpoints_dir / step_name(progress.step))  # every rank
    if is_main:
        epochs, unwrapped = feed.epochs(progress), accelerator.unwrap_model(model)
        with averages.final(out, unwrapped, tokenizer, weights) as weights:  # EMA/SWA: final/ is the average
            final_metrics = finish_run(out, unwrapped, weights, tokenizer, progress,
                                       baselines(cfg.task, getattr(train_ds, "head", train_ds), eval_ds,
                                                 generate_samples=cfg.eval_generate_samples),
                                       complete_record(cfg, progress.step, epochs))  # fmt: skip
        if mirror:
            mirror.push_complete()  # final/, metrics, logs, then COMPLETE last
        print(json.dumps(final_metrics))
    accelerator.end_training()
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
