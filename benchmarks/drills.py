#!/usr/bin/env python
"""Failure drills (issue 15, point 4): many trials of random faults against real 2-rank
pre-training runs, each followed by the recovery a user would make and a check of it.

    python benchmarks/drills.py --trials 20          # the full drill (bert-tiny, 2 ranks, CPU)
    python benchmarks/drills.py --quick              # one trial of each kind

Every trial is a run of launchers/pretrain.py (bert-tiny, ZeRO-2, 2 ranks, 6 steps, a checkpoint
every 2 steps) with one fault, drawn at random:

  sigkill       one rank (random) SIGKILLed at a random moment: 0-0.25 s after a random logged step,
                or during start-up
  sigkill-save  one rank SIGKILLed while a checkpoint (random) is being written: as soon as its
                tag directory appears (plus 0-0.02 s), before `latest` names it if the kill is quick
                enough (the table says where each kill landed)
  enospc        a full disk: a random rank's first write of a random checkpoint fails (ENOSPC)
  nan-stop      a NaN loss on a random rank at a random step, training.nonfinite_loss "stop"
  nan-skip      the same with "skip"
  truncate      a random file of the last checkpoint cut short (the run had died after it)
  corrupt       a random byte of a random file of the last checkpoint changed

The SIGKILL trials alternate between the real ``deepspeed`` launcher (which stops the other rank
when one dies) and ranks started directly with nobody to stop the survivor: then the survivor
must exit on its own (gloo sees its peer gone); one still alive after --hang-after seconds
counts as a hang. Each trial checks: the job exits non-zero within that bound (or, for
nan-skip, finishes); `latest` names a checkpoint whose files are all whole, never the one being
written; the recovery (--resume from `latest`, a fresh start when no checkpoint was complete,
or --resume-tag on the checkpoint the refusal of a damaged one names) reproduces the loss curve
and final evaluation of one uninterrupted run bit for bit. Anything else is counted as lost.
The table goes to stdout and, with every trial's record, to OUT/drills.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT
PRETRAIN = ROOT / "launchers" / "pretrain.py"
STEPS, SAVE_EVERY = 6, 2
TAGS = [f"global_step{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
KINDS = ("sigkill", "sigkill-save", "enospc", "nan-stop", "nan-skip", "truncate", "corrupt")
NPROC = 2


# --- launching and watching a job ----------------------------------------------------------------

class Job:
    """One 2-rank launch of pretrain.py: through the ``deepspeed`` launcher, or ranks started
    directly (the environment deepspeed.launcher.launch gives them, nobody watching over them)."""

    def __init__(self, argv: list[str], log: Path, launcher: str, env: dict | None = None):
        self.port = _common.free_port()
        self.launcher = launcher
        self.log = log
        self.t0 = time.monotonic()
        base = {**_common.launch_env(), **(env or {})}
        self._out = open(log, "w")
        if launcher == "deepspeed":
            cmd = [_common.exe("deepspeed"), "--num_gpus", str(NPROC), "--master_port", str(self.port), str(PRETRAIN),
                   *argv]
            self.procs = [subprocess.Popen(cmd, cwd=ROOT, env=base, stdout=self._out, stderr=subprocess.STDOUT,
                                           start_new_session=True)]
        else:
            base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port), WORLD_SIZE=str(NPROC), CROSS_RANK="0",
                        CROSS_SIZE="1", LOCAL_SIZE=str(NPROC))
            self.procs = [subprocess.Popen([sys.executable, "-u", str(PRETRAIN), f"--local_rank={r}", *argv], cwd=ROOT,
                                           env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=self._out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
                          for r in range(NPROC)]

    def rank_pid(self, rank: int) -> int | None:
        if self.launcher != "deepspeed":
            return self.procs[rank].pid
        import psutil
        try:
            for child in psutil.Process(self.procs[0].pid).children(recursive=True):
                if f"--local_rank={rank}" in " ".join(child.cmdline()):
                    return child.pid
        except psutil.Error:
            pass
        return None

    def wait(self, bound: float, supervise: bool) -> tuple[int, float, bool]:
        """(exit code, seconds since the start, hung). ``supervise``: stop the other ranks of a
        direct launch when one fails (a launcher's job; off in the trials, whose survivors must
        exit on their own). Whatever is still alive after ``bound`` seconds is killed: a hang."""
        deadline = time.monotonic() + bound
        hung = False
        first_failed = None  # the exit code of the process that failed first (not of those stopped after it)
        while True:
            codes = [p.poll() for p in self.procs]
            if first_failed is None:
                first_failed = next((c for c in codes if c not in (None, 0)), None)
            if all(c is not None for c in codes):
                break
            if supervise and any(c not in (None, 0) for c in codes):
                self._signal(signal.SIGTERM)
            if time.monotonic() > deadline:
                hung = True
                self._signal(signal.SIGKILL)
            time.sleep(0.05)
        self._out.close()
        _common.remove_shm_buffers(self.port)
        return (first_failed or 0), time.monotonic() - self.t0, hung

    def _signal(self, sig) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def run_args(config: Path, data: Path, run: Path, *extra) -> list[str]:
    return ["--deepspeed_config", str(config), "--data", str(data), "--model", "bert-tiny", "--output", str(run),
            "--no-progress", "--max-steps", str(STEPS), "--save-interval", str(SAVE_EVERY), "--eval-interval",
            str(STEPS), *map(str, extra)]


def plain_run(config: Path, data: Path, run: Path, log: Path, *extra, env=None, bound=600.0) -> tuple[int, float]:
    job = Job(run_args(config, data, run, *extra), log, "spawn", env)
    code, wall, hung = job.wait(bound, supervise=True)
    if hung:
        raise RuntimeError(f"a plain run hung (log {log})")
    return code, wall


# --- what a run left --------------------------------------------------------------------------------

def rows(run: Path, split: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [m for m in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if m["split"] == split]


def steps_logged(run: Path) -> int:
    """Training steps in RUN/metrics.jsonl so far (read while the run writes it: lines, not JSON)."""
    try:
        return (run / "metrics.jsonl").read_text().count('"split": "train"')
    except OSError:
        return 0


def curve(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in rows(run, "train")]


def final_eval(run: Path) -> list[float]:
    return [m["mlm_loss"] for m in rows(run, "eval")]


def latest(run: Path) -> str | None:
    from dist_sparse.train.checkpoint import latest_tag
    return latest_tag(run / "checkpoints")


def whole(run: Path, tag: str) -> bool:
    from dist_sparse.train.run_dir import whole_checkpoint
    return whole_checkpoint(run / "checkpoints" / tag)


def same_run(run: Path, reference: Path) -> bool:
    """Bit for bit the uninterrupted run: every step's loss, the final evaluation, `latest`."""
    return curve(run) == curve(reference) and final_eval(run) == final_eval(reference) and \
        latest(run) == f"global_step{STEPS}"


