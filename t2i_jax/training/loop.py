"""The training loop behind train.py: build, resume, step, log, sample, checkpoint, stop cleanly.

    state = train(config, workdir)

Resumes from the newest checkpoint in workdir/checkpoints automatically (refusing another
model's checkpoints), saves every train.checkpoint_every steps, at the end and when SIGTERM or
SIGINT arrives (then returns early: a preempted job exits cleanly), keeps the last
train.keep_checkpoints (0: all). A second signal stops at once (errors.Interrupted). A non-finite
loss, gradient norm or parameter raises NonFiniteLossError before anything is saved, so the last
good checkpoint is never overwritten. One job trains a workdir at a time (a lock).

Several processes (a multi-host job, t2i_jax/distributed.py) run this same loop in step: each
reads its own slice of every global batch, all write the checkpoint together (orbax: each its
own shards), process 0 alone writes metrics, grids and the lock; a signal to any one process
stops all after the same step, and the NaN guard reads the same replicated record everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import distributed, families, files, images
from t2i_jax import sharding as mesh_lib
from t2i_jax.checkpoint import Checkpointer, check_compatible
from t2i_jax.config_utils import check_train_config
from t2i_jax.errors import Interrupted
from t2i_jax.families.base import Family
from t2i_jax.training.state import OptimConfig, TrainState, init_state, make_optimizer
from t2i_jax.training.step import make_train_step
from t2i_jax.training.writers import MetricWriter

GRID_SEED_STREAM = 7  # the progress grid's noise: fold_in(key(seed), 7), the same at every step


class NonFiniteLossError(FloatingPointError):
    pass


def create_state(family: Family, tx, key: jax.Array) -> TrainState:
    """A fresh TrainState of `family`: its initial parameters, the optimizer's state, the root key."""
    k_init, k_root = jax.random.split(key)
    return init_state(family.init_params(k_init), tx, k_root)


def _install_stop_handlers(flag: dict):
    """SIGTERM / SIGINT: save after the current step, then stop. A second one stops at once,
    saving nothing more (errors.Interrupted); a third gets the previous handler."""
    previous = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if flag.get("stop"):  # second signal: give up immediately
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))
            raise Interrupted(signum, f"stopped by a second {name} without saving")
        flag["stop"] = name
        print(f"\n[t2i_jax] {name}: saving a checkpoint after this step, then stopping "
              "(send it again to stop without saving).", file=sys.stderr)

    if hasattr(signal, "SIGTERM"):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
    return previous


def _restore_handlers(previous: dict) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)


