"""DagsHub integration: MLflow tracking on a DagsHub repository, plus the final model files committed to it.

Environment: everything MLflowCallback reads; credentials (never logged), in this order: MLFLOW_TRACKING_USERNAME +
MLFLOW_TRACKING_PASSWORD (DagsHub's documented MLflow setup; the password is a DagsHub token and also authorises the
upload), else DAGSHUB_USER_TOKEN (MLflow then logs in as DAGSHUB_USERNAME, else as the token's user, asked from
DagsHub as ``dagshub.init`` does). MLFLOW_TRACKING_URI of the form ``https://dagshub.com/<owner>/<repo>.mlflow`` or
DAGSHUB_REPO_OWNER + DAGSHUB_REPO_NAME, BRANCH (default main), DAGSHUB_CLIENT_HOST (the DagsHub client's host),
DAGSHUB_HTTP_TIMEOUT (seconds, default 30), HF_DAGSHUB_LOG_ARTIFACTS (at train end, commit the output folder's final
model files into ``artifacts/``, or ``artifacts/<HF_DAGSHUB_MODEL_NAME>/`` when that is set).
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
from trainer_lib.redaction import mask_urls

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
            f"DagsHub: MLFLOW_TRACKING_URI={mask_urls(uri)!r} is not a DagsHub tracking URI; expected "
            f"'https://dagshub.com/<owner>/<repo>.mlflow' (or set DAGSHUB_REPO_OWNER and DAGSHUB_REPO_NAME)"
        )
    return DagsHubRepo(path[0], path[1][: -len(".mlflow")], client_host or _origin(uri), branch)


def _mlflow_login() -> tuple[str, str] | None:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "").strip()
    return (user, password) if user and password else None


def require_token() -> str:
    """The DagsHub token: DAGSHUB_USER_TOKEN, else MLFLOW_TRACKING_PASSWORD (with MLFLOW_TRACKING_USERNAME), or an
    immediate error: the client must never fall back to an interactive login."""
    token = os.environ.get("DAGSHUB_USER_TOKEN", "").strip()
    if token:
        return token
    login = _mlflow_login()
    if login:
        return login[1]
    raise RuntimeError(
        "DagsHub: no credentials. Set DAGSHUB_USER_TOKEN (DagsHub > User settings > Tokens), or "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; flytrain never starts an interactive or browser login."
    )


def _token_user(token: str, host: str, seconds: float) -> str:
    """The user a token belongs to, as DagsHub reports it (what ``dagshub.init`` sets as MLflow's username)."""
    from dagshub.common.api.user import UserAPI

    user = run_bounded(lambda: UserAPI.get_user_from_token(token, host=host), seconds, "user lookup")
    return user.username


def configure_mlflow_credentials(seconds: float | None = None) -> None:
    """Let MLflow authenticate to the repository's own host (never another one): an MLflow login already in the
    environment wins; otherwise the token, as DAGSHUB_USERNAME or the token's user."""
    repo = resolve_repo()
    if _origin(os.environ.get("MLFLOW_TRACKING_URI", "")) != repo.host:
        return
    if _mlflow_login() or os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return
    token = require_token()
    timeout = env_seconds("DAGSHUB_HTTP_TIMEOUT", 30.0) if seconds is None else seconds
    os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("DAGSHUB_USERNAME") or _token_user(token, repo.host, timeout)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = token


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

    @classmethod
    def check_configuration(cls) -> None:
        """Before training: the repository and credentials are known (nothing is sent anywhere)."""
        if env_flag("DISABLE_MLFLOW_INTEGRATION"):
            return
        resolve_repo()
        require_token()

    def _open(self, args, state, model) -> None:
        if env_flag("DISABLE_MLFLOW_INTEGRATION"):
            return super()._open(args, state, model)
        self._token = require_token()
        self._repo = resolve_repo()
        self._http_timeout = env_seconds("DAGSHUB_HTTP_TIMEOUT", 30.0)
        self._log_repo_artifacts = env_flag("HF_DAGSHUB_LOG_ARTIFACTS")
        self._model_name = os.environ.get("HF_DAGSHUB_MODEL_NAME", "").strip()
        configure_mlflow_credentials(self._http_timeout)
        super()._open(args, state, model)

    def _finish(self, args, state, model) -> None:
        super()._finish(args, state, model)
        if getattr(self, "_log_repo_artifacts", False):
            self.upload_artifacts(args, model)

    def upload_artifacts(self, args, model) -> None:
        """Commit the output folder's final model files (its top-level files: weights, model config, the redacted
        arguments; not the checkpoint folders) into ``artifacts/`` or ``artifacts/<HF_DAGSHUB_MODEL_NAME>/``."""
        from ._common import save_model_files

        out = args.output_dir
        if not os.path.isfile(os.path.join(out, WEIGHTS)):
            save_model_files(model, out)
        args_text = json.dumps(redact(args.to_dict()), indent=2, sort_keys=True, default=str)
        names = sorted(n for n in os.listdir(out)
                       if os.path.isfile(os.path.join(out, n)) and not n.startswith(".") and n != ARGS)
        directory = f"{ARTIFACTS_DIR}/{self._model_name}" if getattr(self, "_model_name", "") else ARTIFACTS_DIR

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
                    files, directory_path=directory, commit_message=f"flytrain: model of MLflow run {self._run_id}",
                    quiet=True,
                )
            finally:
                for handle in handles:
                    handle.close()

        run_bounded(upload, self._http_timeout * _UPLOAD_REQUESTS, "upload")
        logger.info("DagsHub: committed %s to %s/%s@%s:%s/", names + [ARGS], repo.owner, repo.name, repo.branch,
                    directory)
