"""DagsHub integration: MLflow tracking on a DagsHub repository, plus the final model and arguments committed to it.

Environment: everything MLflowCallback reads, and DAGSHUB_USER_TOKEN (required; never logged), MLFLOW_TRACKING_URI of
the form ``https://dagshub.com/<owner>/<repo>.mlflow`` or DAGSHUB_REPO_OWNER + DAGSHUB_REPO_NAME, BRANCH (default
main), DAGSHUB_CLIENT_HOST (the DagsHub client's host), DAGSHUB_HTTP_TIMEOUT (seconds, default 30),
HF_DAGSHUB_LOG_ARTIFACTS (upload model.safetensors + training_args.json into ``artifacts/`` at train end).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from trainer_lib.checkpoint import ARGS, WEIGHTS

from ._common import env_flag, env_seconds, redact
from .mlflow import MLflowCallback

logger = logging.getLogger(__name__)

DEFAULT_HOST = "https://dagshub.com"
ARTIFACTS_DIR = "artifacts"
#: requests one upload makes (repository info, branch head, content PUT); the whole upload gets that many timeouts
_UPLOAD_REQUESTS = 3


@dataclass(frozen=True)
class DagsHubRepo:
    owner: str
    name: str
    host: str
    branch: str


def _origin(url: str) -> str:
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.hostname:
        return ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def resolve_repo() -> DagsHubRepo:
    """The repository to commit to: DAGSHUB_REPO_OWNER/NAME, else parsed from MLFLOW_TRACKING_URI."""
    branch = os.environ.get("BRANCH", "").strip() or "main"
    client_host = os.environ.get("DAGSHUB_CLIENT_HOST", "").strip().rstrip("/")
    owner = os.environ.get("DAGSHUB_REPO_OWNER", "").strip()
    name = os.environ.get("DAGSHUB_REPO_NAME", "").strip()
    if owner and name:
        return DagsHubRepo(owner, name, client_host or DEFAULT_HOST, branch)
    if owner or name:
        raise ValueError("DagsHub: set both DAGSHUB_REPO_OWNER and DAGSHUB_REPO_NAME, or neither")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    path = [p for p in urlsplit(uri.strip()).path.split("/") if p] if _origin(uri) else []
    if len(path) != 2 or not path[1].endswith(".mlflow") or path[1] == ".mlflow":
        raise ValueError(
            f"DagsHub: MLFLOW_TRACKING_URI={uri!r} is not a DagsHub tracking URI; expected "
            f"'https://dagshub.com/<owner>/<repo>.mlflow' (or set DAGSHUB_REPO_OWNER and DAGSHUB_REPO_NAME)"
        )
    return DagsHubRepo(path[0], path[1][: -len(".mlflow")], client_host or _origin(uri), branch)


def require_token() -> str:
    """DAGSHUB_USER_TOKEN, or an immediate error: the client must never fall back to an interactive login."""
    token = os.environ.get("DAGSHUB_USER_TOKEN", "").strip()
    if not token:
        raise RuntimeError(
            "DagsHub: no access token. Set DAGSHUB_USER_TOKEN (DagsHub > User settings > Tokens); "
            "flytrain never starts an interactive or browser login."
        )
    return token


def run_bounded(fn, seconds: float, what: str) -> Any:
    """``fn()`` in a daemon thread; a TimeoutError if it has not returned after ``seconds``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"flytrain-dagshub-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"DagsHub {what} did not finish within {seconds:g}s (DAGSHUB_HTTP_TIMEOUT x {_UPLOAD_REQUESTS})")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class DagsHubCallback(MLflowCallback):
    """MLflowCallback whose run lives on a DagsHub repository; at train end it can commit the model to the repo."""

    integration_name = "dagshub"
    required_modules = ("dagshub", "mlflow")
    pip_extra = "dagshub"

    def setup(self, args, state, model, **kwargs) -> None:
        if env_flag("DISABLE_MLFLOW_INTEGRATION"):
            return super().setup(args, state, model, **kwargs)
        self._token = require_token()
        self._repo = resolve_repo()
        self._http_timeout = env_seconds("DAGSHUB_HTTP_TIMEOUT", 30.0)
        self._log_repo_artifacts = env_flag("HF_DAGSHUB_LOG_ARTIFACTS")
        self._mlflow_credentials()
        super().setup(args, state, model, **kwargs)

    def _mlflow_credentials(self) -> None:
        """Let MLflow authenticate with the token, but only against the repository's own host."""
        if _origin(os.environ.get("MLFLOW_TRACKING_URI", "")) != self._repo.host:
            return
        if any(os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")):
            return
        os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("DAGSHUB_USERNAME") or self._repo.owner
        os.environ["MLFLOW_TRACKING_PASSWORD"] = self._token

    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control, model=model, **kwargs)
        if getattr(self, "_log_repo_artifacts", False) and self._active(args, state, model):
            self.upload_artifacts(args, model)

    def upload_artifacts(self, args, model) -> None:
        """Commit the final weights, the redacted arguments and the model config into the repo's ``artifacts/``."""
        from ._common import save_model_files

        out = args.output_dir
        if not os.path.isfile(os.path.join(out, WEIGHTS)):
            save_model_files(model, out)
        args_text = json.dumps(redact(args.to_dict()), indent=2, sort_keys=True, default=str)
        if not os.path.isfile(os.path.join(out, ARGS)):
            with open(os.path.join(out, ARGS), "w", encoding="utf-8") as f:
                f.write(args_text)
        names = [WEIGHTS] + (["config.json"] if os.path.isfile(os.path.join(out, "config.json")) else [])

        from dagshub.common import config
        from dagshub.upload import Repo

        # The client reads these module settings at request time; its content PUT has no timeout of its own,
        # hence the bounded thread around the whole upload.
        config.set_host(self._repo.host)
        config.http_timeout = self._http_timeout
        repo = self._repo

        def upload() -> None:
            client = Repo(repo.owner, repo.name, token=self._token, branch=repo.branch)
            handles = [open(os.path.join(out, n), "rb") for n in names]
            try:
                files = list(zip(names, handles)) + [(ARGS, io.BytesIO(args_text.encode("utf-8")))]
                client.upload_files(
                    files, directory_path=ARTIFACTS_DIR, commit_message=f"flytrain: model of MLflow run {self._run_id}",
                    quiet=True,
                )
            finally:
                for handle in handles:
                    handle.close()

        run_bounded(upload, self._http_timeout * _UPLOAD_REQUESTS, "upload")
        logger.info("DagsHub: committed %s to %s/%s@%s:%s/", names + [ARGS], repo.owner, repo.name, repo.branch,
                    ARTIFACTS_DIR)
