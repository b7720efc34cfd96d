"""What README says about the service is what the code does: its settings with their defaults, its
endpoints, the statuses it answers with and the models it can serve."""
import re
from typing import Set, Tuple

from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount

from app import routes, v2
from app.config import Settings
from app.main import create_app
from model import list_models
from benchmarks.server import ROOT
from tests.settings_names import SETTING_VARIABLES, setting_variable

README = (ROOT / "README.md").read_text()
# FastAPI's page for Swagger UI's OAuth2 sign-in: part of /docs, for APIs with OAuth2, which this one has none of.
NOT_AN_ENDPOINT = {("GET", "/docs/oauth2-redirect")}


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(HALO_[A-Z_]+)` \|\s*`?([^|`]*?)`?\s*\|", README, re.MULTILINE))
    assert set(rows) == SETTING_VARIABLES, "README's settings table and Settings name different variables"
    for name, field in Settings.model_fields.items():
        variable, default = setting_variable(name), field.default
        if default is None:
            assert rows[variable] == "", variable
        else:
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            assert rows[variable] in (shown, f"{default:g}" if isinstance(default, float) else shown), variable


def _app() -> FastAPI:
    """The app as it starts, the demo page on (its default); the model is not loaded, as no route here needs it."""
    return create_app(Settings())


def _routes(app: FastAPI) -> Set[Tuple[str, str]]:
    """(method, path) of every route the app serves. Both routers are walked as well as the app, as
    FastAPI may keep an included router's routes in it rather than in the app's list."""
    served = set()
    for route in [*app.routes, *routes.router.routes, *v2.router.routes]:
        if isinstance(route, Mount):  # a folder of files: README names it with a placeholder
            served.add(("GET", f"{route.path}/{{file}}"))
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":  # a GET without its body, which Starlette adds to its own GET routes
                served.add((method, route.path))
    return served - NOT_AN_ENDPOINT


def test_readme_names_every_endpoint_the_app_serves_and_no_other() -> None:
    app = _app()
    named = set(re.findall(r"`(GET|POST|PUT|PATCH|DELETE|HEAD) (/[^`\s]*)`", README))
    assert named == _routes(app)
    documented = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    assert documented <= named


def _readme_statuses() -> Set[int]:
    (errors,) = re.findall(r"Errors are JSON (.*?)Every response carries", README, re.DOTALL)
    return {int(status) for status in re.findall(r"\b([1-5]\d\d)\b", errors)}


def test_readme_lists_every_error_status_the_app_answers_with() -> None:
    app = _app()
    raised = {int(status) for source in (ROOT / "app").glob("*.py")
              for status in re.findall(r"ServiceError\(\s*(\d{3})\b", source.read_text())}
    documented = {int(status) for item in app.openapi()["paths"].values() for operation in item.values()
                  for status in operation["responses"] if status != "200"}

    def fail() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/fail", fail)
    client = TestClient(app, raise_server_exceptions=False)
    answers = [client.get("/no-such-path"), client.delete("/predict"), client.get("/fail")]
    routing = {answer.status_code for answer in answers}
    assert routing == {404, 405, 500} and answers[1].headers["allow"] == "POST"
    assert [answer.json()["error"]["code"] for answer in answers] == ["http_error", "http_error", "internal_error"]
    assert _readme_statuses() == raised | documented | routing
    # Every status a client of /predict or v2 infer can receive is in the OpenAPI document; 499 is
    # logged for a client that left, and 404 and 405 are the router's, for paths and methods.
    spec = app.openapi()["paths"]
    predict = {int(s) for s in spec["/predict"]["post"]["responses"] if s != "200"}
    infer = {int(s) for s in spec["/v2/models/{name}/infer"]["post"]["responses"] if s != "200"}
    assert predict == _readme_statuses() - {404, 405, 499}
    assert infer == _readme_statuses() - {405, 499}


def _model_names(text: str) -> Set[str]:
    """Every `name` in backquotes that reads as a HaloNet registry name (not a metric, an image or a file)."""
    return set(re.findall(r"`([a-z_]*halone[tx][a-z0-9_]*)`", text))


def test_readme_names_every_registered_model_and_no_other() -> None:
    assert _model_names(README) == set(list_models())
    models_doc = (ROOT / "docs" / "models.md").read_text()
    assert _model_names(models_doc) <= set(list_models()), "docs/models.md names a model the registry lacks"
