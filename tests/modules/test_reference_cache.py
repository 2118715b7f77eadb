"""The on-disk reference log-prob cache: equal to scoring with the reference, shared across runs and
algorithms, missed when anything that changes the numbers changes, and rebuilt when corrupted."""

import logging

import lightning.pytorch as L
import pytest
import torch

import modules.base
from bench.core.models import load_causal_lm
from datamodules.hh_datamodule import HHRLHFDataModule
from modules import DPO, KTO
from modules.logps import sequence_logps


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "reference_logps"
    monkeypatch.setenv("BENCH_REFERENCE_CACHE", str(root))
    return root


def datamodule(hh_path, view="paired", **kwargs):
    settings = dict(path=hh_path, tokenizer="tiny", view=view, max_length=96, max_prompt_length=48, batch_size=4,
                    max_train_pairs=16, max_val_pairs=4) | kwargs
    return HHRLHFDataModule(**settings)


def fit(module, dm, tmp_path, precision="32-true"):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, precision=precision,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return trainer


def computed_count(caplog) -> int | None:
    """How many sequences the last fit scored with the reference, from its log (None: it scored none)."""
    counts = [int(r.getMessage().split(" of ")[1].split()[0]) for r in caplog.records
              if r.getMessage().startswith("computed reference log-probs")]
    caplog.clear()
    return counts[-1] if counts else None


@pytest.mark.parametrize("precision, tolerance", [("32-true", 1e-5), ("bf16-mixed", 2e-2)])
def test_cached_logps_equal_the_reference_forward(hh_path, tmp_path, precision, tolerance):
    dm = datamodule(hh_path)
    fit(DPO(policy="tiny"), dm, tmp_path, precision)
    batch = next(iter(dm.train_dataloader()))
    assert batch["reference_logps"].shape == (8,)  # 4 pairs: chosen then rejected
    reference = load_causal_lm("tiny").eval()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        expected = sequence_logps(reference, batch).total
    torch.testing.assert_close(batch["reference_logps"], expected.float(), rtol=tolerance, atol=tolerance)


def test_second_run_does_not_load_the_reference(hh_path, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    fit(DPO(policy="tiny"), datamodule(hh_path), tmp_path)
    n_sequences = 2 * (16 + 4)
    assert computed_count(caplog) == n_sequences
    loaded = []
    real_load = modules.base.load_causal_lm
    monkeypatch.setattr(modules.base, "load_causal_lm", lambda spec, *a, **k: loaded.append(spec) or real_load(spec, *a, **k))
    module = DPO(policy="tiny", beta=0.2)  # another run of another config, same reference and data
    fit(module, datamodule(hh_path), tmp_path)
    assert loaded == ["tiny"], "only the policy is loaded"
    assert module.reference is None
    assert "the reference model is not loaded" in caplog.text
    assert computed_count(caplog) is None


def test_kto_reuses_dpo_rows_and_scores_only_its_mismatched_ones(hh_path, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    fit(DPO(policy="tiny"), datamodule(hh_path), tmp_path)
    computed_count(caplog)
    dm = datamodule(hh_path, "unpaired")
    fit(KTO(policy="tiny"), dm, tmp_path)
    kl_rows = {(tuple(r["prompt_ids"]), tuple(r["kl_completion_ids"])) for view in dm.views.values() for r in view}
    # The chosen and rejected rows are DPO's; only mismatched completions are new (a few may coincide).
    assert 0 < computed_count(caplog) <= len(kl_rows)


def test_a_changed_setting_misses_the_cache(hh_path, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    fit(DPO(policy="tiny"), datamodule(hh_path), tmp_path)
    n_sequences = computed_count(caplog)
    other = load_causal_lm("tiny")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other-reference")
    changes = {
        # The same token ids for most rows: the setting alone decides.
        "max_length": (DPO(policy="tiny"), datamodule(hh_path, max_length=97), "32-true"),
        "chat_template": (DPO(policy="tiny"), datamodule(hh_path, chat_template=False), "32-true"),
        "precision": (DPO(policy="tiny"), datamodule(hh_path), "bf16-mixed"),
        "reference": (DPO(policy="tiny", reference=str(tmp_path / "other-reference")), datamodule(hh_path), "32-true"),
    }
    for change, (module, dm, precision) in changes.items():
        fit(module, dm, tmp_path, precision)
        assert computed_count(caplog) == n_sequences, change


def test_a_corrupted_shard_is_rebuilt_not_used(hh_path, tmp_path, caplog, cache_root):
    caplog.set_level(logging.INFO)
    dm = datamodule(hh_path)
    fit(DPO(policy="tiny"), dm, tmp_path)
    n_sequences = computed_count(caplog)
    first = next(iter(dm.train_dataloader()))["reference_logps"]
    [arrow] = list(cache_root.glob("*/shard-*/*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-200:-100] = bytes(100)  # zero a stretch of the log-prob column
    arrow.write_bytes(bytes(data))
    dm = datamodule(hh_path)
    fit(DPO(policy="tiny"), dm, tmp_path)
    assert "is corrupted" in caplog.text
    assert computed_count(caplog) == n_sequences
    torch.testing.assert_close(next(iter(dm.train_dataloader()))["reference_logps"], first)
    assert len(list(cache_root.glob("*/shard-*"))) == 1


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_second_bench_train_says_it_does_not_load_the_reference(workdir, hh_path, caplog):
    from bench.cli import main

    caplog.set_level(logging.INFO)
    argv = ["train", "dpo", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1", "--eval=false"]
    main(argv)
    assert computed_count(caplog) == 2 * (64 + 16)  # the tiny recipe's train and validation pairs
    main([*argv, "--model.beta=0.3"])
    assert "the reference model is not loaded" in caplog.text
    assert computed_count(caplog) is None


def test_checkpoints_leave_out_the_reference_and_resume_with_or_without_it(hh_path, tmp_path):
    def trainer(steps):
        return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)

    first = trainer(1)
    first.fit(DPO(policy="tiny", reference_cache=False), datamodule=datamodule(hh_path))
    checkpoint = first.checkpoint_callback.best_model_path
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert any(k.startswith("policy.") for k in state) and not any(k.startswith("reference.") for k in state)
    for cached in (False, True):
        resumed = trainer(2)
        resumed.fit(DPO(policy="tiny", reference_cache=cached), datamodule=datamodule(hh_path), ckpt_path=checkpoint)
        assert resumed.global_step == 2
