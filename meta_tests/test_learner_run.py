"""The learner's run, end to end: the suite run on small broken plug-ins (meta_tests/broken_plugins/), each a
learner's file with one defect that is not about the math, must name that defect in one sentence, with the
right exit status, in bounded time.

Each check is a pytest run of its own, started from a temporary directory outside this repository (so the
suite is found from its installed location, as a learner's run finds it), on one property of LayerNorm
(``NARROW``). They run in-process (pytester): a fresh pytest configuration, the plug-in loaded from its
entry point and the command line parsed as on a terminal, without paying torch's import again. The thread
check runs in a subprocess, because what it checks is that the process exits.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PLUGINS = Path(__file__).resolve().parent / "broken_plugins"
# One property, one dtype: every defect below shows on the first call of the component.
NARROW = ["properties/test_normalization.py", "-k", "agrees_with_reference and LayerNorm and dtype0"]
QUIET = ["-p", "no:cacheprovider", "-p", "no:xdist", "--call-timeout", "0.5"]
BOUND_S = 30  # seconds any one of these runs may take (a hang would take minutes)

# plug-in file -> (exit status, the sentence that must name its defect)
CASES = {
    "correct": (0, "1 claim held, 0 failed"),
    "sleeps": (1, "did not return within 0.5 s (stopped at sleeps.py:10 in forward)"),
    "mutates_input": (1, "modified its input `x` in place"),
    "keeps_state": (1, "returned its previous output for a new input of the same shape: it keeps state between calls"),
    "adds_noise": (1, "is not deterministic: two calls on the same input returned different outputs"),
    "returns_tuple": (1, "returned a tuple; the spec's LayerNorm returns one tensor"),
    "wrong_shape": (1, "returned shape (1, 1, 1, 2), but the spec says (1, 1, 2)"),
    "returns_nan": (1, "non-finite value(s) (NaN or inf) for finite inputs"),
    "raises": (1, "raised RuntimeError: normalise me later (at raises.py:8 in forward)"),
    "exits": (1, "called sys.exit(3) (at exits.py:10 in forward)"),
    "wrong_constructor": (1, "unexpected keyword argument 'd_model' (LayerNorm.__init__ is at wrong_constructor.py:7)"),
    "no_spec_name": (4, "no_spec_name.py: the module defines none of the spec's components"),
    "fails_to_import": (4, "fails_to_import.py failed to import: ModuleNotFoundError: No module named "
                           "'einops_typo_that_does_not_exist' (at fails_to_import.py:5 in <module>)"),
}


@pytest.fixture
def learner_run(pytester: pytest.Pytester):
    """Run pytest in-process from a temporary directory; restore the Hypothesis profile it loads."""
    from hypothesis import settings

    profile = settings.get_current_profile_name()

    def run(*args: str) -> tuple[pytest.RunResult, float]:
        start = time.perf_counter()
        result = pytester.runpytest_inprocess(*QUIET, *args)
        return result, time.perf_counter() - start

    yield run
    settings.load_profile(profile)


@pytest.mark.parametrize("plugin", list(CASES))
def test_broken_plugin_gets_its_one_message(learner_run, plugin: str) -> None:
    status, message = CASES[plugin]
    result, seconds = learner_run("--impl", str(PLUGINS / f"{plugin}.py"), *NARROW)
    output = result.stdout.str() + result.stderr.str()
    assert message in " ".join(output.split()), f"{plugin}: expected {message!r} in:\n{output}"
    assert result.ret == status, f"{plugin}: exit status {result.ret}, expected {status}:\n{output}"
    assert seconds < BOUND_S, f"{plugin}: the run took {seconds:.1f} s"
    if status == 1:
        assert "failed claims:" in output and f"scorecard: {PLUGINS / plugin}.py" in output


def test_a_file_outside_the_repository_with_a_space_separated_impl(learner_run, pytester: pytest.Pytester) -> None:
    """`pytest --impl model.py` (the value after a space, a file outside the repository, no test paths):
    the suite collects its own properties/, rooted at the suite, and prints the scorecard."""
    shutil.copy(PLUGINS / "correct.py", pytester.path / "model.py")
    (pytester.path / "test_unrelated.py").write_text("def test_not_the_suite():\n    raise AssertionError\n")
    result, _ = learner_run("--impl", "model.py", "-k", "agrees_with_reference and LayerNorm and dtype0")
    output = result.stdout.str()
    assert result.ret == 0, output
    assert f"rootdir: {PLUGINS.parent.parent}" in output
    assert "scorecard: model.py" in output and "1 claim held, 0 failed" in output
    assert "test_unrelated" not in output  # the learner's directory is not collected
    assert "meta_tests" not in output  # nor the suite's self-tests, unless named
    import torch

    if not torch.cuda.is_available():
        assert " not run (CUDA is not available on this machine)" in output and "skipped" not in output.splitlines()[-1]


def test_a_shared_cause_is_reported_once_and_the_scorecard_is_written(learner_run, pytester: pytest.Pytester) -> None:
    """Several properties failing for one reason: one line for the cause, then the properties; the same
    scorecard as Markdown and JSON."""
    import json

    result, _ = learner_run("--impl", str(PLUGINS / "returns_tuple.py"), "properties/test_normalization.py",
                            "-k", "LayerNorm and (dtype0 or torch_norm or rows_are_independent)",
                            "--scorecard", str(pytester.path / "card"))
    output = result.stdout.str()
    assert result.ret == 1, output
    assert " ".join(output.split()).count("returned a tuple; the spec's LayerNorm returns one tensor") == 1, output
    assert "3 properties failed with:" in output, output
    card = json.loads((pytester.path / "card.json").read_text())
    (only,) = card["implementations"]
    assert only["totals"]["failed"] == 3 and len(only["shared_causes"]) == 1
    assert "3 properties failed with:" in (pytester.path / "card.md").read_text()


def test_the_plugin_is_inert_in_another_project(pytester: pytest.Pytester) -> None:
    """Without --impl, in another project's run, the plug-in parametrizes, skips and prints nothing."""
    pytester.makepyfile(test_other="""
        import pytest

        @pytest.fixture
        def device():
            return "the other project's device"

        def test_uses_its_own_device(device):
            assert device == "the other project's device"
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    output = result.stdout.str()
    assert "scorecard" not in output and "CUDA cases" not in output and "implementations under test" not in output


def test_a_thread_left_running_is_reported_and_does_not_hang_the_run(pytester: pytest.Pytester) -> None:
    """A non-daemon thread the plug-in starts and never ends: reported, and pytest still exits."""
    start = time.perf_counter()
    result = pytester.runpytest_subprocess(
        *QUIET, "--impl", str(PLUGINS / "leaves_thread.py"), *NARROW, timeout=60)
    output = result.stdout.str()
    assert "the implementation left thread 'norm-prefetch' (its function keep_busy is at leaves_thread.py:" in output, output
    assert result.ret == 1, output  # the claims held, but a thread left behind fails the run
    assert time.perf_counter() - start < 60


def test_the_scorecard_says_which_configurations_a_declaration_left_unchecked(learner_run, pytester) -> None:
    """A declaration narrows what is checked (``average_log_prob=False``: the mean is never drawn); the
    scorecard names it next to the claims that held, in the terminal and in the JSON."""
    import json

    example = Path(__file__).resolve().parent.parent / "examples" / "dpo_trainer_style.py"
    result, _ = learner_run("--impl", str(example), "properties/test_preference_optimization.py",
                            "-k", "sequence_logprobs_uses_the_pinned_shift", "--scorecard", str(pytester.path / "card.json"))
    output = " ".join(result.stdout.str().split())
    assert result.ret == 0, output
    assert "checked only in the configurations offered" in output, output
    assert "sequence_logprobs: average_log_prob=False" in output, output
    (only,) = json.loads((pytester.path / "card.json").read_text())["implementations"]
    (row,) = [r for r in only["components"] if r["name"] == "sequence_logprobs"]
    assert row["checked_only_with"] == "average_log_prob=False"
