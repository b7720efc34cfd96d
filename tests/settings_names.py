"""The environment variables the service's settings are read from, for the tests that check the
names the project's files use against them."""
from app.config import Settings


def setting_variable(name: str) -> str:
    """The variable a Settings field is read from (``max_queue`` -> ``HALO_MAX_QUEUE``)."""
    return Settings.model_config["env_prefix"] + name.upper()


SETTING_VARIABLES = frozenset(setting_variable(name) for name in Settings.model_fields)
