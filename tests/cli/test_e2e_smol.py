"""One real run: SmolLM2-135M-Instruct on the HH slice, a few DPO steps in the machine's default precision (bf16
autocast where the CPU has bf16 arithmetic, else fp32), logged to MLflow."""

import math

import mlflow
import pytest

from bench.cli import main
from bench.runs.training import default_precision

pytestmark = pytest.mark.e2e


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_dpo_on_smollm2_and_hh(workdir, hh_path):
    main(["train", "dpo", "--recipe", "smol-hh", f"--data.path={hh_path}", "--trainer.max_steps=3",
          "--data.batch_size=2", "--data.eval_batch_size=2", "--trainer.val_check_interval=3",
          "--trainer.limit_val_batches=1", "--data.max_train_pairs=6", "--data.max_val_pairs=2"])  # what it reads
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("smol-hh").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "smollm2-135m-instruct" and run.data.params["trainer.precision"] == default_precision()
    def history(name):
        return [m.value for m in client.get_metric_history(run.info.run_id, name)]

    losses = history("train/loss")
    assert len(losses) == 3
    # Policy == reference at step 0, up to bf16 noise: the cached reference log-probs were computed in other
    # batches, so they agree with the policy's to a fraction of a percent of each summed log-prob, not exactly.
    chosen_logratio = history("train/rewards/chosen")[0] / 0.1
    assert abs(chosen_logratio) < 0.02 * abs(history("train/logps/chosen")[0])
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)
    assert all(math.isfinite(v) for v in losses) and losses[1:] != [losses[0]] * 2
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert f"train/{name}" in run.data.metrics and f"val/{name}" in run.data.metrics
    assert run.data.metrics["train/logps/chosen"] < 0
