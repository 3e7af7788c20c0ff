"""The training loop behind train.py: build, resume, step, log, sample, checkpoint, stop cleanly.

    state = train(config, workdir)

Resumes from the newest checkpoint in workdir/checkpoints automatically (refusing another
model's checkpoints), saves every train.checkpoint_every steps, at the end and when SIGTERM or
SIGINT arrives (then returns early: a preempted job exits cleanly), keeps the last
train.keep_checkpoints (0: all). A second signal stops at once (errors.Interrupted). A non-finite
loss, gradient norm or parameter raises NonFiniteLossError before anything is saved, so the last
good checkpoint is never overwritten. One process trains a workdir at a time (a lock).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import files, images
from t2i_jax.conditioning import Condition, class_condition, text_condition
from t2i_jax.config_utils import check_train_config
from t2i_jax.diffusion import make_schedule
from t2i_jax.errors import Interrupted
from t2i_jax.models.denoiser import Denoiser, ModelConfig
from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
from t2i_jax.training import mesh as mesh_lib
from t2i_jax.training.checkpoint import Checkpointer, check_compatible
from t2i_jax.training.state import OptimConfig, TrainState, init_state, make_optimizer
from t2i_jax.training.step import LossConfig, hparams, make_train_step, null_of
from t2i_jax.training.writers import MetricWriter

BATCH_KEYS = ("image", "tokens", "mask", "label")
GRID_SEED_STREAM = 7  # the progress grid's noise: fold_in(key(seed), 7), the same at every step


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Experiment:
    """What a config describes, built once: the model and everything the step closes over."""
    config: Any
    model: Denoiser
    schedule: Any
    optim: OptimConfig
    loss: LossConfig
    tx: Any
    image_shape: tuple

    @classmethod
    def from_config(cls, config) -> "Experiment":
        model = Denoiser(ModelConfig.from_config(config.model))
        d = config.diffusion
        schedule = make_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)
        optim = OptimConfig.from_config(config.train)
        t = config.train
        if not 0.0 <= t.p_uncond <= 1.0:
            raise ValueError(f"train.p_uncond must be in [0, 1], got {t.p_uncond}.")
        loss = LossConfig(prediction=d.prediction, weighting=t.loss_weighting,
                          min_snr_gamma=t.min_snr_gamma, p_uncond=t.p_uncond)
        image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
        if model.cfg.unet.out_channels != config.data.channels:
            raise ValueError(f"model.unet.out_channels={model.cfg.unet.out_channels} must equal "
                             f"data.channels={config.data.channels}.")
        return cls(config, model, schedule, optim, loss, make_optimizer(optim), image_shape)

    @property
    def max_length(self) -> int:
        text = self.model.cfg.text
        return text.max_length if text is not None else 16

    def init_params(self, key: jax.Array):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        return self.model.init({"params": key, "dropout": key}, x, t, null_of(self.model))

    def create_state(self, key: jax.Array) -> TrainState:
        k_init, k_root = jax.random.split(key)
        return init_state(self.init_params(k_init), self.tx, k_root)

    def grid_prompts(self) -> list:
        """The data set's fixed prompts for progress grids; a class-conditional model's are its
        class names (one row per class)."""
        from t2i_jax import data as data_lib
        if self.model.cfg.text is not None:
            return list(data_lib.sample_prompts(self.config.data))
        return list(data_lib.class_names(self.config.data))

    def prompt_condition(self, prompts) -> Condition:
        """Prompts as the model's Condition; a class-conditional model takes class names."""
        if self.model.cfg.text is not None:
            return text_condition(prompts, self.max_length)
        from t2i_jax import data as data_lib
        names = list(data_lib.class_names(self.config.data) or [])
        unknown = [p for p in prompts if p not in names]
        if unknown:
            raise ValueError(f"this model is class-conditional; {unknown} are not class names of "
                             f"{self.config.data.name} ({names}).")
        return class_condition([names.index(p) for p in prompts])


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


def _finite(metrics: dict) -> bool:
    """The NaN guard: the loss, the gradient norm and every updated parameter are finite."""
    return bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
                and metrics["params_finite"])


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


def train(config, workdir: str, *, devices: Optional[list] = None, progress: bool = True) -> TrainState:
    """Trains (or resumes) the experiment of `config` in `workdir`; returns the final state.

    Refuses bad config values, an unwritable workdir and a workdir another process trains in
    before anything is written there."""
    from t2i_jax import data as data_lib
    check_train_config(config)
    exp = Experiment.from_config(config)
    tcfg = config.train
    mesh = mesh_lib.make_mesh(tcfg.fsdp, devices)
    mesh_lib.check_batch_size(tcfg.batch_size, mesh)
    config_dict = config.to_dict()
    lead = jax.process_index() == 0
    workdir = files.check_writable_dir(workdir, "--workdir") if lead else os.path.abspath(workdir)
    iterator = data_lib.make_train_iterator(
        config.data, seed=config.seed, global_batch_size=tcfg.batch_size,
        max_length=exp.max_length, process_index=jax.process_index(),
        process_count=jax.process_count())
    with files.ExclusiveLock(workdir, "training", enabled=lead, hint=(
            "wait for it to finish, stop it (kill -TERM saves a checkpoint first), or pass "
            "another --workdir")):
        return _train_locked(exp, config_dict, workdir, mesh, iterator, lead, progress)


