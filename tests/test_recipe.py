"""recipes/: the profile switch of mini.sh and the ship script's reading of a run (no training here)."""

import importlib.util
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ship():
    spec = importlib.util.spec_from_file_location("ship_default", ROOT / "recipes" / "ship_default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unknown_profile_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(["bash", str(ROOT / "recipes" / "mini.sh"), str(run)], capture_output=True, text=True,
                       env={**os.environ, "PROFILE": "tpu"})
    assert r.returncode == 2 and "PROFILE must be cpu or gpu" in r.stderr
    assert not run.exists()


def test_stage_times_read_recipe_and_gpu_timing_lines(tmp_path):
    (tmp_path / "timing.txt").write_text("[gpu] vae done at 115s\n[gpu] encode done at 132s\n"
                                         "[recipe] distill leapfrog done at 400s\n")
    assert _ship().stage_times(tmp_path) == [("vae", 115), ("encode", 17), ("distill leapfrog", 268)]


def test_the_student_with_the_lower_4_step_fid_is_picked():
    summary = {"students": {"lcm": {"4": {"fid": 261.8}}, "llcm-midpoint": {"4": {"fid": 263.4}, "2": {"fid": 1.0}}}}
    assert _ship().pick_student(summary) == "lcm"
