"""Atomic stages: a failed rerun leaves the previous complete output byte-identical, summary.json
comes last, and fingerprints follow the inputs' contents (not their paths).

The same test bodies run on a local folder and on the session's S3 server; corpora are tiny
(30 posts of 16 px), so a prepare run is a few seconds.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

from smpp_ray import stages, storage
from smpp_ray.config import load_config
from smpp_ray.data import synth
from smpp_ray.data.synth import SYNTH_MARKER, synthesize_corpus
from smpp_ray.stages import StageRun
from smpp_ray.summary import SUMMARY_FILE, read_summary, summary_location, write_summary

CORPUS = {"posts": 30, "seed": 5, "image_size": 16}
LABEL, IMAGES = "train_label.txt", "train_img_filepath.txt"
NO_TRACKING = StageRun("", "atomic", enabled=False)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


@pytest.fixture
def config():
    return load_config(None, ["tracking.enabled=false", "data.max_image_side=16"])


def _tree(location: str) -> dict[str, bytes]:
    """Every file under ``location`` by relative name, with its bytes."""
    base = storage.normalize(location)
    return {f[len(base) + 1:]: storage.read_bytes(f) for f in storage.list_files(base)}


def _beside(location: str) -> list[str]:
    """Hidden staging / set-aside folders a run left beside ``location``."""
    prefix = f".{storage.name(location)}."
    return [n for n in storage.list_names(storage.parent(location)) if n.startswith(prefix)]


# ----------------------------------------------------------------------------- ways to break a raw corpus

def _drop_a_label(raw: str) -> None:
    """Files of different lengths: a file-level ValueError before any row is read."""
    location = storage.join(raw, LABEL)
    storage.write_text(location, "".join(line + "\n" for line in storage.read_text(location).splitlines()[:-1]))


def _spoil_every_image(raw: str) -> None:
    """Every row an image reject: the ValueError comes after the shards were written (staged)."""
    for relative in storage.read_text(storage.join(raw, IMAGES)).splitlines():
        storage.write_bytes(storage.join(raw, relative), b"not an image")


BREAKS: dict[str, tuple[Callable[[str], None], str]] = {
    "inconsistent-files": (_drop_a_label, LABEL),
    "every-image-rejected": (_spoil_every_image, "no row is left"),
}


# ----------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("broken", ["inconsistent-files", "every-image-rejected"])
def test_a_failed_prepare_rerun_keeps_the_previous_dataset_byte_identical(request, root, config, broken):
    request.getfixturevalue("ray_with_s3" if root.startswith("s3://") else "ray_session")
    if root.startswith("s3://") and broken == "inconsistent-files":
        pytest.skip("fails before anything is written: the local case covers it")
    good, bad, data = storage.join(root, "good"), storage.join(root, "bad"), storage.join(root, "data")
    synthesize_corpus(good, **CORPUS)
    synthesize_corpus(bad, **CORPUS)
    edit, word = BREAKS[broken]
    edit(bad)
    stages.run_prepare(config, good, data, NO_TRACKING)
    before = _tree(data)
    assert {"manifest.json", SUMMARY_FILE} <= set(before) and any(n.startswith("posts/") for n in before)

    with pytest.raises(ValueError, match=word):
        stages.run_prepare(config, bad, data, NO_TRACKING)

    assert _tree(data) == before
    assert _beside(data) == []   # no staging folder left behind
    failed = storage.join(root, "data.failed")
    if broken == "every-image-rejected":   # the failed run's rejects are kept beside, not in, the dataset
        assert set(_tree(failed)) == {"rejects/part-00000.parquet"}
    else:
        assert not storage.exists(failed)


def test_a_successful_prepare_rerun_replaces_only_what_prepare_owns(ray_session, config, tmp_path):
    raw, data = str(tmp_path / "raw"), tmp_path / "data"
    synthesize_corpus(raw, **CORPUS)
    stages.run_prepare(config, raw, str(data), NO_TRACKING)
    (data / "posts" / "split=train" / "stale.parquet").write_bytes(b"left by an older run")
    (data / "notes.txt").write_text("not prepare's")
    first = read_summary(str(data))
    stages.run_prepare(config, raw, str(data), NO_TRACKING)
    assert not (data / "posts" / "split=train" / "stale.parquet").exists()
    assert (data / "notes.txt").read_text() == "not prepare's"
    assert read_summary(str(data)).fingerprint == first.fingerprint
    assert _beside(str(data)) == []


# ----------------------------------------------------------------------------- fingerprints

def test_editing_a_raw_file_in_place_changes_the_prepare_fingerprint(root, config):
    raw, data = storage.join(root, "raw"), storage.join(root, "data")
    synthesize_corpus(raw, **CORPUS)
    inputs = {"raw": raw}
    fingerprint = stages.stage_fingerprint("prepare", config, inputs)
    write_summary(data, {"stage": "prepare", "status": "complete", "fingerprint": fingerprint})
    assert stages.is_complete("prepare", config, inputs, data)
    assert stages.stage_fingerprint("prepare", config, inputs) == fingerprint   # stable while nothing changes

    label = storage.join(raw, LABEL)
    storage.write_text(label, storage.read_text(label).replace("\n", "1\n", 1))   # one label edited in place

    assert stages.stage_fingerprint("prepare", config, inputs) != fingerprint
    assert not stages.is_complete("prepare", config, inputs, data)   # so the pipeline reruns prepare


def test_a_same_size_edit_with_a_new_mtime_changes_the_fingerprint(tmp_path):
    raw = tmp_path / "raw"
    synthesize_corpus(str(raw), **CORPUS)
    before = storage.fingerprint(str(raw))
    label = raw / LABEL
    text = label.read_text()
    label.write_text(text[::-1])   # same size
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))   # a later edit, whatever the clock
    assert storage.fingerprint(str(raw)) != before


def test_a_same_size_edit_that_keeps_the_mtime_changes_the_fingerprint(tmp_path):
    """Where a size and an mtime lie (``cp -p``/``rsync -t`` of another version, an object store's
    one-second mtimes), the metadata files' bytes still tell: they are hashed. An image edited
    that way is not (by design: images are identified by size and mtime)."""
    raw = tmp_path / "raw"
    synthesize_corpus(str(raw), **CORPUS)
    label = raw / LABEL
    stat = label.stat()
    before = storage.fingerprint(str(raw))
    label.write_text(label.read_text()[::-1])   # same size
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # and the old mtime
    assert storage.fingerprint(str(raw)) != before
    touched = storage.fingerprint(str(raw))
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))   # touched: same bytes
    assert storage.fingerprint(str(raw)) == touched


def test_the_fingerprint_follows_contents_not_paths(tmp_path, config):
    raw = tmp_path / "raw"
    synthesize_corpus(str(raw), **CORPUS)
    moved = tmp_path / "elsewhere" / "raw"
    shutil.copytree(raw, moved)   # copy2: same names, sizes and mtimes
    assert (stages.stage_fingerprint("prepare", config, {"raw": str(raw)})
            == stages.stage_fingerprint("prepare", config, {"raw": str(moved)}))


# ----------------------------------------------------------------------------- summary.json and set-aside stages

def _watch_synth(monkeypatch, seen: list[bool], fail: bool = False) -> None:
    """Make run_synth record whether its folder has a summary.json while it runs (and maybe fail)."""
    real = synth.synthesize_corpus

    def watched(out_dir: str, **kwargs):
        seen.append(storage.exists(summary_location(out_dir)))
        result = real(out_dir, **kwargs)
        if fail:
            raise RuntimeError("failed on purpose")
        return result

    monkeypatch.setattr(synth, "synthesize_corpus", watched)


def test_summary_is_absent_while_a_stage_runs_and_present_after(root, monkeypatch):
    config = load_config(None, ["tracking.enabled=false", "synth.posts=12", "synth.image_size=16"])
    out, seen = storage.join(root, "raw"), []
    _watch_synth(monkeypatch, seen)
    stages.run_synth(config, out, NO_TRACKING)
    assert storage.is_file(summary_location(out))
    stages.run_synth(load_config(None, ["tracking.enabled=false", "synth.posts=10", "synth.image_size=16"]),
                     out, NO_TRACKING)   # a rerun over a complete output
    assert seen == [False, False]
    assert read_summary(out).metrics["posts"] == 10 and _beside(out) == []


def test_a_failed_set_aside_stage_puts_the_previous_output_back(root, monkeypatch):
    config = load_config(None, ["tracking.enabled=false", "synth.posts=12", "synth.image_size=16"])
    out = storage.join(root, "raw")
    stages.run_synth(config, out, NO_TRACKING)
    before = _tree(out)
    _watch_synth(monkeypatch, [], fail=True)
    with pytest.raises(RuntimeError, match="on purpose"):
        stages.run_synth(load_config(None, ["tracking.enabled=false", "synth.posts=10", "synth.image_size=16"]),
                         out, NO_TRACKING)
    assert _tree(out) == before and _beside(out) == []


def test_an_output_set_aside_by_a_killed_run_is_what_a_failed_rerun_restores(tmp_path, monkeypatch):
    config = load_config(None, ["tracking.enabled=false", "synth.posts=12", "synth.image_size=16"])
    out = str(tmp_path / "raw")
    stages.run_synth(config, out, NO_TRACKING)
    before = _tree(out)
    storage.set_aside(out)   # what a run killed mid-way leaves: the output beside, a partial folder
    storage.write_text(storage.join(out, SYNTH_MARKER), "")   # synth's first write: the folder is its own
    storage.write_text(storage.join(out, "train_text.json"), "[")
    _watch_synth(monkeypatch, [], fail=True)
    with pytest.raises(RuntimeError, match="on purpose"):
        stages.run_synth(config, out, NO_TRACKING)
    assert _tree(out) == before and _beside(out) == []


def test_an_in_place_stage_keeps_its_resumable_state_and_removes_its_summary_first(tmp_path, config):
    out = str(tmp_path / "train")
    checkpoint = storage.join(out, "ray_results", "smpp-train", "checkpoint_000000", "trainable.pt")
    write_summary(out, {"stage": "train", "status": "complete", "fingerprint": "old"})
    seen = []

    def body(_):
        seen.append(storage.exists(summary_location(out)))
        storage.write_bytes(checkpoint, b"weights")   # what Ray Train leaves before a worker dies
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        stages._run_stage("train", config, out, {}, NO_TRACKING, body)
    assert seen == [False] and not storage.exists(summary_location(out))
    assert storage.read_bytes(checkpoint) == b"weights"   # what the next run resumes from
    # More epochs and another failure budget say how the run goes, not what it computes: it resumes
    more = load_config(None, ["tracking.enabled=false", "data.max_image_side=16", "train.epochs=9",
                              "train.max_failures=5"])
    stages._run_stage("train", more, out, {}, NO_TRACKING, lambda _: {"metrics": {"epochs_run": 1}})
    assert read_summary(out).status == "complete" and storage.read_bytes(checkpoint) == b"weights"


def _interrupted_train_run(out: str, data: str, config) -> str:
    """An in-place train folder as a stopped run leaves it: a checkpoint, no summary."""
    checkpoint = storage.join(stages.resumable_state("train", config, out), "checkpoint_000000", "trainable.pt")

    def body(_):
        storage.write_bytes(checkpoint, b"weights of the first run")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        stages._run_stage("train", config, out, {"data": data}, NO_TRACKING, body)
    return checkpoint


@pytest.mark.parametrize("change", ["data", "config", "force"])
def test_a_changed_input_or_config_or_force_starts_an_in_place_stage_afresh(tmp_path, config, change, caplog):
    """The stale-run case: a finished or stopped run on other inputs is never handed back."""
    data, out = tmp_path / "data", str(tmp_path / "train")
    data.mkdir()
    (data / "posts.parquet").write_bytes(b"first dataset")
    checkpoint = _interrupted_train_run(out, str(data), config)
    rerun_config, fresh = config, False
    if change == "data":
        (data / "posts.parquet").write_bytes(b"another dataset, 96 posts")
    elif change == "config":
        rerun_config = load_config(None, ["tracking.enabled=false", "data.max_image_side=16", "train.lr=0.05"])
    else:
        fresh = True
    seen = []

    def body(_):
        seen.append(storage.exists(checkpoint))
        return {"metrics": {"epochs_run": 1}}

    run = StageRun("", "atomic", enabled=False, fresh=fresh)
    with caplog.at_level("INFO", logger="smpp_ray.stages"):
        stages._run_stage("train", rerun_config, out, {"data": str(data)}, run, body)
    assert seen == [False]   # the library found nothing to resume
    why = {"data": "input 'data' changed", "config": "train.lr was 0.002, now 0.05",
           "force": "--force asks for a fresh run"}[change]
    assert f"({why}); starting afresh" in caplog.text
    record = storage.read_json(storage.join(stages.resumable_state("train", config, out), stages.RESUME_RECORD))
    assert record["config"]["train.lr"] == rerun_config.train.lr   # the state now belongs to this run


def test_a_run_elsewhere_made_from_other_inputs_is_refused_not_deleted(ray_session, tmp_path, config, capsys):
    """train.storage_path outside the stage's folder holds someone's run: a mismatch is exit 2
    naming what changed, and its files stay."""
    from smpp_ray.cli import main

    data, elsewhere = tmp_path / "data", tmp_path / "shared_runs"
    data.mkdir()
    (data / "posts.parquet").write_bytes(b"first dataset")
    shared = load_config(None, ["tracking.enabled=false", f"train.storage_path={elsewhere}"])
    checkpoint = _interrupted_train_run(str(tmp_path / "first"), str(data), shared)
    code = main(["train", "--data", str(data), "--prototypes", str(tmp_path / "none"), "--out", str(tmp_path / "second"),
                 "--set", "tracking.enabled=false", "--set", f"train.storage_path={elsewhere}",
                 "--set", "train.batch_size=7"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.batch_size was 32, now 7" in err and "input 'prototypes' changed" in err and "--force" in err
    assert storage.read_bytes(checkpoint) == b"weights of the first run"


# ----------------------------------------------------------------------------- one writer, atomic swap

_KILLING_SWAP = r"""
import os, signal, sys
from smpp_ray import storage

