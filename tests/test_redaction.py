"""Redaction: the name rule, nested values and URLs, and the files and console lines that go through it."""

from __future__ import annotations

import json
import logging
import os
import uuid

import pytest
import torch

from tests.helpers import digits, make_model
from trainer_lib import Trainer, TrainingArguments
from trainer_lib.redaction import REDACTED, is_secret_key, mask_urls, redact

CANARY = "canary-" + uuid.uuid4().hex


@pytest.mark.parametrize("name", [
    "api_key", "apiKey", "private_key", "ssh_key", "auth_token", "authToken", "hub_token", "db_password", "PASSWORD",
    "passwd", "auth", "Authorization", "client_secret", "clientsecret", "AWS_SECRET_ACCESS_KEY", "credentials",
    "sentry_dsn", "session", "cookie", "dagshub.user-token", "private_key_pem",
])
def test_credential_names_are_secret_as_word_parts(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", [
    "num_tokens", "max_tokens", "tokenizer_name", "pad_token_id", "eval_steps", "session_count", "metric_key_prefix",
    "monkey", "hotkey", "sort_keys", "keep_last", "password_file", "max_steps", "save_total_limit", "author",
    "MLFLOW_TRACKING_URI",
])
def test_names_that_only_describe_or_contain_the_letters_are_not_secret(name):
    assert not is_secret_key(name)


def test_a_dict_or_list_under_a_secret_name_is_hidden_whole_and_urls_are_masked_anywhere():
    params = {
        "auth": {"user": "me", "password": CANARY},
        "ssh_key": [CANARY, CANARY],
        "credentials": [{"name": "x", "value": CANARY}],
        "database": {"url": f"postgresql://me:{CANARY}@db.example/prod", "pool": 3},
        "endpoints": [f"https://{CANARY}@git.example/repo.git", f"https://host/x?a=1&token={CANARY}&b=2"],
        "nested": {"deeper": {"private_key": CANARY, "steps": 5}},
        "hub_token": None,  # "not set" stays visible
    }
    clean = redact(params, set())
    text = json.dumps(clean)
    assert CANARY not in text
    assert clean["auth"] == clean["ssh_key"] == clean["credentials"] == REDACTED
    assert clean["database"] == {"url": "postgresql://me:***@db.example/prod", "pool": 3}
    assert clean["endpoints"] == ["https://***@git.example/repo.git", f"https://host/x?a=1&token={REDACTED}&b=2"]
    assert clean["nested"]["deeper"] == {"private_key": REDACTED, "steps": 5}
    assert clean["hub_token"] is None
    assert mask_urls("http://127.0.0.1:5000/api and mailto:a@b") == "http://127.0.0.1:5000/api and mailto:a@b"


class SecretConfigModel(torch.nn.Module):
    """A model whose config carries credentials, as a user's own model may."""

    def __init__(self):
        super().__init__()
        self.inner = make_model()
        self.config = {"hidden": 32, "auth": {"password": CANARY}, "private_key": CANARY,
                       "source": f"postgresql://reader:{CANARY}@db.example/features"}

    def forward(self, x, labels=None):
        return self.inner(x, labels)


def test_checkpoints_and_saved_models_hold_the_model_config_and_arguments_redacted(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_SERVICE_TOKEN", raising=False)  # the canary is known only by its shape, not from env
    train, _ = digits(64, 16)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, disable_tqdm=True,
                             per_device_train_batch_size=16,
                             extra={"auth": {"password": CANARY}, "ssh_key": CANARY,
                                    "warehouse": f"postgresql://u:{CANARY}@host/db"})
    trainer = Trainer(SecretConfigModel(), args, train_dataset=train)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    written = [os.path.join(d, n) for d, _, files in os.walk(tmp_path) for n in files]
    assert any(p.endswith("config.json") for p in written) and any(p.endswith("training_args.json") for p in written)
    leaked = [p for p in written if CANARY.encode() in open(p, "rb").read()]
    assert not leaked
    config = json.load(open(tmp_path / "final" / "config.json"))
    assert config == {"hidden": 32, "auth": REDACTED, "private_key": REDACTED,
                      "source": "postgresql://reader:***@db.example/features"}


def test_a_password_in_the_mlflow_uri_is_masked_on_the_console(mlflow_server, tmp_path, monkeypatch, capfd, caplog):
    host = mlflow_server.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://flytrain:{CANARY}@{host}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"masked-{uuid.uuid4().hex[:8]}")
    caplog.set_level(logging.INFO)
    train, _ = digits(64, 16)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_strategy="no", disable_tqdm=True,
                             per_device_train_batch_size=16, report_to=["mlflow"], strict_integrations=True)
    Trainer(make_model(), args, train_dataset=train).train()
    out, err = capfd.readouterr()
    console = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert CANARY not in console
    assert f"http://flytrain:***@{host}" in console  # our "MLflow run … at" and "View MLflow run at" lines
    assert "View MLflow run at" in console