def _divergence(metrics: dict, step: int, latest: Optional[int], lr: float) -> str:
    """The NaN guard's message: what was not finite, what is intact, what to change."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}" + (
        "" if metrics["params_finite"] else ", parameters no longer finite")
    kept = (f"the last good checkpoint ({latest}) is intact" if latest is not None
            else "nothing was saved (there is no checkpoint yet)")
    return (f"training diverged at step {step} ({what}); stopped without saving, so {kept}. "
            f"Lower --config.train.learning_rate (now {lr:g}) or raise "
            "--config.train.warmup_steps, or check the data.")


@dataclasses.dataclass
class Run:
    """What the loop closes over: the family and the optimizer built from one config."""
    family: Family
    optim: OptimConfig
    tx: Any

    @classmethod
    def from_config(cls, config) -> "Run":
        optim = OptimConfig.from_config(config.train)
        return cls(families.build(config), optim, make_optimizer(optim))

    @property
    def config(self):
        return self.family.config

    def create_state(self, key: jax.Array) -> TrainState:
        return create_state(self.family, self.tx, key)


def train(config, workdir: str, *, devices: Optional[list] = None, progress: bool = True) -> TrainState:
    """Trains (or resumes) the family of `config` in `workdir`; returns the final state.

    Refuses bad config values, an unwritable workdir and a workdir another process trains in
    before anything is written there."""
    from t2i_jax import data as data_lib
    check_train_config(config)
    run = Run.from_config(config)
    tcfg = config.train
    mesh = mesh_lib.make_mesh(tcfg.fsdp, devices)
    mesh_lib.check_batch_size(tcfg.batch_size, mesh)
    config_dict = config.to_dict()
    config_dict.setdefault("family", families.name_of(config))
    frozen = run.family.frozen_identity()
    if frozen:  # which frozen models (and which of their checkpoints) the parameters go with
        config_dict["frozen"] = frozen
    lead = jax.process_index() == 0
    workdir = files.check_writable_dir(workdir, "--workdir")
    iterator = data_lib.make_train_iterator(
        config.data, seed=config.seed, global_batch_size=tcfg.batch_size,
        tokenizer=run.family.tokenizer, text_cache=run.family.text_cache(),
        latent_cache=run.family.latent_cache(),
        process_index=jax.process_index(),
        process_count=jax.process_count())
    with distributed.lead_holds(files.ExclusiveLock(workdir, "training", enabled=lead, hint=(
            "wait for it to finish, stop it (kill -TERM saves a checkpoint first), or pass "
            "another --workdir"))):
        return _train_locked(run, config_dict, workdir, mesh, iterator, lead, progress)


_WATCHED = ("loss", "grad_norm", "params_finite")


@jax.jit
def _watch(watch: dict, metrics: dict, step: jax.Array) -> dict:
    """The NaN guard's device-side record, updated every step without a host sync: whether
    every step so far was finite, and the first one that was not (its step and metrics)."""
    first = watch["ok"] & ~metrics["finite"]
    bad = {k: jnp.where(first, metrics[k], watch["bad"][k]) for k in _WATCHED}
    return dict(ok=watch["ok"] & metrics["finite"], step=jnp.where(first, step, watch["step"]),
                bad=bad)


def _fresh_watch() -> dict:
    return dict(ok=jnp.asarray(True), step=jnp.asarray(-1, jnp.int32),
                bad=dict(loss=jnp.float32(0), grad_norm=jnp.float32(0),
                         params_finite=jnp.asarray(True)))


def _train_locked(run: Run, config_dict: dict, workdir: str, mesh, iterator, lead: bool,
                  progress: bool) -> TrainState:
    family = run.family
    config, tcfg = run.config, run.config.train
    root = jax.random.key(config.seed)
    abstract = jax.eval_shape(run.create_state, root)
    shardings = mesh_lib.state_shardings(abstract, mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    try:
        restored = ckpt.restore(abstract, lambda s, stored: check_compatible(
            ckpt.directory, s, stored, config_dict))
    except BaseException:
        ckpt.close()
        raise
    if restored is None:
        pretrained = family.pretrained_params()
        if pretrained is None:
            state = jax.jit(run.create_state, out_shardings=shardings)(root)
        else:  # read from a folder: placed as arguments, never compiled in as constants
            params = jax.tree_util.tree_map(mesh_lib.put, pretrained, shardings.params)
            state = jax.jit(lambda p, k: init_state(p, run.tx, jax.random.split(k)[1]),
                            out_shardings=shardings)(params, root)
        start = 0
    else:
        start, state, data_state = restored.step, restored.state, restored.data_state
        if data_state is not None:
            iterator.set_state(data_state)
        if lead:
            print(f"[t2i_jax] resumed from {ckpt.directory}/{start}", file=sys.stderr)
    if start >= tcfg.num_steps and lead:
        print(f"[t2i_jax] the checkpoint is at step {start} >= train.num_steps={tcfg.num_steps}: "
              "nothing to train (raise --config.train.num_steps to go on).", file=sys.stderr)

    batch_sharding = mesh_lib.batch_sharding(mesh)
    # Frozen models' parameters (an autoencoder, a CLIP, a T5) are laid out like the trained
    # ones: replicated, or with fsdp > 1 split over "fsdp"; scalar hyperparameters replicated.
    hp_host = family.hparams()
    hp_shardings = jax.tree_util.tree_map(lambda x: mesh_lib.leaf_sharding(np.shape(x), mesh),
                                          hp_host)
    step_fn = jax.jit(make_train_step(family, run.optim, run.tx),
                      in_shardings=(shardings, batch_sharding, hp_shardings),
                      out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    writer = MetricWriter(workdir, resume_step=start, enabled=lead)
    # Every process samples the grid (its program spans all devices); process 0 writes it.
    grid = (_GridSampler(family, workdir, writer, mesh, lead) if family.generates else
            _Preview(family, workdir, writer, lead) if family.preview is not None else None)

    data_state = iterator.get_state()
    hp = jax.tree_util.tree_map(mesh_lib.put, hp_host, hp_shardings)  # on the devices once
    watch = _fresh_watch()

    def guard():
        """Stops the run if any step so far was not finite: called before every save, grid and
        log line, so no checkpoint ever holds a diverged state (the metrics stay on the
        devices in between: no host sync per step)."""
        w = distributed.to_host(watch)
        if not w["ok"]:
            raise NonFiniteLossError(_divergence(w["bad"], int(w["step"]), ckpt.latest_good(),
                                                 run.optim.learning_rate))

    def save(step):
        guard()
        statistics = None
        if step == tcfg.num_steps and family.final_statistics is not None:
            # e.g. the autoencoder's scale factor: from the EMA parameters, on every process alike
            statistics = family.final_statistics(distributed.to_host(state.ema_params))
            if lead:
                print(f"[t2i_jax] final statistics: {_brief(statistics)}", file=sys.stderr)
        ckpt.save(step, state, data_state, config_dict, statistics)

    stop: dict = {}
    previous = _install_stop_handlers(stop)
    vote = distributed.StopVote(mesh)  # a signal to any process stops all after the same step
    stopping = False
    from tqdm import tqdm
    bar = tqdm(total=tcfg.num_steps, initial=start,
               disable=not (progress and lead) or start >= tcfg.num_steps,
               dynamic_ncols=True, desc="train")
    t_log, n_log = time.perf_counter(), 0
    step = start

    def next_batch():
        local = {k: v for k, v in next(iterator).items() if k in family.batch_keys}
        return mesh_lib.global_batch(local, mesh)

    try:
        with jax.set_mesh(mesh):
            batch = next_batch() if step < tcfg.num_steps else None
            while step < tcfg.num_steps:
                state, metrics = step_fn(state, batch, hp)
                data_state = iterator.get_state()  # exactly step + 1 batches consumed
                step += 1
                n_log += 1
                if step < tcfg.num_steps:
                    batch = next_batch()  # read on the host while the step runs
                watch = _watch(watch, metrics, jnp.int32(step))
                bar.update(1)
                if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                    guard()
                    metrics = distributed.to_host(metrics)
                    del metrics["params_finite"], metrics["finite"]
                    now = time.perf_counter()
                    metrics["images_per_s"] = n_log * tcfg.batch_size / (now - t_log)
                    writer.scalars(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    img_s=f"{metrics['images_per_s']:.1f}")
                    t_log, n_log = time.perf_counter(), 0
                stopping = vote(bool(stop))  # after the log line: a signal during it counts
                if step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps or stopping:
                    save(step)
                if grid is not None and tcfg.sample_every and step % tcfg.sample_every == 0 \
                        and step != tcfg.num_steps:
                    guard()
                    grid(state, step)
                if stopping:
                    if lead or not vote.single:  # each process says which step it saved
                        by = stop["stop"] if stop else "a signal to another process"
                        print(f"[t2i_jax] stopped by {by} at step {step}; checkpoint {step} "
                              f"saved. Run the same command to resume.", file=sys.stderr)
                    break
            else:
                guard()
                if grid is not None and tcfg.sample_every and step > start:
                    grid(state, step)
    except Interrupted as e:
        latest = ckpt.latest_good()
        raise Interrupted(e.signum, f"{e.message} (at step {step}); "
                          + (f"the newest checkpoint, step {latest}, is intact: rerun the same "
                             "command to resume from it." if latest is not None else
                             "there is no checkpoint yet.")) from None
    finally:
        bar.close()
        _restore_handlers(previous)
        writer.close()
        latest = ckpt.latest_good()
        ckpt.close()
    if lead and not stopping:
        _print_summary(family, workdir, os.path.join(ckpt.directory, str(latest)))
    return state


def _brief(statistics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in statistics.items() if isinstance(v, float))


def _print_summary(family: Family, workdir: str, checkpoint: str) -> None:
    """Where the run's results are, and the command that comes next."""
    samples = os.path.join(workdir, "samples")
    grids = sorted(f for f in os.listdir(samples) if f.endswith(".png")) if os.path.isdir(samples) else []
    grid = f"; newest sample grid {os.path.join(samples, grids[-1])}" if grids else ""
    print(f"[t2i_jax] done: checkpoint {checkpoint}{grid}.\n[t2i_jax] next: "
          f"{family.next_command(workdir)}", file=sys.stderr)


