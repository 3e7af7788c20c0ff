"""A probe of bad inputs and faults, as a user meets them: each case is a command run as its own
process, and the table says its exit code, how many lines it printed on stderr, and whether it
printed a traceback, called a user's mistake "a bug", left files behind, wrote garbage with
exit 0, or hung. Run by hand from the repository root (about 10 minutes on 2 CPU cores):

    python bench/probe_inputs.py [--dir /tmp/probe]

It makes what it needs in --dir: the embedded data, a tiny digits model trained 4 steps, a tiny
random T5 and CLIP in the publisher's layout, and the bad files.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
           JAX_COMPILATION_CACHE_DIR="")


def make_fixtures(d: str) -> dict:
    from PIL import Image
    os.makedirs(d, exist_ok=True)
    f = {"data": os.path.join(d, "data"), "wd": os.path.join(d, "digits"),
         "t5": os.path.join(d, "t5"), "clip": os.path.join(d, "clip")}
    if not os.path.isdir(os.path.join(f["wd"], "checkpoints")):
        subprocess.run([sys.executable, "train.py", "--config", "tests/tiny_config.py",
                        "--workdir", f["wd"], f"--config.data.data_dir={f['data']}",
                        "--config.train.num_steps=4", "--progress=false"], cwd=ROOT, env=ENV,
                       check=True, capture_output=True)
    for kind in ("t5", "clip"):
        if not os.path.isdir(f[kind]):
            subprocess.run([sys.executable, "-m", "t2i_jax.models.pretrained", "make-tiny",
                            f[kind], "--kind", kind], cwd=ROOT, env=ENV, check=True,
                           capture_output=True)
    rng = np.random.default_rng(0)
    img = lambda name: os.path.join(d, name)  # noqa: E731
    Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)).save(img("g16.png"))
    p = Image.fromarray((np.arange(256).reshape(16, 16) % 2).astype(np.uint8), "P")
    p.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    p.save(img("palette.png"))
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(img("grey.png"))
    Image.fromarray(rng.integers(0, 256, (20, 16), dtype=np.uint8)).save(img("wrong_size.png"))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(img("black.png"))
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(img("grey128.png"))
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(img("rgba.png"))
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK").save(img("cmyk.jpg"))
    Image.new("L", (9000, 9000)).save(img("huge.png"))
    data = open(img("grey.png"), "rb").read()
    open(img("truncated.png"), "wb").write(data[:len(data) // 2])
    open(img("notes.png"), "w").write("not an image")
    open(img("a_file"), "w").write("")
    open(img("prompts_binary.txt"), "wb").write(b"\xff\xfe\x00seven\n")
    bad = os.path.join(d, "t5_damaged")
    if not os.path.isdir(bad):
        shutil.copytree(f["t5"], bad)
        open(os.path.join(bad, "spiece.model"), "wb").write(b"\x00garbage")
    nan = os.path.join(d, "t5_nan")
    if not os.path.isdir(nan):
        from safetensors.numpy import load_file, save_file
        shutil.copytree(f["t5"], nan)
        t = load_file(os.path.join(nan, "model.safetensors"))
        k = sorted(t)[0]
        t[k] = np.full_like(t[k], np.nan)
        save_file(t, os.path.join(nan, "model.safetensors"), metadata={"format": "pt"})
    wide = os.path.join(d, "t5_wide")
    if not os.path.isdir(wide):
        shutil.copytree(f["t5"], wide)
        cfg = json.load(open(os.path.join(wide, "config.json")))
        cfg["d_ff"] *= 2
        json.dump(cfg, open(os.path.join(wide, "config.json"), "w"))
    crash = os.path.join(d, "crash.py")
    open(crash, "w").write(
        "import faulthandler, os, sys\nfaulthandler.enable()\n"
        "if '--process_id=1' in sys.argv:\n"
        "    sys.stderr.write('*** Check failure stack trace: ***\\n' + '    @ 0x7f00 f()\\n' * 17)\n"
        "    sys.stderr.flush(); os.abort()\n")
    f["d"] = d
    return f


def cases(f: dict) -> list:
    """(name, argv, outdir or None (what must not be left behind on a refusal), expect 0?)"""
    d, wd = f["d"], f["wd"]
    out = lambda name: os.path.join(d, "out", name)  # noqa: E731
    S = [sys.executable, "sample.py", "--workdir", wd, "--prompt", "seven", "--num_per_prompt",
         "2", "--steps", "2", "--no_progress"]
    E = [sys.executable, "-m", "t2i_jax.models.pretrained", "encode"]
    T = [sys.executable, "train.py", "--config", "tests/tiny_config.py",
         f"--config.data.data_dir={f['data']}", "--progress=false"]
    p = lambda name: os.path.join(d, name)  # noqa: E731
    inp = lambda name, *more: S + ["--inpaint", p(name), *more]  # noqa: E731
    c = [
        ("inpaint 16-bit PNG", inp("g16.png", "--mask_box", "0,0,4,4"), True),
        ("inpaint palette PNG", inp("palette.png", "--mask_box", "0,0,4,4"), True),
        ("inpaint RGBA PNG on a grey model", inp("rgba.png", "--mask_box", "0,0,4,4"), True),
        ("inpaint CMYK JPEG", inp("cmyk.jpg", "--mask_box", "0,0,4,4"), True),
        ("inpaint missing file", inp("missing.png", "--mask_box", "0,0,4,4"), False),
        ("inpaint a directory", inp("out", "--mask_box", "0,0,4,4"), False),
        ("inpaint a text file named .png", inp("notes.png", "--mask_box", "0,0,4,4"), False),
        ("inpaint truncated PNG", inp("truncated.png", "--mask_box", "0,0,4,4"), False),
        ("inpaint 9000x9000 image", inp("huge.png", "--mask_box", "0,0,4,4"), False),
        ("inpaint wrong size", inp("wrong_size.png", "--mask_box", "0,0,4,4"), False),
        ("mask all black", inp("grey.png", "--mask", p("black.png")), False),
        ("mask grey 128", inp("grey.png", "--mask", p("grey128.png")), False),
        ("mask_box negative", inp("grey.png", "--mask_box", "-1,0,4,4"), False),
        ("mask_box three numbers", inp("grey.png", "--mask_box", "0,0,4"), False),
        ("mask and mask_box", inp("grey.png", "--mask", p("black.png"), "--mask_box", "0,0,4,4"),
         False),
        ("guidance nan", S + ["--guidance", "nan"], False),
        ("guidance 1e30, no thresholding", S + ["--guidance", "1e30", "--thresholding", "none"],
         False),
        ("steps 0", S + ["--steps", "0"], False),
        ("steps 100000", S + ["--steps", "100000"], False),
        ("eta 2", S + ["--eta", "2"], False),
        ("num_per_prompt 0", S + ["--num_per_prompt", "0"], False),
        ("batch_size 0", S + ["--batch_size", "0"], False),
        ("prompt not UTF-8", S + ["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
         False),
        ("prompts_file missing", S + ["--prompts_file", p("missing.txt")], False),
        ("prompts_file not text", S + ["--prompts_file", p("prompts_binary.txt")], False),
        ("outdir is a file", S + ["--outdir", p("a_file")], False),
        ("outdir inside checkpoints", S + ["--outdir", os.path.join(wd, "checkpoints", "x")],
         False),
        ("workdir missing", [sys.executable, "sample.py", "--workdir", p("nowhere"), "--prompt",
                             "a"], False),
        ("workdir is a T5 directory", [sys.executable, "sample.py", "--workdir", f["t5"],
                                       "--prompt", "a"], False),
        ("step that does not exist", S + ["--step", "999"], False),
        ("sampler unknown", S + ["--sampler", "euler_a"], False),
        ("frozen without =", S + ["--frozen", "abc"], False),
        ("frozen to a missing dir", S + ["--frozen", f"a={p('nowhere')}"], False),
        ("low_res on a base model", S + ["--low_res", p("grey.png")], False),
        ("classifier that is a diffusion model", S + ["--classifier", wd], False),
        ("variations on a base model", S + ["--variations", p("grey.png")], False),
        ("train: config missing", T[:2] + ["--config", p("none.py"), "--workdir", p("w1")],
         False),
        ("train: batch not divisible", T + ["--workdir", p("w2"),
                                            "--config.train.batch_size=3"], False),
        ("train: learning rate -1", T + ["--workdir", p("w3"),
                                         "--config.train.learning_rate=-1"], False),
        ("train: unknown key", T + ["--workdir", p("w4"), "--config.train.bogus=1"], False),
        ("train: workdir is a file", T + ["--workdir", p("a_file")], False),
        ("encode: missing directory", E + [p("nowhere"), "--text", "a", "--out", out("e1.npz")],
         False),
        ("encode: --out a directory", E + [f["t5"], "--text", "a", "--out", d], False),
        ("encode: --out under a file", E + [f["t5"], "--text", "a", "--out",
                                            os.path.join(p("a_file"), "x.npz")], False),
        ("encode: NaN weights", E + [p("t5_nan"), "--text", "a", "--out", out("e2.npz")], False),
        ("encode: damaged spiece.model", E + [p("t5_damaged"), "--text", "a", "--out",
                                              out("e3.npz")], False),
        ("encode: config.json that does not fit", E + [p("t5_wide"), "--text", "a", "--out",
                                                       out("e4.npz")], False),
        ("encode: text not UTF-8", E + [f["t5"], "--text",
                                        b"caf\xe9".decode("utf-8", "surrogateescape"),
                                        "--out", out("e5.npz")], False),
        ("encode: 10,000 characters", E + [f["t5"], "--text", "red " * 2500, "--out",
                                           out("e6.npz")], True),
        ("encode: 16-bit image into CLIP", E + [f["clip"], "--image", p("g16.png"), "--out",
                                                out("e7.npz")], True),
        ("encode: truncated image", E + [f["clip"], "--image", p("truncated.png"), "--out",
                                         out("e8.npz")], False),
        ("make-tiny onto a file", [sys.executable, "-m", "t2i_jax.models.pretrained",
                                   "make-tiny", p("a_file")], False),
        ("launch: no command", [sys.executable, "-m", "t2i_jax.launch", "--num_processes", "2"],
         False),
        ("launch: a process crashes", [sys.executable, "-m", "t2i_jax.launch", "--num_processes",
                                       "2", "--grace", "1", "--", p("crash.py")], False),
        ("reproduce sdg: missing workdir", [sys.executable, "-m", "t2i_jax.evaluation.reproduce",
                                            "sdg", "--workdir", p("nowhere"), "--out",
                                            out("sdg")], False),
    ]
    for i, (name, argv, ok) in enumerate(c):
        if argv[1] == "sample.py" and "--outdir" not in argv:
            argv = argv + ["--outdir", out(f"s{i}")]
        c[i] = (name, argv, ok)
    return c


TRACE = re.compile(r"Traceback \(most recent call last\)|^\s*@\s+0x|File \".*\", line \d+", re.M)


def run_case(argv, timeout=180):
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    return proc.returncode, out, err, hung, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/t2i_probe")
    ap.add_argument("--only", default="", help="a substring of the case names to run")
    a = ap.parse_args()
    f = make_fixtures(a.dir)
    rows, counts = [], dict(garbage=0, traceback=0, bug=0, hang=0, left=0, over20=0)
    for name, argv, should_work in cases(f):
        if a.only and a.only not in name:
            continue
        outdir = argv[argv.index("--outdir") + 1] if "--outdir" in argv else \
            argv[argv.index("--out") + 1] if "--out" in argv else None
        if outdir and os.path.exists(outdir) and os.path.isdir(outdir) and "out" in outdir:
            shutil.rmtree(outdir)
        code, out, err, hung, secs = run_case(argv)
        lines = [x for x in err.splitlines() if x.strip()]
        trace = bool(TRACE.search(err))
        bug = "a bug" in err
        # a refusal that left something behind (a job that ran and failed keeps its job.json
        # and finished shards on purpose: the rerun resumes it)
        left = bool(code not in (0, None) and outdir and "out" in outdir and os.path.exists(outdir)
                    and not should_work and not os.path.exists(os.path.join(outdir, "job.json")))
        garbage = code == 0 and not should_work
        for k, v in (("garbage", garbage), ("traceback", trace), ("bug", bug), ("hang", hung),
                     ("left", left), ("over20", len(lines) > 20)):
            counts[k] += bool(v)
        last = (lines[-1] if lines else "")[:150].replace("|", "/")
        rows.append(f"| {name} | {code} | {len(lines)} | {'yes' if trace else ''} | "
                    f"{'yes' if bug else ''} | {'yes' if left else ''} | {secs:.0f} | {last} |")
        print(rows[-1], flush=True)
    print("\n| case | exit | stderr lines | traceback | \"bug\" | left files | s | last line |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(rows)} cases: {counts['garbage']} exit-0 garbage, {counts['traceback']} "
          f"tracebacks, {counts['bug']} 'bug' for a user's mistake, {counts['hang']} hangs, "
          f"{counts['left']} refusals that left files, {counts['over20']} over 20 lines.")


if __name__ == "__main__":
    main()