# --- trials --------------------------------------------------------------------------------------------

@dataclass
class Trial:
    index: int
    kind: str
    launcher: str = "spawn"
    fault: str = ""                 # what was injected, where
    landed: str = ""                # for kills: before the first checkpoint / mid-save / between saves / after the end
    exit_code: int | None = None
    exit_seconds: float | None = None   # from the fault (kills) or the start (injected faults) to the job's end
    hang: bool = False
    latest_ok: bool = True          # `latest` names a whole checkpoint (or nothing, before the first one)
    message_ok: bool = True         # the error names what it must
    recovery: str = ""
    matched: bool = False
    lost: list[str] = field(default_factory=list)


class Drills:
    def __init__(self, out: Path, data: Path, hang_after: float, rng: random.Random):
        self.out, self.data, self.hang_after, self.rng = out, data, hang_after, rng
        cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
        self.stop_cfg = _common.write_config(out, "stop", cfg)
        cfg["training"]["nonfinite_loss"] = "skip"
        self.skip_cfg = _common.write_config(out, "skip", cfg)
        self.reference = out / "reference"
        shutil.rmtree(self.reference, ignore_errors=True)
        code, self.reference_seconds = plain_run(self.stop_cfg, data, self.reference, out / "reference.log")
        if code != 0 or [s for s, _ in curve(self.reference)] != list(range(1, STEPS + 1)):
            raise RuntimeError(f"the reference run failed (exit {code}); see {out / 'reference.log'}")
        print(f"reference run: {self.reference_seconds:.1f} s, "
              f"losses {[round(x, 4) for _, x in curve(self.reference)]}",
              flush=True)

    # the recoveries ------------------------------------------------------------------------------
    def recover(self, t: Trial, run: Path, log: Path) -> None:
        """--resume from `latest`; with none, check that --resume refuses and start afresh."""
        tag = latest(run)
        if tag is not None:
            code, _ = plain_run(self.stop_cfg, self.data, run, log, "--resume")
            t.recovery = f"--resume from {tag}"
        else:
            code, _ = plain_run(self.stop_cfg, self.data, run, log, "--resume")
            if code != 2:
                t.lost.append(f"--resume without a complete checkpoint exited {code}, not a refusal")
            code, _ = plain_run(self.stop_cfg, self.data, run, log.with_suffix(".fresh.log"), "--overwrite")
            t.recovery = "fresh start (no complete checkpoint)"
        if code != 0:
            t.lost.append(f"the recovery run failed (exit {code}, {log})")
        t.matched = code == 0 and same_run(run, self.reference)
        if code == 0 and not t.matched:
            t.lost.append("the recovered run differs from the uninterrupted one")

    def check_latest(self, t: Trial, run: Path, not_tag: str | None = None) -> None:
        tag = latest(run)
        t.latest_ok = tag is None or whole(run, tag)
        if not t.latest_ok:
            t.lost.append(f"`latest` names {tag}, whose files are not all whole")
        if not_tag is not None and tag == not_tag:
            t.latest_ok = False
            t.lost.append(f"`latest` names {not_tag}, the checkpoint whose save failed")

    # the faults -------------------------------------------------------------------------------------
    def sigkill(self, t: Trial, run: Path, during_save: bool) -> None:
        rank = self.rng.randrange(NPROC)
        log = self.out / f"trial{t.index}.log"
        job = Job(run_args(self.stop_cfg, self.data, run), log, t.launcher)
        killed_at = {}
        target = None
        if during_save:
            target = self.rng.choice(TAGS)
            jitter = self.rng.uniform(0.0, 0.02)
            t.fault = f"SIGKILL rank {rank} once {target}/ appears (+{jitter:.2f} s)"
        else:
            # a random moment of the run's progress, not of the wall clock (other jobs make that
            # vary): after the k-th logged step (k = 0: from the start, through start-up)
            after = self.rng.randrange(STEPS)
            delay = self.rng.uniform(0.0, 0.6 * self.reference_seconds if after == 0 else 0.25)
            t.fault = f"SIGKILL rank {rank} {delay:.2f} s after " + (
                "the start" if after == 0 else f"step {after} logged")

        def killer():
            if during_save:
                tag_dir = run / "checkpoints" / target
                while not tag_dir.exists() and job.procs[0].poll() is None:
                    time.sleep(0.001)
                time.sleep(jitter)
            else:
                while steps_logged(run) < after and job.procs[0].poll() is None:
                    time.sleep(0.005)
                end = time.monotonic() + delay
                while time.monotonic() < end and job.procs[0].poll() is None:
                    time.sleep(0.005)
            pid = job.rank_pid(rank)
            if pid is not None and job.procs[0].poll() is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed_at["t"] = time.monotonic()
                    killed_at["latest"] = latest(run)
                    killed_at["steps"] = steps_logged(run)
                except ProcessLookupError:
                    pass

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        code, wall, hung = job.wait(self.hang_after + self.reference_seconds * 2, supervise=False)
        thread.join()
        t.exit_code, t.hang = code, hung
        if "t" not in killed_at:
            t.landed = "after the end (no fault)"
            t.exit_seconds = wall
            if code != 0:
                t.lost.append(f"exit {code} without a fault")
            t.matched = code == 0 and same_run(run, self.reference)
            t.recovery = "none needed"
            return
        t.exit_seconds = job.t0 + wall - killed_at["t"]
        if hung or t.exit_seconds > self.hang_after:
            t.hang = True
            t.lost.append(f"the job took {t.exit_seconds:.0f} s to end after the kill")
        if code == 0:
            t.lost.append("the job exited 0 after one rank was killed")
        now = latest(run)
        if during_save:
            t.landed = "mid-save (never committed)" if now != target else "after its commit"
        else:
            t.landed = ("before the first checkpoint" if killed_at["latest"] is None else
                        f"after {killed_at['latest']} (step {killed_at['steps']} logged)")
        self.check_latest(t, run)
        self.recover(t, run, self.out / f"trial{t.index}.resume.log")

    def enospc(self, t: Trial, run: Path) -> None:
        tag, rank = self.rng.choice(TAGS), self.rng.randrange(NPROC)
        t.fault = f"ENOSPC on rank {rank}'s first write of {tag}"
        log = self.out / f"trial{t.index}.log"
        job = Job(run_args(self.stop_cfg, self.data, run), log, t.launcher,
                  {"DIST_SPARSE_TEST_ENOSPC_IN_SAVE": f"{tag}:{rank}"})
        t.exit_code, t.exit_seconds, t.hang = job.wait(self.hang_after + self.reference_seconds * 2, supervise=False)
        text = log.read_text(errors="replace")
        t.message_ok = (t.exit_code == 2 and f"{tag} was not saved: rank {rank} could not write" in text
                        and "No space left on device" in text and "the file system mounted at" in text)
        if not t.message_ok:
            t.lost.append(f"no clear full-disk error (exit {t.exit_code})")
        if (run / "checkpoints" / tag).exists():
            t.lost.append(f"the partial {tag} was left behind")
        previous = TAGS[TAGS.index(tag) - 1] if TAGS.index(tag) else None
        if latest(run) != previous:
            t.lost.append(f"`latest` is {latest(run)}, not {previous}")
        self.check_latest(t, run, not_tag=tag)
        self.recover(t, run, self.out / f"trial{t.index}.resume.log")

    def nan(self, t: Trial, run: Path, policy: str) -> None:
        step, rank = self.rng.randint(1, STEPS), self.rng.randrange(NPROC)
        t.fault = f"NaN loss on rank {rank} at step {step} ({policy})"
        log = self.out / f"trial{t.index}.log"
        cfg = self.stop_cfg if policy == "stop" else self.skip_cfg
        job = Job(run_args(cfg, self.data, run), log, t.launcher, {"DIST_SPARSE_TEST_NONFINITE_LOSS": f"{step}:{rank}"})
        t.exit_code, t.exit_seconds, t.hang = job.wait(self.hang_after + self.reference_seconds * 2, supervise=False)
        ref = curve(self.reference)
        if policy == "stop":
            last = latest(run)
            t.message_ok = (t.exit_code == 2 and f"step {step}: the loss is not finite (on rank {rank})" in
                            (text := log.read_text(errors="replace")) and
                            (f"The last complete checkpoint is {last}" in text if last else "No checkpoint" in text))
            if not t.message_ok:
                t.lost.append(f"no stop message naming step {step} and the checkpoint (exit {t.exit_code})")
            if curve(run) != ref[:step - 1]:
                t.lost.append("the steps before the NaN differ from the uninterrupted run's")
            expected = f"global_step{(step - 1) // SAVE_EVERY * SAVE_EVERY}" if step > SAVE_EVERY else None
            if last != expected:
                t.lost.append(f"`latest` is {last}, not {expected}")
            self.check_latest(t, run)
            self.recover(t, run, self.out / f"trial{t.index}.resume.log")  # the cause fixed: no NaN this time
            return
        got = rows(run, "train")
        ok = (t.exit_code == 0 and [m["step"] for m in got] == list(range(1, STEPS + 1))
              and [(m["step"], m["loss"]) for m in got[:step - 1]] == ref[:step - 1]
              and [math.isnan(m["loss"]) for m in got] == [s == step for s in range(1, STEPS + 1)]
              and [m["skipped_steps"] for m in got] == [float(s >= step) for s in range(1, STEPS + 1)]
              and (step == 1 or got[step - 1]["lr"] == got[step - 2]["lr"])
              and all(math.isfinite(x) for x in final_eval(run)) and latest(run) == f"global_step{STEPS}")
        t.recovery = "skipped in the run"
        t.matched = ok
        if not ok:
            t.lost.append("the skip did not behave as specified (see the log)")
        self.check_latest(t, run)

    def damaged(self, t: Trial, run: Path, how: str) -> None:
        """The run died after global_step4 (its global_step6 is gone); one file of global_step4 is
        damaged. --resume must refuse naming the file and the checkpoint to fall back to."""
        shutil.copytree(self.reference, run)
        ckpt = run / "checkpoints"
        shutil.rmtree(ckpt / TAGS[-1])
        (ckpt / "latest").write_text(TAGS[-2])
        from dist_sparse.train.run_dir import truncate_metrics
        truncate_metrics(run / "metrics.jsonl", int(TAGS[-2].removeprefix("global_step")))
        victim = self.rng.choice(sorted((ckpt / TAGS[-2]).glob("*.pt")))
        data = victim.read_bytes()
        if how == "truncate":
            keep = self.rng.randrange(len(data))
            victim.write_bytes(data[:keep])
            t.fault = f"{victim.name} cut to {keep} of {len(data)} bytes"
        else:
            at = self.rng.randrange(len(data))
            flipped = bytearray(data)
            flipped[at] ^= 1 << self.rng.randrange(8)
            victim.write_bytes(bytes(flipped))
            t.fault = f"{victim.name}: a bit of byte {at} of {len(data)} flipped"
        log = self.out / f"trial{t.index}.log"
        code, _ = plain_run(self.stop_cfg, self.data, run, log, "--resume")
        t.exit_code = code
        text = log.read_text(errors="replace")
        fallback = TAGS[-3]
        if code == 2 and f"--resume: {victim} is damaged" in text and f"--resume-tag {fallback}" in text:
            code, _ = plain_run(self.stop_cfg, self.data, run, self.out / f"trial{t.index}.resume.log",
                                "--resume-tag", fallback)
            t.recovery = f"refused, named the file; --resume-tag {fallback}"
            t.matched = code == 0 and same_run(run, self.reference)
            if not t.matched:
                t.lost.append(f"the fallback run failed or differs (exit {code})")
        else:
            t.recovery = "not detected" if code == 0 else f"exit {code} without naming the file"
            # a change no reader sees (zip padding) is harmless only if the run is still the same
            t.matched = code == 0 and same_run(run, self.reference)
            t.message_ok = t.matched  # nothing to say about bytes nobody reads
            if not t.matched:
                t.lost.append(f"damage not refused and the run is not the uninterrupted one (exit {code})")

    def trial(self, index: int, kind: str, launcher: str) -> Trial:
        t = Trial(index, kind, launcher)
        run = self.out / f"trial{index}"
        shutil.rmtree(run, ignore_errors=True)
        print(f"trial {index}: {kind} ({launcher}) ...", end=" ", flush=True)
        t0 = time.monotonic()
        if kind in ("sigkill", "sigkill-save"):
            self.sigkill(t, run, during_save=kind == "sigkill-save")
        elif kind == "enospc":
            self.enospc(t, run)
        elif kind in ("nan-stop", "nan-skip"):
            self.nan(t, run, kind.removeprefix("nan-"))
        else:
            self.damaged(t, run, kind)
        print(f"{t.fault}; {t.landed + '; ' if t.landed else ''}exit {t.exit_code}"
              f"{f' after {t.exit_seconds:.1f} s' if t.exit_seconds is not None else ''}; {t.recovery}; "
              f"{'matched' if t.matched else 'NOT matched'}{'; LOST: ' + '; '.join(t.lost) if t.lost else ''} "
              f"[{time.monotonic() - t0:.0f} s]", flush=True)
        shutil.rmtree(run, ignore_errors=True)  # the logs stay
        return t


