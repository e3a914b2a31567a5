"""Worker processes for independent experiment stages (experiments/parallel.py), and the annotator state the
Gao driver hands to a seed's worker (its labels must be those of the sequential loop)."""

import os
import pickle

import numpy as np
import pytest

from experiments import parallel
from experiments.pipeline import StagePreempted
from tasks.gold import SimulatedAnnotator


def square_and_log(x):
    print(f"job {x} in {os.getpid()}")
    return {"x": x, "square": x * x, "pid": os.getpid()}


def fail_on_two(x):
    if x == 2:
        raise ValueError("two is not allowed")
    return x


def preempt(x):
    raise StagePreempted({"preempted_at": x})


def test_results_in_job_order_and_each_job_logs_to_its_file(tmp_path):
    logs = [str(tmp_path / f"job{x}" / "stages.log") for x in range(3)]
    results = parallel.run_in_processes(square_and_log, [{"x": x} for x in range(3)], workers=2, log_paths=logs)
    assert [r["square"] for r in results] == [0, 1, 4]
    assert all(r["pid"] != os.getpid() for r in results)  # ran elsewhere
    for x, path in enumerate(logs):
        assert f"job {x} in {results[x]['pid']}" in open(path).read()


def test_a_failed_job_names_its_log_after_the_others_finish(tmp_path):
    logs = [str(tmp_path / f"{x}.log") for x in range(4)]
    with pytest.raises(RuntimeError, match=r"ValueError: two is not allowed.*2\.log"):
        parallel.run_in_processes(fail_on_two, [{"x": x} for x in range(4)], workers=1, log_paths=logs)
    assert all(os.path.exists(p) for p in logs)  # job 3, after the failure, still ran


def test_preemption_comes_back_as_stage_preempted(tmp_path):
    with pytest.raises(StagePreempted) as stopped:
        parallel.run_in_processes(preempt, [{"x": 7}], workers=1, log_paths=[str(tmp_path / "p.log")])
    assert stopped.value.result == {"preempted_at": 7}


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        parallel.run_in_processes(square_and_log, [{"x": 1}], workers=0, log_paths=["a"])
    with pytest.raises(ValueError, match="1 jobs but 2 log paths"):
        parallel.run_in_processes(square_and_log, [{"x": 1}], workers=1, log_paths=["a", "b"])


def test_annotator_state_continues_the_sequential_labels():
    """The main process labels seed 0's held-out pairs and passes its rng state (pickled) to the worker,
    which must then draw the training labels the sequential loop draws."""
    rng = np.random.default_rng(3)
    eval_a, eval_b, train_a, train_b = (rng.normal(size=50) for _ in range(4))
    sequential = SimulatedAnnotator(lambda t: t, temperature=0.3, seed=11)
    sequential.label_scores(eval_a, eval_b)
    expected = sequential.label_scores(train_a, train_b)

    main = SimulatedAnnotator(lambda t: t, temperature=0.3, seed=11)
    main.label_scores(eval_a, eval_b)
    state = pickle.loads(pickle.dumps(main.rng.bit_generator.state))
    worker = SimulatedAnnotator(lambda t: t, temperature=0.3, seed=11)
    fresh = worker.label_scores(train_a, train_b)
    worker = SimulatedAnnotator(lambda t: t, temperature=0.3, seed=11)
    worker.rng.bit_generator.state = state
    np.testing.assert_array_equal(worker.label_scores(train_a, train_b), expected)
    assert not np.array_equal(fresh, expected)  # without the state the labels would differ