step, staging, target = sys.argv[1:4]
real_exchange, real_remove = storage.exchange, storage.remove

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def exchange(first, second):
    if step == "before the exchange":
        die()
    done = real_exchange(first, second)
    if step == "after the exchange":
        die()
    return done

def remove(location):
    if step == "while deleting the old output":
        real_remove(os.path.join(location, "posts"))   # half of the old output gone
        die()
    real_remove(location)

storage.exchange, storage.remove = exchange, remove
storage.swap_in(staging, target, ["summary.json", "manifest.json", "posts"])
"""


@pytest.mark.parametrize("step", ["before the exchange", "after the exchange", "while deleting the old output"])
def test_a_swap_killed_at_any_step_leaves_the_whole_old_or_the_whole_new_output(tmp_path, step):
    """kill -9 runs no cleanup: the switch itself must be one atomic step (RENAME_EXCHANGE)."""
    import subprocess
    import sys

    target, staging = tmp_path / "data", tmp_path / ".data.staging-1"
    old = {"manifest.json": b'{"rows": 3}', "summary.json": b'{"status": "complete"}', "posts/part-0.parquet": b"old"}
    new = {"manifest.json": b'{"rows": 5}', "posts/part-0.parquet": b"new", "posts/part-1.parquet": b"new too"}
    for folder, files in ((target, old), (staging, new)):
        for relative, data in files.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(data)
    run = subprocess.run([sys.executable, "-c", _KILLING_SWAP, step, str(staging), str(target)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == -9, run.stderr
    expected = old if step == "before the exchange" else new
    assert _tree(str(target)) == expected


def test_a_second_writer_of_the_same_output_exits_2_while_the_first_runs(tmp_path, capsys):
    """The lock is the kernel's: held by a live process, dropped when it dies (kill -9 included)."""
    import subprocess
    import sys

    from smpp_ray.cli import main

    out = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom smpp_ray.locking import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["synth", "--out", str(out), "--posts", "20", "--set", "tracking.enabled=false"])
        assert code == 2
        assert f"is being written by another smpp command (pid {holder.pid}" in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())   # nothing written by the refused command
    finally:
        holder.kill()
        holder.wait(30)
    # The holder died without unlocking: the next writer runs
    assert main(["synth", "--out", str(out), "--posts", "20", "--test-posts", "4", "--set", "tracking.enabled=false"]) == 0


