"""One bound on the step count (llcm.sampling.max_steps) and one rule for w, shared by the pipeline, the
server's limits, `llcm generate` and the evaluation."""

import math

import pytest

from llcm.cli import main
from llcm.errors import UserError
from llcm.pipeline import LLCMPipeline, load_pipeline
from llcm.sampling import MAX_STEPS, consistency_timesteps, max_steps
from llcm.serve import Limits, Service

from cli_checks import one_error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def k200_folder(tmp_path_factory):
    """A tiny model distilled (in name) with k = 200: a skipping grid of 5 points."""
    pipe = load_pipeline("tiny-cpu")
    pipe.config.k = 200
    return pipe.save(tmp_path_factory.mktemp("k200") / "model")


def test_consistency_timesteps_stop_at_the_pipelines_step_bound():
    for k, hi in ((10, MAX_STEPS), (20, 50), (200, 5)):  # k = 10: 100 grid points, still at most MAX_STEPS
        assert max_steps(1000, k) == hi and len(consistency_timesteps(hi, 1000, k)) == hi
        with pytest.raises(ValueError, match=f"steps must be between 1 and {hi} "):
            consistency_timesteps(hi + 1, 1000, k)


def test_a_k200_model_takes_5_steps_in_the_pipeline_the_server_and_llcm_generate(k200_folder, tmp_path, capsys):
    msg = "steps must be between 1 and 5, got 6"
    pipe = LLCMPipeline.from_pretrained(k200_folder)
    assert max_steps(pipe.schedule.num_train_timesteps, pipe.config.k) == 5
    with pytest.raises(UserError, match=msg):
        pipe(["x"], steps=6)
    assert len(pipe(["x"], steps=5, w=pipe.config.w_default).timesteps) == 5

    service = Service(pipe, tmp_path / "serve", Limits(max_steps=8))
    assert service.steps_range == (1, 5) and service.info()["limits"]["steps"] == [1, 5]  # the page's slider too
    with pytest.raises(UserError, match=msg):
        service.generate("x", steps=6)
    assert service.generate("x", steps=5).generations[0].steps == 5

    argv = ["generate", "x", "--model", str(k200_folder), "--out", str(tmp_path / "gen")]
    assert main(argv + ["--steps", "6"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"llcm generate: error: {msg}"
    assert main(argv + ["--steps", "5"]) == 0


def test_help_states_the_step_cap_of_the_library(capsys):
    for command in ("generate", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"at most {MAX_STEPS}" in text and "skipping grid" in text, command


def test_w_that_is_nan_infinite_negative_or_absurd_is_refused_with_one_line(tmp_path, capsys):
    from llcm.evaluation.evaluate import EvalConfig, ModelSpec

    pipe = load_pipeline("tiny-cpu")
    service = Service(pipe, tmp_path / "serve", Limits())
    for w in (math.nan, math.inf, -1.0, 1e36):
        with pytest.raises(UserError, match="w must be a number between 0 and 100 ") as e:
            pipe(["x"], steps=1, w=w)
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="w must be a number between 0 and 100 "):
            service.generate("x", steps=1, w=w)
    assert not any((tmp_path / "serve").iterdir())
    for w in ("nan", "inf", "-inf"):
        assert main(["generate", "x", "--model", "tiny-cpu", f"--w={w}", "--out", str(tmp_path / "gen")]) == 2
        assert "w must be a number between 0 and 100" in one_error_line(capsys)
    for kw in ({"w": math.nan}, {"teacher_w": math.inf}):
        with pytest.raises(UserError, match="must be a finite number >= 0"):
            EvalConfig(data="d", models=[ModelSpec("m", "p")], out="o", **kw).validate()