def _train_locked(exp: "Experiment", config_dict: dict, workdir: str, mesh, iterator, lead: bool,
                  progress: bool) -> TrainState:
    config, tcfg = exp.config, exp.config.train
    root = jax.random.key(config.seed)
    abstract = jax.eval_shape(exp.create_state, root)
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
        state = jax.jit(exp.create_state, out_shardings=shardings)(root)
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
    step_fn = jax.jit(make_train_step(exp.model, exp.schedule, exp.optim, exp.loss, exp.tx),
                      in_shardings=(shardings, batch_sharding, mesh_lib.replicated(mesh)),
                      out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    writer = MetricWriter(workdir, resume_step=start, enabled=lead)
    grid = _GridSampler(exp, workdir, writer) if lead else None

    data_state = iterator.get_state()
    hp = hparams(exp.loss)

    def save(step):
        ckpt.save(step, state, data_state, config_dict)

    stop: dict = {}
    previous = _install_stop_handlers(stop)
    from tqdm import tqdm
    bar = tqdm(total=tcfg.num_steps, initial=start,
               disable=not (progress and lead) or start >= tcfg.num_steps,
               dynamic_ncols=True, desc="train")
    t_log, n_log = time.perf_counter(), 0
    step = start

    def next_batch():
        local = {k: v for k, v in next(iterator).items() if k in BATCH_KEYS}
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
                metrics = jax.device_get(metrics)
                if not _finite(metrics):
                    raise NonFiniteLossError(_divergence(metrics, step, ckpt.latest_good(),
                                                         exp.optim.learning_rate))
                del metrics["params_finite"]
                bar.update(1)
                if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                    now = time.perf_counter()
                    metrics["images_per_s"] = n_log * tcfg.batch_size / (now - t_log)
                    writer.scalars(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    img_s=f"{metrics['images_per_s']:.1f}")
                    t_log, n_log = time.perf_counter(), 0
                if step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps or stop:
                    save(step)
                if grid is not None and tcfg.sample_every and step % tcfg.sample_every == 0 \
                        and step != tcfg.num_steps:
                    grid(state, step)
                if stop:
                    if lead:
                        print(f"[t2i_jax] stopped by {stop['stop']} at step {step}; checkpoint "
                              f"saved. Run the same command to resume.", file=sys.stderr)
                    break
            else:
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
    if lead and not stop:
        _print_summary(exp, workdir, os.path.join(ckpt.directory, str(latest)))
    return state


def _print_summary(exp: "Experiment", workdir: str, checkpoint: str) -> None:
    """Where the run's results are, and the sampling command that comes next."""
    samples = os.path.join(workdir, "samples")
    grids = sorted(f for f in os.listdir(samples) if f.endswith(".png")) if os.path.isdir(samples) else []
    grid = f"; newest sample grid {os.path.join(samples, grids[-1])}" if grids else ""
    print(f"[t2i_jax] done: checkpoint {checkpoint}{grid}.\n[t2i_jax] next: python sample.py "
          f"--workdir {shlex.quote(workdir)} --prompt {shlex.quote(exp.grid_prompts()[0])} "
          f"--outdir {shlex.quote(os.path.join(workdir, 'samples_out'))}", file=sys.stderr)


class _GridSampler:
    """Every train.sample_every steps: a PNG grid (rows = the data set's fixed prompts) from the
    EMA parameters, to DIR/samples/step_<N>.png and to TensorBoard."""

    def __init__(self, exp: Experiment, workdir: str, writer: MetricWriter):
        cfg = exp.config
        self.exp, self.writer = exp, writer
        self.dir = os.path.join(workdir, "samples")
        self.prompts = exp.grid_prompts()
        self.n = cfg.train.samples_per_prompt
        self.cond = exp.prompt_condition([p for p in self.prompts for _ in range(self.n)])
        self.w = float(cfg.sample.guidance_weight)
        self.rng = jax.random.fold_in(jax.random.key(cfg.seed), GRID_SEED_STREAM)
        self.generate = make_generate_fn(exp.model, exp.schedule, exp.image_shape,
                                         null_of(exp.model), SampleOptions.from_config(cfg.sample),
                                         prediction=cfg.diffusion.prediction)

    def __call__(self, state: TrainState, step: int) -> str:
        ids = jnp.arange(len(self.prompts) * self.n)
        x = self.generate(state.ema_params, self.cond, self.rng, self.w, ids)
        grid = images.make_grid(images.to_uint8(jax.device_get(x)), rows=len(self.prompts),
                                scale=max(1, 64 // self.exp.image_shape[0]))
        path = os.path.join(self.dir, f"step_{step:07d}.png")
        images.save_png(path, grid)
        self.writer.image(step, "samples", grid)
        return path
