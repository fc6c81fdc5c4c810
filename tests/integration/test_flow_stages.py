"""The flow's stage task against real DVC: what it reports and when it retries."""

import textwrap

import pytest
from prefect import flow

from flows.pipeline import StageFailed, run_stage, stage_names
from tests.conftest import dvc, git


@pytest.fixture
def project(tmp_path):  # noqa: ANN001, ANN201
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          ok:
            cmd: python -c "open('out.txt', 'w').write(open('in.txt').read())"
            deps: [in.txt]
            outs: [out.txt]
          flaky:
            cmd: python -c "open('tries', 'a').write('.'); raise SystemExit(75)"
          broken:
            cmd: python -c "open('tries_broken', 'a').write('.'); raise SystemExit(2)"
        """))
    (tmp_path / "in.txt").write_text("x")
    git(tmp_path, "init", "-q")
    assert dvc(tmp_path, "init", "-q").returncode == 0
    return tmp_path


def test_a_stage_runs_then_is_reported_skipped_then_restored_from_the_run_cache(
        project, prefect_harness):
    @flow
    def twice() -> list[str]:
        return [run_stage("ok", str(project)).status, run_stage("ok", str(project)).status]

    assert twice() == ["ran", "skipped"]
    assert (project / "out.txt").read_text() == "x"
    (project / "out.txt").unlink()  # DVC has this exact run in its run cache

    @flow
    def once() -> str:
        return run_stage("ok", str(project)).status

    assert once() == "restored"
    assert (project / "out.txt").read_text() == "x"


def test_only_transient_failures_are_retried(project, prefect_harness):
    fast = run_stage.with_options(retry_delay_seconds=0)

    @flow
    def attempt(stage: str) -> None:
        fast(stage, str(project))

    with pytest.raises(Exception, match="exited with 75"):
        attempt("flaky")
    assert (project / "tries").read_text() == "..."  # first try + 2 retries
    with pytest.raises(StageFailed, match="exited with 2"):
        attempt("broken")
    assert (project / "tries_broken").read_text() == "."  # a user error is not retried


def test_stage_order_is_the_dvc_yaml_order(project):
    assert stage_names(project) == ["ok", "flaky", "broken"]


def test_foreach_groups_are_listed_instance_by_instance_and_progress_reaches_the_log(
        project, prefect_harness, caplog):
    (project / "params.yaml").write_text("runs:\n  a: {n: 2}\n  b-2: {n: 3}\n")
    (project / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          count:
            foreach: ${runs}
            do:
              cmd: python -c "import time; [print(f'step {i}', flush=True) or time.sleep(0.2) for i in range(${item.n})]"
              params:
                - runs.${key}
        """))
    assert stage_names(project) == ["count@a", "count@b-2"]

    @flow
    def one() -> str:
        return run_stage("count@b-2", str(project)).status

    assert one() == "ran"
    logged = [r.getMessage() for r in caplog.records]
    assert [m for m in logged if m.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert not any("git add" in m or "dvc push" in m for m in logged)  # DVC's hints left out


def test_a_bad_params_file_stops_the_flow_command_before_it_starts(tmp_path, capsys):
    from flows.pipeline import run_main

    (tmp_path / "params.yaml").write_text("pretrain:\n  gpt:\n    family: gpt\n    lrr: 0.1\n")
    started = []
    code = run_main(lambda: started.append(1), lambda r: ["ran"], tmp_path / "params.yaml")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not started
    assert len(err) == 1  # one line, no traceback
    assert err[0].startswith(f"error: {tmp_path / 'params.yaml'}: unknown key 'pretrain.gpt.lrr' "
                             "(allowed here: ")
    assert "lr, max_steps" in err[0]