def test_a_rerun_marks_the_runs_a_killed_command_left_running_killed(tmp_path, capsys):
    from smpp_ray import tracking
    from smpp_ray.cli import main

    out, uri = tmp_path / "raw", f"sqlite:///{tmp_path / 'mlruns.db'}"
    abandoned = tracking.create_run(uri, "smpp", "synth", tags={tracking.STAGE_TAG: "synth", tracking.OUT_TAG: str(out)})
    elsewhere = tracking.create_run(uri, "smpp", "synth", tags={tracking.STAGE_TAG: "synth",
                                                                tracking.OUT_TAG: str(tmp_path / "other")})
    assert main(["synth", "--out", str(out), "--posts", "20", "--test-posts", "4",
                 "--set", f"tracking.tracking_uri={uri}"]) == 0
    client = tracking.client(uri)
    assert client.get_run(abandoned).info.status == "KILLED"
    assert client.get_run(elsewhere).info.status == "RUNNING"   # another folder's run is not this one's


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_prepare_rerun_that_fills_a_mounted_out_keeps_the_previous_dataset(ray_session, config, tmp_path):
    """--out is a mount point: staging goes inside it (same filesystem), so the disk filling up
    fails the run before the swap, and the previous dataset stays byte-identical."""
    import subprocess

    small, big, data = str(tmp_path / "small"), str(tmp_path / "big"), tmp_path / "data"
    synthesize_corpus(small, **CORPUS)
    synthesize_corpus(big, **{**CORPUS, "posts": 400, "image_size": 64})
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        stages.run_prepare(config, small, str(data), NO_TRACKING)
        before = _tree(str(data))
        with pytest.raises(Exception) as failed:   # ENOSPC, surfaced by the Ray Data write or our own
            stages.run_prepare(load_config(None, ["tracking.enabled=false", "data.max_image_side=64"]), big,
                               str(data), NO_TRACKING)
        assert "No space left" in str(failed.value) or "ENOSPC" in str(failed.value) or "space" in str(failed.value)
        assert _tree(str(data)) == before
        assert [n for n in os.listdir(data) if n.startswith(storage.INNER_STAGING)] == []
    finally:
        subprocess.run(["umount", str(data)], check=False)