def schedule(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` trials: every kind in turn (shuffled per round), the launcher of the kill trials
    alternating between the deepspeed launcher and ranks started directly."""
    kinds: list[str] = []
    while len(kinds) < n:
        block = list(KINDS)
        rng.shuffle(block)
        kinds += block
    out, kills = [], 0
    for kind in kinds[:n]:
        if kind.startswith("sigkill"):
            out.append((kind, "deepspeed" if kills % 2 == 0 else "spawn"))
            kills += 1
        else:
            out.append((kind, "spawn"))
    return out


def table(trials: list[Trial]) -> str:
    lines = ["| kind | trials | launcher (deepspeed / direct) | job ended non-zero in bound | hangs | `latest` whole | "
             "clear message | recovered = uninterrupted run | lost |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS + ("all",):
        ts = [t for t in trials if kind in ("all", t.kind)]
        if not ts:
            continue
        expect_fail = [t for t in ts if t.kind != "nan-skip" and t.landed != "after the end (no fault)"
                       and t.kind not in ("truncate", "corrupt")]
        ended = sum(1 for t in expect_fail if t.exit_code not in (0, None) and not t.hang)
        ds = sum(t.launcher == "deepspeed" for t in ts)
        lines.append(f"| {kind} | {len(ts)} | {ds} / {len(ts) - ds} | {ended} / {len(expect_fail)} | "
                     f"{sum(t.hang for t in ts)} | {sum(t.latest_ok for t in ts)} / {len(ts)} | "
                     f"{sum(t.message_ok for t in ts)} / {len(ts)} | {sum(t.matched for t in ts)} / {len(ts)} | "
                     f"{sum(bool(t.lost) for t in ts)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="one trial of each kind (7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="work directory (default: a new temporary one); logs stay there")
    p.add_argument("--data", default=None, help="a prepared dataset (default: a small one from the default corpus)")
    p.add_argument("--hang-after", type=float, default=60.0,
                   help="seconds after a fault by which every rank must have exited")
    args = p.parse_args(argv)
    n = len(KINDS) if args.quick else args.trials
    rng = random.Random(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="drills")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    if args.data:
        data = Path(args.data).resolve()
    else:
        data = out / "data"
        if not (data / "meta.json").is_file():
            from dist_sparse.data.prepare import prepare_data
            prepare_data(data, default_corpus=True, max_documents=24, vocab_size=1000, seq_len=64)
    t0 = time.monotonic()
    drills = Drills(out, data, args.hang_after, rng)
    trials = [drills.trial(i, kind, launcher) for i, (kind, launcher) in enumerate(schedule(n, rng), 1)]
    report = table(trials)
    landed: dict[str, int] = {}
    for t in trials:
        if t.landed:
            key = "after global_step" if t.landed.startswith("after global_step") else t.landed
            landed[key] = landed.get(key, 0) + 1
    if landed:
        report += "\n\nwhere the kills landed: " + ", ".join(f"{k}: {v}" for k, v in sorted(landed.items()))
    print()
    print(report)
    lost = sum(bool(t.lost) for t in trials)
    print(f"\n{len(trials)} trials in {(time.monotonic() - t0) / 60:.1f} min (seed {args.seed}); "
          f"{lost} with something lost; logs in {out}")
    _common.write_json(out / "drills.json", {"machine": _common.cpu_model(), "git": _common.git_state(),
                                              "seed": args.seed, "reference_seconds": drills.reference_seconds,
                                              "trials": [asdict(t) for t in trials], "table": report})
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
