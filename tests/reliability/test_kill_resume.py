"""Faults in a real ``diffusion-lab fit`` subprocess (toy config, 15 steps, last.ckpt every 3 steps):

* SIGKILL at random steps and phases, resumed each time with ``--ckpt_path last``: the final checkpoint is
  bit-identical (weights, EMA, optimiser state) to that of an uninterrupted run;
* SIGTERM: a checkpoint at the step it stopped, exit code 0, and the resumed run is again identical;
* a crash while writing a checkpoint: the previous last.ckpt stays loadable (a non-atomic writer, run the
  same way, leaves a torn one: the injection is real).
"""

from __future__ import annotations

import random
import signal

import pytest

from diffusion_lab.reliability import CorruptCheckpointError, load_checkpoint_file


def _resume(toy, root, name: str):
    result = toy.fit(toy.config(root, max_steps=toy.max_steps), name, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ckpt" / "last.ckpt"


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path, toy, reference):
    root, rng = tmp_path / "killed", random.Random(13)
    kills = sorted(rng.sample(range(1, toy.max_steps), 3))
    phases = [rng.choice(["batch_start", "before_optimizer_step", "batch_end"]) for _ in kills]
    saved_step = 0
    for attempt, (step, phase) in enumerate(zip(kills, phases)):
        config = toy.config(root, max_steps=toy.max_steps, extra_callbacks=[toy.signal_at(step, phase=phase)])
        result = toy.fit(config, f"kill{attempt}", *(["--ckpt_path", "last"] if attempt else []))
        assert result.returncode == -signal.SIGKILL, (step, phase, result.stderr[-3000:])
        # killed in step `step` (0-based, any phase: the step's own save comes after batch_end): the newest
        # checkpoint is from the last multiple of the interval at or before it
        saved_step = max(saved_step, step // toy.every * toy.every)
        if saved_step:
            assert toy.load(root / "ckpt" / "last.ckpt")["global_step"] == saved_step
    toy.assert_same(reference, _resume(toy, root, "final"))


@pytest.mark.slow
def test_sigterm_saves_at_the_step_and_exits_cleanly(tmp_path, toy, reference):
    root = tmp_path / "term"
    config = toy.config(root, max_steps=toy.max_steps, extra_callbacks=[toy.signal_at(4, "SIGTERM")])
    result = toy.fit(config, "term")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_checkpoint_file(root / "ckpt" / "last.ckpt")  # the preemption save, not the step-3 one
    assert saved["global_step"] == 5
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 1  # epoch 1, batch 1
    assert "received SIGTERM: saved the state after step 5" in result.stderr
    toy.assert_same(reference, _resume(toy, root, "term_resume"))


@pytest.mark.slow
@pytest.mark.parametrize("atomic", [True, False])
def test_crash_while_writing_keeps_previous_last_ckpt(tmp_path, toy, reference, atomic):
    root = tmp_path / "crash"
    config = toy.config(root, max_steps=toy.max_steps)
    config["trainer"]["plugins"] = [
        {
            "class_path": "diffusion_lab.reliability.faults.CrashingCheckpointIO",
            "init_args": {"crash_on_save": 3, "atomic": atomic},  # saves at steps 3, 6, then dies writing 9
        }
    ]
    result = toy.fit(config, "crash")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    last = root / "ckpt" / "last.ckpt"
    if not atomic:  # what a plain torch.save(checkpoint, path) leaves behind
        with pytest.raises(CorruptCheckpointError, match="last.ckpt' is truncated or corrupt"):
            load_checkpoint_file(last)
        return
    assert load_checkpoint_file(last)["global_step"] == 6
    torn = [p.name for p in (root / "ckpt").iterdir() if p.name != "last.ckpt"]
    assert len(torn) == 1 and torn[0].startswith(".last.ckpt.tmp-")  # the half-written temporary
    toy.assert_same(reference, _resume(toy, root, "crash_resume"))
    assert [p.name for p in (root / "ckpt").iterdir()] == ["last.ckpt"]  # removed by the next save
