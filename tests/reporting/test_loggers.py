"""Run loggers: the no-op base, credential detection, and wandb in offline mode (never the network)."""

import logging
import sys

import pytest

from experiment import config
from experiment.config import Config
from experiment.identity import config_hash
from reporting import loggers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No credentials anywhere, every wandb path inside tmp_path, and any network attempt pointed at a closed port."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # does not exist
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):  # fmt: skip
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: a network attempt fails at once
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _cfg(**values) -> Config:
    base = {
        name: config.OPTIONS[name].default for name in ("logger", "wandb_project", "wandb_entity", "wandb_run_name")
    }
    return Config({**base, **values})


def test_base_logger_records_nothing(tmp_path):
    logger = loggers.build_logger(_cfg(), tmp_path / "run")
    assert type(logger) is loggers.RunLogger
    logger.log_config({"a": 1})
    logger.log_scalars({"loss": 1.0}, step=3)
    logger.log_task(1, {"accuracy": 50.0})
    logger.log_image("x", tmp_path / "missing.png")
    logger.finish()
    assert not (tmp_path / "run").exists()


def test_default_run_name():
    assert loggers.default_run_name(_cfg(dataset="bloodmnist", method="ccsi", seed=1)) == "bloodmnist-ccsi-seed1"
    assert loggers.default_run_name(_cfg(dataset="digits", wandb_run_name="mine", seed=0)) == "mine"
    assert loggers.default_run_name(_cfg()) is None  # wandb picks its own name


def test_credentials_detection(wandb_env, monkeypatch):
    assert not loggers.wandb_credentials_found()
    netrc = wandb_env / "home" / ".netrc"
    netrc.write_text("machine other.host login user password abc\n")
    assert not loggers.wandb_credentials_found()  # an entry for another host does not count
    netrc.write_text("machine 127.0.0.1:9 login user password abc\n")
    netrc.chmod(0o600)
    assert loggers.wandb_credentials_found()
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.wandb_credentials_found()


def _image(path):
    from reporting.plots import plot_method_curves

    return plot_method_curves(path, {"a": [90.0, 80.0]}, "curve")[0]  # [png, pdf]


