"""Command-line interface (`ollama-distributed ...`), shaped like `ollama`'s."""

from ._app import app

# Each module registers its commands on `app` when imported.
from . import run_cmd, plan_cmd, serve_cmd, models_cmd, cluster_cmd, node_cmd  # noqa: E402,F401


def main() -> None:
    app()
