import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HH_PATH = Path(os.environ.get("HH_RLHF_PATH", REPO.parent / "shared" / "data" / "hh-rlhf"))


@pytest.fixture(scope="session")
def hh_path() -> str:
    if not (HH_PATH / "harmless-base" / "test.jsonl.gz").exists():
        pytest.fail(f"the HH-RLHF slice is missing at {HH_PATH}; set HH_RLHF_PATH")
    return str(HH_PATH)


@pytest.fixture(scope="session")
def tokenizer():
    from bench.core.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own sqlite MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def refused_tiny_training(workdir, capsys):
    """`bench train ALGORITHM --recipe tiny FLAGS...` refused at parse time: exit 2, one message and no
    traceback, no run started. Returns its stderr."""
    from bench.cli import main

    def refused(algorithm: str, *flags: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", algorithm, "--recipe", "tiny", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not (workdir / "runs").exists()
        return err

    return refused


@pytest.fixture(scope="session")
def reward_models(tmp_path_factory):
    """Untrained MiniLM reward models saved as a proxy and as a judge, their fresh heads drawn from a fixed seed
    (a test that fails on them fails again)."""
    import torch

    from modules.reward_model import ROLE_KEY, RewardModel

    root = tmp_path_factory.mktemp("reward_models")
    for seed, role in enumerate(("proxy", "judge")):  # two heads: the judge does not score as the proxy does
        module = RewardModel(backbone="all-minilm-l6-v2", role=role)
        with torch.random.fork_rng():  # the tests' own random state is left as it was
            torch.manual_seed(seed)
            module.configure_model()
        setattr(module.model.config, ROLE_KEY, role)
        module.model.save_pretrained(root / role)
        module.tokenizer.save_pretrained(root / role)
    return {role: str(root / role) for role in ("proxy", "judge")}


@pytest.fixture
def ctrl_c_at_third_batch(monkeypatch):
    """Ctrl-C during the DPO loss of the third training batch (step 2), as a user would press it."""
    import signal

    import modules.dpo

    calls, real_loss, armed = [], modules.dpo.dpo_loss, {"armed": True}

    def dpo_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and armed["armed"]:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(modules.dpo, "dpo_loss", dpo_loss)
    handler = signal.getsignal(signal.SIGINT)
    yield armed
    signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT once interrupted