def test_wandb_offline_logs_config_scalars_and_image(wandb_env, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")  # explicitly offline: no "no API key" message
    out = wandb_env / "run"
    png = _image(wandb_env / "curve.png")
    with caplog.at_level(logging.WARNING, logger="loggers"):
        logger = loggers.WandbLogger({"lr": 0.1, "seed": 3}, "ccsi-test", None, "offline-run", out)
    assert "no API key" not in caplog.text
    assert logger.run.settings.mode == "offline"
    logger.log_config({"extra_key": "x"})
    assert logger.run.config["lr"] == 0.1 and logger.run.config["extra_key"] == "x"
    logger.log_scalars({"task1/loss": 1.5, "task1/lr": 0.1})
    logger.log_scalars({"task1/loss": 1.0}, step=5)
    logger.log_task(1, {"task": 1, "accuracy": 80.0, "accuracy_matrix": [[80.0]]})
    logger.log_image("curve", png)
    sync_dir = logger.run.settings.sync_dir
    logger.finish()
    logger.finish()  # second call is a no-op

    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert [str(d) for d in run_dirs] == [sync_dir]
    assert list(run_dirs[0].glob("run-*.wandb"))  # the transaction log to sync later
    images = list(run_dirs[0].glob("files/media/images/curve_*.png"))
    assert images and images[0].read_bytes()[:8] == PNG_MAGIC
    assert not (wandb_env / "wandb_dir" / "wandb").exists()  # output_dir wins over WANDB_DIR


def test_wandb_without_key_goes_offline_and_says_so(wandb_env, caplog):
    cfg = _cfg(logger="wandb", dataset="digits", method="ccsi", seed=2)
    with caplog.at_level(logging.WARNING, logger="loggers"):
        logger = loggers.build_logger(cfg, wandb_env / "run")
    try:
        assert isinstance(logger, loggers.WandbLogger)
        assert logger.run.settings.mode == "offline"
        assert logger.run.name == "digits-ccsi-seed2"
        messages = [r.getMessage() for r in caplog.records if "no API key" in r.getMessage()]
        assert len(messages) == 1
        assert f"wandb sync {logger.run.settings.sync_dir}" in messages[0]
        assert str(wandb_env / "run" / "wandb") in messages[0]
    finally:
        logger.finish()


def test_default_run_name_from_a_loaded_config(make_cfg):
    cfg = make_cfg()
    assert cfg.logger == "none"
    # make_cfg sets these result-changing keys as overrides (dataset goes to the group; device, output_dir... change
    # no result)
    assert loggers.default_run_name(cfg) == "batch_size=32 epochs=2 lr=0.05 select_on=last seed0"


@pytest.mark.e2e
def test_tensorboard_logs_the_scalars_and_figures_wandb_gets(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import incremental_train_and_eval as engine

    summary = engine.run(make_cfg(logger="tensorboard", nb_cl_fg=4, nb_cl=3, epochs=2, method="finetune"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    test_acc = [(e.step, e.value) for e in events.Scalars("task/test_accuracy")]
    assert [step for step, _ in test_acc] == [1, 2, 3]  # 4 + 3 + 3 classes
    assert [v for _, v in test_acc] == pytest.approx(summary["accuracy_per_task"], abs=1e-4)
    assert events.Scalars("final/last_accuracy")[0].value == pytest.approx(summary["last_accuracy"], abs=1e-4)
    assert len(events.Scalars("task1/loss")) == 2  # one per epoch
    assert {"accuracy_per_task", "accuracy_matrix", "confusion_matrix"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]


@pytest.mark.e2e
@pytest.mark.parametrize("logger, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_logger_whose_package_is_missing_ends_the_run_in_one_line(logger, module, tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.setitem(sys.modules, module, None)  # the package cannot be imported
    with pytest.raises(config.ConfigError) as info:
        loggers.build_logger(_cfg(logger=logger), tmp_path / "run")
    message = str(info.value)
    assert message.startswith(f"logger: {logger} needs the {logger} package") and "\n" not in message
    assert f"`pip install {logger}`" in message and "--logger=none" in message

    argv = ["--nb_cl_fg=8", "--nb_cl=2", "--device=cpu", "--progress=false", f"--logger={logger}"]
    assert main.main([*argv, f"--output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {message}"]  # one line, no traceback


def test_logger_takes_several_and_refuses_an_unknown_one_when_the_config_loads():
    assert loggers.logger_names("wandb,tensorboard") == ["wandb", "tensorboard"]
    assert loggers.logger_names("none") == [] and loggers.logger_names("tensorboard,wandb")[0] == "tensorboard"
    assert config.load_config(overrides={"logger": "wandb,tensorboard"}).logger == "wandb,tensorboard"
    with pytest.raises(config.ConfigError, match="key 'logger'"):
        config.load_config(overrides={"logger": "wandb,tensorbord"})
    with pytest.raises(config.ConfigError, match="unknown logger 'mlflow'"):
        loggers.logger_names("wandb,mlflow")


def _run_cfg(tmp_path, **overrides) -> Config:
    values = {"dataset": "digits", "method": "finetune", "output_dir": str(tmp_path / "run"), **overrides}
    return config.load_config(overrides=values)


def test_wandb_group_is_the_experiment_without_the_seed_and_the_name_its_command_line_keys(tmp_path):
    seed0, seed1 = (_run_cfg(tmp_path, lr=0.05, lamda=3, seed=s).to_dict() for s in (0, 1))
    group = loggers.wandb_group(seed0)
    expected_hash = config_hash({k: v for k, v in seed0.items() if k != "seed"})
    assert group == f"digits-finetune-improved-{expected_hash}" == loggers.wandb_group(seed1)
    assert loggers.wandb_group(_run_cfg(tmp_path, lr=0.1, seed=0).to_dict()) != group  # another experiment
    # the name: result-changing keys set on the command line (not dataset/method/output_dir/logger), then the seed
    assert (
        loggers.default_run_name(_run_cfg(tmp_path, lr=0.05, lamda=3, seed=1, logger="wandb"))
        == "lamda=3 lr=0.05 seed1"
    )
    assert loggers.default_run_name(_run_cfg(tmp_path, seed=2)) == "digits-finetune-seed2"
    long = loggers.default_run_name(_run_cfg(tmp_path, class_order=list(range(100)), seed=4))
    assert len(long) == 128 and long.endswith("… seed4")


def test_wandb_and_tensorboard_at_once_offline_with_group_name_and_hparams(wandb_env, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _run_cfg(wandb_env, lr=0.05, seed=1, logger="wandb,tensorboard")
    logger = loggers.build_logger(cfg, wandb_env / "run")
    assert isinstance(logger, loggers.MultiLogger)
    wandb_logger, tb_logger = logger.loggers
    assert isinstance(wandb_logger, loggers.WandbLogger) and isinstance(tb_logger, loggers.TensorBoardLogger)
    assert wandb_logger.run.group == loggers.wandb_group(cfg.to_dict()) and wandb_logger.run.name == "lr=0.05 seed1"
    assert wandb_logger.run.settings.mode == "offline"
    logger.log_config(cfg.to_dict())
    logger.log_scalars({"task1/loss": 1.5})
    summary = {"average_incremental_accuracy": 70.0, "last_accuracy": 60.0, "forgetting": 12.5, "num_tasks": 2}
    logger.log_summary(summary)
    assert wandb_logger.run.summary["final/last_accuracy"] == 60.0
    logger.finish()
    assert list((wandb_env / "run" / "wandb").glob("offline-run-*/run-*.wandb"))

    events = EventAccumulator(str(wandb_env / "run" / "tensorboard" / "hparams")).Reload()
    assert events.Scalars("hparam/last_accuracy")[0].value == 60.0
    assert events.Scalars("hparam/forgetting")[0].value == 12.5
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 0.05 and hparams["seed"].number_value == 1
    assert hparams["dataset"].string_value == "digits" and hparams["method"].string_value == "finetune"
    assert "batch_size" not in hparams and "output_dir" not in hparams  # default value; not result-changing
    assert "task1/loss" not in events.Tags()["scalars"]  # training scalars stay in the run's own event file
    assert len(EventAccumulator(str(wandb_env / "run" / "tensorboard")).Reload().Scalars("task1/loss")) == 1
