"""Checkpoint save and restore times: orbax given the jax.Arrays as they are vs host copies.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/checkpoint_save.py \\
        [--config tests/tiny_config.py] [--saves 3] [--fsdp 1]

Orbax slices every replicated jax.Array into per-device pieces before writing, which compiles
small programs per leaf (many, on many devices); training/checkpoint.py therefore copies fully
addressable arrays to the host and saves NumPy arrays. This measures both ways on the config's
TrainState (first save = a fresh process's first, with its compilations), the integrity record,
and a verified restore onto the mesh. Prints a markdown table; the last line is it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2i_jax.xla_flags import apply_tuned_flags  # noqa: E402

apply_tuned_flags()

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tests/tiny_config.py")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--fsdp", type=int, default=1)
    a = p.parse_args()

    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from t2i_jax.config_utils import load_config
    from t2i_jax import checkpoint as ckpt_lib
    from t2i_jax import integrity, sharding as mesh_lib
    from t2i_jax.training.loop import Run
    exp = Run.from_config(load_config(a.config))
    mesh = mesh_lib.make_mesh(a.fsdp)
    abstract = jax.eval_shape(exp.create_state, jax.random.key(0))
    shardings = mesh_lib.state_shardings(abstract, mesh)
    state = jax.jit(exp.create_state, out_shardings=shardings)(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    root = tempfile.mkdtemp(prefix="t2i_ckpt_bench_")
    rows = []
    try:
        # Host copies first: their first save also pays orbax's one-time start-up.
        for name, tree in (("host copies (t2i_jax)", ckpt_lib._host_tree),
                           ("jax.Array (orbax slices)", ckpt_lib._as_tree)):
            mgr = ocp.CheckpointManager(os.path.join(root, name.split()[0]), options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=False))
            times = []
            for step in range(1, a.saves + 1):
                t0 = time.perf_counter()
                mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(state))),
                         force=True)
                mgr.wait_until_finished()
                times.append(time.perf_counter() - t0)
            mgr.close()
            rows.append(dict(method=name, first_save_s=times[0],
                             later_save_s=min(times[1:]) if len(times) > 1 else None))
        ck = ckpt_lib.Checkpointer(os.path.join(root, "checkpointer"), keep=0)
        ck.save(1, state, None, exp.config.to_dict())
        step_dir = os.path.join(ck.directory, "1")
        t0 = time.perf_counter()
        integrity.write(step_dir)
        t_record = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert integrity.verify(step_dir) is None
        t_verify = time.perf_counter() - t0
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        t0 = time.perf_counter()
        ck.restore(target, step=1)
        t_restore = time.perf_counter() - t0
        ck.close()
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{a.config}: {n_params:,} parameters, checkpoint {size / 2**20:.1f} MiB, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices, fsdp {a.fsdp}, "
          f"{platform.machine()}, jax {jax.__version__}, orbax {ocp.__version__}\n")
    print("| save | first save s | later save s |\n|---|---:|---:|")
    for r in rows:
        later = f"{r['later_save_s']:.3f}" if r["later_save_s"] is not None else "-"
        print(f"| {r['method']} | {r['first_save_s']:.3f} | {later} |")
    print(f"\nintegrity record: write {t_record:.3f} s, verify {t_verify:.3f} s; verified restore "
          f"onto the mesh {t_restore:.3f} s")
    print(json.dumps(dict(config=a.config, params=n_params, bytes=size, rows=rows,
                          record_s=t_record, verify_s=t_verify, restore_s=t_restore,
                          devices=jax.device_count())))


if __name__ == "__main__":
    main()