class _Preview:
    """A family that draws no samples but shows its work (an autoencoder: test images above
    their reconstructions): family.preview(EMA params) as a PNG grid, as _GridSampler's."""

    def __init__(self, family, workdir: str, writer: MetricWriter, lead: bool = True):
        self.family, self.writer, self.lead = family, writer, lead
        self.dir = os.path.join(workdir, "samples")
        self.fn = jax.jit(family.preview)

    def __call__(self, state: TrainState, step: int) -> str:
        x = distributed.to_host(self.fn(state.ema_params))
        path = os.path.join(self.dir, f"step_{step:07d}.png")
        if self.lead:
            grid = images.make_grid(images.to_uint8(x), rows=self.family.preview_rows,
                                    scale=max(1, 64 // self.family.image_shape[0]))
            images.save_png(path, grid)
            self.writer.image(step, "samples", grid)
        return path


class _GridSampler:
    """Every train.sample_every steps: a PNG grid (rows = the data set's fixed prompts) from the
    EMA parameters, to DIR/samples/step_<N>.png and to TensorBoard."""

    def __init__(self, family, workdir: str, writer: MetricWriter, mesh, lead: bool = True):
        from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
        cfg = family.config
        self.family, self.writer, self.lead = family, writer, lead
        self.dir = os.path.join(workdir, "samples")
        self.prompts = family.grid_prompts()
        self.n = cfg.train.samples_per_prompt
        self.cond = family.grid_condition(self.prompts, self.n)
        guided = family.conditioning.guidable and float(cfg.sample.guidance_weight) != 0.0
        self.w = float(cfg.sample.guidance_weight) if guided else 0.0
        rep = mesh_lib.replicated(mesh)  # the inputs of a program over every process's devices
        self.cond = mesh_lib.put(self.cond, rep)
        self.ids = mesh_lib.put(np.arange(len(self.prompts) * self.n, dtype=np.int32), rep)
        self.rng = mesh_lib.put(jax.random.fold_in(jax.random.key(cfg.seed), GRID_SEED_STREAM), rep)
        options = SampleOptions.from_config(cfg.sample)
        if family.inpaint:  # GLIDE's model fills the grid images' right half
            options = dataclasses.replace(options, inpaint="glide")
        self.generate = make_generate_fn(family, options, guided)

    def __call__(self, state: TrainState, step: int) -> str:
        # what sampling runs from the EMA parameters (a LoRA's factors merged into its base)
        params = self.family.sampling_params(state.ema_params)
        x = self.generate(params, self.cond, self.rng, self.w, self.ids)
        path = os.path.join(self.dir, f"step_{step:07d}.png")
        if self.lead:
            grid = images.make_grid(images.to_uint8(distributed.to_host(x)),
                                    rows=len(self.prompts),
                                    labels=[f'"{p}"' if p else "(no prompt)" for p in self.prompts],
                                    scale=max(1, 64 // self.family.output_shape[0]))
            images.save_png(path, grid)
            self.writer.image(step, "samples", grid)
        else:
            distributed.to_host(x)  # process 0 gathers the images from every process
        return path
